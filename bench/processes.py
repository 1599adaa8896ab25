"""One process against N processes (data parallel through accelerate) at the same global batch.

    python bench/processes.py                 # cpu-quickstart on the bundled model, 20 steps each, 1 vs 2
    python bench/processes.py --steps 40 --processes 2 --preset cpu-quickstart

Both runs go through the real CLI (`python -m qlora_ui train`), one after the other, on the same data order
(no length grouping), no dropout and the same global batch (1 x batch B against N x batch B/N). It prints
per-step loss agreement, median tokens/s over the steps after the first few (the Trainer's token count, summed
over every process), the wall time from start to the last step, and the ratios N/1. On a CPU the processes
share the cores (each gets cores/N threads), so this measures the overhead of the multi-process path rather
than a speed-up; on a machine with N GPUs the same command measures the speed-up.
Run it alone: two CPU-heavy jobs on 2 cores slow each other 15-30x.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CLI, ROOT, read_metrics

SKIP = 3  # warm-up steps left out of the tokens/s median


def run(preset: str, steps: int, processes: int, batch: int, runs_dir: Path, extra: list[str]) -> dict:
    cmd = [*CLI, "train", "--preset", preset, "--max-steps", str(steps),
           "--processes", str(processes), "--batch-size", str(batch), "--runs-dir", str(runs_dir),
           "--group-by-length", "false", "--lora-dropout", "0", "--eval-fraction", "0",
           "--save-steps", str(steps), "--quiet", *extra]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    [run_dir] = [p for p in runs_dir.iterdir() if (p / "metrics.jsonl").is_file()]
    rows = read_metrics(run_dir)
    loss = [r for r in rows if r.get("loss") is not None]
    tps = [r["tokens_per_s"] for r in loss[SKIP:] if r.get("tokens_per_s")]
    rss = max(r.get("rss_gb", 0) for r in rows)
    return {"processes": processes, "batch": batch, "loss": [r["loss"] for r in loss],
            "tokens_per_s": statistics.median(tps), "wall_s": wall, "rss_gb_rank0": rss,
            "world_size": loss[-1].get("world_size"), "epoch": loss[-1]["epoch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-quickstart")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="Global batch (per step, over all processes).")
    ap.add_argument("extra", nargs="*", help="More train flags, after --.")
    a = ap.parse_args()
    if a.batch % a.processes:
        sys.exit("--batch must be divisible by --processes")
    with tempfile.TemporaryDirectory() as tmp:
        one = run(a.preset, a.steps, 1, a.batch, Path(tmp) / "one", a.extra)
        many = run(a.preset, a.steps, a.processes, a.batch // a.processes, Path(tmp) / "many", a.extra)
    rel = [abs(x - y) / max(abs(x), 1e-9) for x, y in zip(one["loss"], many["loss"])]
    print(f"{a.preset}, {a.steps} steps, global batch {a.batch}: 1 x {a.batch} vs {a.processes} x "
          f"{a.batch // a.processes}\n")
    print(f"{'':28}{'1 process':>14}{f'{a.processes} processes':>14}{'ratio':>10}")
    for key, label in (("tokens_per_s", "tokens/s (median)"), ("wall_s", "wall s, start to end"),
                       ("rss_gb_rank0", "peak RSS GB (rank 0)")):
        print(f"{label:28}{one[key]:14.1f}{many[key]:14.1f}{many[key] / one[key]:10.2f}x")
    print(f"{'epoch after the last step':28}{one['epoch']:14.4f}{many['epoch']:14.4f}")
    print(f"\nloss per step, largest relative difference: {max(rel):.2e} (median {statistics.median(rel):.2e}); "
          f"first steps: " + ", ".join(f"{x:.4f}/{y:.4f}" for x, y in list(zip(one['loss'], many['loss']))[:4]))


if __name__ == "__main__":
    main()
