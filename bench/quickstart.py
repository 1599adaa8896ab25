"""How long the README's quick start takes on this machine: the `cpu-quickstart` preset as the Train tab runs it
(the CLI, same engine), from the command to the finished adapter. Run it alone: two CPU-heavy jobs on 2 cores slow
each other 15-30x.

    python bench/quickstart.py            # the preset's own steps
    python bench/quickstart.py --steps 20 # shorter; the total is then also projected to the preset's steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="max steps (default: the preset's)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from qlora_ui.config import load_preset

    preset_steps = load_preset("cpu-quickstart").training.max_steps
    steps = args.steps or preset_steps
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "qlora_ui", "train", "--preset", "cpu-quickstart", "--max-steps", str(steps),
               "--runs-dir", tmp, "--quiet"]
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        total = time.time() - t0
        run = next(Path(tmp).iterdir())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["time"] for r in rows if "loss" in r and "time" in r]
    per_step = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 2 else float("nan")
    startup = total - per_step * steps
    print(f"cpu-quickstart, {steps} steps on {os.cpu_count()} cores: {total:.0f} s in all "
          f"(median {per_step:.2f} s/step; load, data and saving ~{startup:.0f} s)")
    if steps != preset_steps:
        print(f"projected for the preset's {preset_steps} steps: {startup + per_step * preset_steps:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
