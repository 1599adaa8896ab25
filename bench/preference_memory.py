"""The memory planner's preference step (DPO) against the peak RSS of real DPO steps at full length:
`python bench/preference_memory.py [--batch-sizes 2,4] [--max-length 160] [--steps 3]`.

The planner (qlora_ui/memory.py) plans for every row at max_length: its estimate is an upper bound for the step it
describes. Real pairs are shorter and padded only to the longest in their batch, so a run on the bundled pirate pairs
(bench/preference.py) compares the planner with a smaller step than the one it plans. Here every pair is built to be
max_length tokens long (prompt + the longer answer, with the chat template, within 4 tokens of max_length), so the
measured step is the planned one, as bench/measure_memory.py does for SFT.

Each case is the project's own CLI (`train --preset cpu-dpo`, a fresh adapter, no eval) in a fresh child process.
As for SFT (bench/measure_memory.py), what is compared is the step's increase of RSS over the RSS when training
starts (model, adapter and data loaded) with the planner's step-dependent parts (gradients + optimizer state +
activations): the rest of the process (Python, torch's libraries, the tokenizer: over a GB of RSS here) is no
tensor the planner counts. Writes bench/results/preference_memory.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, app_env

from qlora_ui.presets import load_preset

WORDS = ("ship sail wind harbour rope anchor island treasure map compass storm wave deck crew captain cannon gold "
         "parrot rum tide reef lantern barrel coast north south east west morning evening river stone").split()


def full_length_pairs(max_length: int, n: int, seed: int = 0) -> list[dict]:
    """`n` preference pairs whose prompt + longer answer is max_length - 4 .. max_length tokens, as the data
    pipeline counts them (qlora_ui/data/preference.py, the chat template applied)."""
    from qlora_ui.data.preference import _tokens
    from qlora_ui.modeling import load_tokenizer, resolve_model_path

    cfg = load_preset("cpu-dpo")
    tok = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    while len(rows) < n:
        prompt_words, answer_words = rng.randint(15, 35), 200
        prompt = text(prompt_words)
        chosen, rejected = text(answer_words), text(answer_words)
        msgs = system + [{"role": "user", "content": prompt}]
        # Shorten both answers word by word until the pair fits; keep it only when it lands within 4 tokens.
        while answer_words > 1:
            c, r = " ".join(chosen.split()[:answer_words]), " ".join(rejected.split()[:answer_words])
            t = _tokens(tok, msgs, [{"role": "assistant", "content": c}], [{"role": "assistant", "content": r}])
            if t["length"] <= max_length:
                if t["length"] >= max_length - 4:
                    rows.append({"prompt": prompt, "chosen": c, "rejected": r})
                break
            answer_words -= 1
    return rows


# The child: the project's CLI in-process, with the RSS sampled every 2 ms. The baseline is taken when the Trainer
# starts training (model, adapter and data loaded; glibc's free memory handed back first), as bench/measure_memory.py
# does for SFT; the peak is the highest RSS from then on. Optimizer state is allocated in the first step, so it is
# part of the increase, as in the planner's step-dependent parts.
CHILD = r"""
import ctypes, json, sys, threading, time
import psutil, transformers
from qlora_ui.cli import main
state = {"baseline": None, "peak": 0}
def sample():
    p = psutil.Process()
    while True:
        if state["baseline"] is not None:
            state["peak"] = max(state["peak"], p.memory_info().rss)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
train = transformers.Trainer.train
def measured_train(self, *a, **k):
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    state["baseline"] = psutil.Process().memory_info().rss
    return train(self, *a, **k)
transformers.Trainer.train = measured_train
rc = main(sys.argv[1:])
print("MEASURED " + json.dumps({"rc": rc, "baseline": state["baseline"], "peak": state["peak"]}))
"""


def measure(data: Path, batch: int, max_length: int, steps: int, checkpointing: bool, runs: Path) -> dict:
    """Baseline and peak RSS (bytes) of `steps` DPO steps on `data` in a fresh child process."""
    args = ["train", "--preset", "cpu-dpo", "--data-path", str(data), "--max-steps", str(steps), "--batch-size",
            str(batch), "--max-length", str(max_length), "--eval-fraction", "0", "--save-steps", str(steps),
            "--gradient-checkpointing", str(checkpointing).lower(), "--runs-dir", str(runs), "--name", f"mem-b{batch}"]
    p = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=app_env(), capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("MEASURED ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"DPO case failed ({p.returncode}): {' '.join(args)}\n{p.stderr[-3000:]}")
    return json.loads(line[-1][len("MEASURED "):])


def planned(batch: int, max_length: int, checkpointing: bool) -> dict:
    from qlora_ui.plan import plan_for_config

    cfg = load_preset("cpu-dpo").updated(batch_size=batch, max_length=max_length,
                                         gradient_checkpointing=checkpointing, eval_fraction=0.0)
    plan = plan_for_config(cfg, 24.0, device="cpu")
    parts = plan.breakdown[plan.method]
    return {"total_gb": plan.total_gb(), "step_gb": (parts["gradients"] + parts["optimizer"] + parts["activations"])
            / 1e9, "parts_gb": {k: round(v / 1e9, 3) for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="2,4")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    a = ap.parse_args()
    cases = [(int(b), c) for b in a.batch_sizes.split(",")
             for c in {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]]
    with tempfile.TemporaryDirectory(prefix="qlora-pref-mem-") as tmp:
        data = Path(tmp) / "full-length-pairs.jsonl"
        rows = full_length_pairs(a.max_length, max(b for b, _ in cases) * a.steps * 2)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = []
        for batch, ckpt in cases:
            m = measure(data, batch, a.max_length, a.steps, ckpt, Path(tmp) / "runs")
            plan = planned(batch, a.max_length, ckpt)
            increase = (m["peak"] - m["baseline"]) / 1e9
            results.append({"batch_pairs": batch, "max_length": a.max_length, "gradient_checkpointing": ckpt,
                            "baseline_gb": round(m["baseline"] / 1e9, 3), "peak_gb": round(m["peak"] / 1e9, 3),
                            "measured_step_gb": round(increase, 3), "planned_step_gb": round(plan["step_gb"], 3),
                            "planned_over_measured": round(plan["step_gb"] / increase, 3),
                            "planned_total_gb": round(plan["total_gb"], 3), "planned_parts_gb": plan["parts_gb"]})
            print(json.dumps(results[-1]), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "preference_memory.json").write_text(json.dumps(results, indent=2))
    lines = ["| pairs/step | max_length | checkpointing | RSS at start / peak | step's increase | planner's step "
             "parts | planner / measured |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_pairs']} | {r['max_length']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
              f"{r['baseline_gb']:.2f} / {r['peak_gb']:.2f} GB | {r['measured_step_gb']:.2f} GB | "
              f"{r['planned_step_gb']:.2f} GB | {r['planned_over_measured']:.2f}x |" for r in results]
    (out / "preference_memory.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
