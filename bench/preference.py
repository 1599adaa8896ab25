"""SFT -> DPO on the bundled model and the bundled pirate preference pairs, run alone:
`python bench/preference.py [--sft-steps N] [--dpo-steps N]`.

Each stage is the project's own CLI in a child process (so each peak RSS is that stage's alone): SFT with the
cpu-quickstart recipe on the pirate chat rows at batch B, then DPO with the cpu-dpo preset from that run's adapter,
B pairs a step (2B sequences), evaluated on its held-out pairs at the end. Reports the held-out reward accuracy and
margin, and the peak RSS of each stage (the largest rss_gb of its metrics rows) and their ratio.
Writes bench/results/preference.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from common import CLI, ROOT, app_env


def stage(args: list[str], runs: Path) -> tuple[Path, float]:
    before = set(runs.glob("*")) if runs.exists() else set()
    t0 = time.time()
    p = subprocess.run([*CLI, "train", *args, "--runs-dir", str(runs)], cwd=ROOT, env=app_env(),
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"stage failed ({p.returncode}): {' '.join(args)}\n{p.stderr[-3000:]}")
    (run,) = set(runs.glob("*")) - before
    return run, time.time() - t0


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/qlora-bench-preference"))
    a = ap.parse_args()
    b = str(a.batch_size)
    sft, sft_s = stage(["--preset", "cpu-quickstart", "--max-steps", str(a.sft_steps), "--batch-size", b,
                        "--name", "bench-sft", "--save-steps", str(a.sft_steps)], a.runs)
    dpo, dpo_s = stage(["--preset", "cpu-dpo", "--init-adapter", str(sft), "--max-steps", str(a.dpo_steps),
                        "--batch-size", b, "--name", "bench-dpo", "--eval-steps", str(a.dpo_steps),
                        "--save-steps", str(a.dpo_steps), "--eval-fraction", "0.05"], a.runs)
    s_rows, d_rows = rows(sft), rows(dpo)
    ev = [r for r in d_rows if "eval_reward_accuracy" in r][-1]
    tr = [r for r in d_rows if "loss" in r]
    sft_peak = max(r["rss_gb"] for r in s_rows)
    dpo_peak = max(r["rss_gb"] for r in d_rows)
    result = {
        "sft_steps": a.sft_steps, "dpo_steps": a.dpo_steps, "batch_size": a.batch_size,
        "sft_seconds": round(sft_s, 1), "dpo_seconds": round(dpo_s, 1),
        "sft_s_per_step": round(max(r["elapsed_s"] for r in s_rows) / a.sft_steps, 2),
        "dpo_s_per_step": round(max(r["elapsed_s"] for r in d_rows) / a.dpo_steps, 2),
        "heldout_reward_accuracy": round(ev["eval_reward_accuracy"], 3),
        "heldout_reward_margin": round(ev.get("eval_reward_margin", float("nan")), 3),
        "dpo_loss_first_last": [round(tr[0]["loss"], 4), round(tr[-1]["loss"], 4)],
        "train_reward_accuracy_last": round(tr[-1].get("reward_accuracy", float("nan")), 3),
        "sft_peak_rss_gb": round(sft_peak, 3), "dpo_peak_rss_gb": round(dpo_peak, 3),
        "dpo_over_sft_rss": round(dpo_peak / sft_peak, 3),
        "sft_run": str(sft), "dpo_run": str(dpo),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "preference.json").write_text(json.dumps(result, indent=2))
    lines = [f"{k}: {v}" for k, v in result.items()]
    (out / "preference.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
