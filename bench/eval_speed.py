"""How long the Evaluate tab's example takes: the example task (presets/data/eval/pirate-style.jsonl, 30 rows x 3
replies) on the bundled model, its 4-bit base with a run's adapter off and on, through lm-evaluation-harness.

    python bench/eval_speed.py --run runs/<a run on the bundled model> [--limit N] [--chat-template]

Times the whole engine call (`qlora_ui.evaluate.bench_run.run_benchmarks`, what the tab's Start runs): loading the
base and the adapter, both evaluations, writing RUN/eval/<timestamp>.json; the process's own imports (lm-eval,
transformers: seconds) come before the clock starts, as in the running app. Goal (issue 26): <= 2 min on 2 CPU
cores, with a progress bar. Prints the goal table and the benchmark table.
"""

from __future__ import annotations

import argparse
import os
import time

import common

GOAL_S = 120.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="A run with an adapter, on the bundled model (cpu-quickstart).")
    p.add_argument("--limit", type=int, default=None, help="Rows of the task (default: all 30).")
    p.add_argument("--chat-template", action="store_true", help="Prompts as a chat (lm-eval apply_chat_template).")
    args = p.parse_args()

    import lm_eval.evaluator  # noqa: F401 - imported before the clock, as the running app has it
    import peft  # noqa: F401

    from qlora_ui.evaluate.bench_request import EvalRequest
    from qlora_ui.evaluate.bench_results import format_table
    from qlora_ui.evaluate.bench_run import run_benchmarks
    from qlora_ui.runs import open_run

    run = open_run(args.run)
    example = common.ROOT / "presets" / "data" / "eval" / "pirate-style.jsonl"
    seen = {"stage": ""}

    def progress(fraction: float, message: str) -> None:
        stage = message.split(":")[0]
        if stage != seen["stage"]:
            print(f"[{time.time() - t0:6.1f} s {100 * fraction:3.0f}%] {message}", flush=True)
            seen["stage"] = stage

    t0 = time.time()
    path, record = run_benchmarks(EvalRequest(run, [str(example)], limit=args.limit,
                                              chat_template=args.chat_template), progress)
    seconds = time.time() - t0
    per_model = ", ".join(f"{m['label']} {m['seconds']:.1f} s" for m in record["models"])
    print()
    print(common.table(["measure", "value", "goal", "met"],
                       [["example task, adapter off + on (load included)", f"{seconds:.1f} s", f"<= {GOAL_S:.0f} s",
                         common.meets(seconds, "<=", GOAL_S)],
                        ["of which loading the 4-bit base + adapter", f"{record['timing']['load_seconds']:.1f} s",
                         "", ""],
                        ["each evaluation", per_model, "", ""]]))
    print(f"\nCPU cores: {os.cpu_count()}, torch threads: {record['timing']['threads']}, rows: "
          f"{record['n_samples']}, chat template: {args.chat_template}\n")
    print(format_table(record))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
