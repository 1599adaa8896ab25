"""`python -m qlora_ui eval`: benchmarks of a run's adapter on vs off through lm-evaluation-harness, as a table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="Benchmarks through lm-evaluation-harness: a run's 4-bit base with the adapter "
                                    "off and on.",
                       description="Score a run's own 4-bit base with its adapter off and on (and other runs' "
                                   "adapters) on lm-eval tasks and your own JSONL files; prints the table and "
                                   "writes RUN/eval/<timestamp>.json. See docs/evaluation.md.")
    p.add_argument("--run", required=True, help="Run folder (or its name under --runs-dir).")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="Comma-separated lm-eval task names whose data is in the local Hugging Face cache (e.g. "
                        "mmlu, arc_easy), or paths to JSONL files (multiple choice: question/choices/answer; "
                        "generation: prompt/reference). Example: presets/data/eval/pirate-style.jsonl")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="Score the first N rows of each task.")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="Examples shown before each question (default: the task's own; 0 for files).")
    p.add_argument("--also", default="", metavar="RUN2,...", help="Other runs whose adapters are scored too.")
    # On by default, as in the Evaluate tab: a run trains through its chat template, so scoring without it
    # measures another prompt format (the pirate example: 0.83 with it, 0.00 without). --no-chat-template is
    # lm-eval's own default, for numbers comparable with published ones.
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="Render prompts with the model's chat template (lm-eval's --apply_chat_template; default: "
                        "on, as runs are trained through it; --no-chat-template for lm-eval's plain prompts).")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="Requests per forward pass "
                   "(default 16).")
    p.add_argument("--runs-dir", default="runs", help="Where run names are looked up (default: runs).")
    p.add_argument("--json", action="store_true", help="Print the result file's content instead of the table.")
    p.set_defaults(func=eval_main)


def _open(name: str, runs_dir: str):
    from ..runs import open_run

    # A path as given; else a name in --runs-dir (open_run says which folder is not a run).
    return open_run(name if Path(name).exists() else Path(runs_dir) / name)


def eval_main(args) -> int:
    import json
    import logging

    # lm-eval warns about choices made here on purpose (a loaded model, not a name; rows from memory): not for users.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    from .bench_request import DEFAULT_BATCH_SIZE, EvalRequest, split_tasks
    from .bench_results import format_table
    from .bench_run import run_benchmarks

    run = _open(args.run, args.runs_dir)
    also = [_open(a, args.runs_dir) for a in split_tasks(args.also)]
    req = EvalRequest(run, split_tasks(args.tasks), limit=args.limit, num_fewshot=args.num_fewshot, also=also,
                      chat_template=args.chat_template, batch_size=args.batch_size or DEFAULT_BATCH_SIZE)
    last = {"key": None}

    def progress(fraction: float, message: str) -> None:
        key = (message.split(":")[0], int(10 * fraction))
        if key != last["key"]:  # a line per stage and per tenth, not per request
            print(f"[{100 * fraction:3.0f}%] {message}", file=sys.stderr, flush=True)
            last["key"] = key

    path, record = run_benchmarks(req, progress)
    print(json.dumps(record, indent=1) if args.json else format_table(record))
    print(f"results: {path}", file=sys.stderr)
    return 0
