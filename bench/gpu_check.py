"""Device check for a lent GPU: real QLoRA steps on a 7B-shaped model through the app's own training engine,
peak GPU memory against the memory planner's estimate for the same settings.

    bash bench/gpu_check.sh                     # what to run on the device machine
    python bench/gpu_check.py [--steps 3] [--workdir /tmp] [--json]

1. Builds a LLaMA-7B-shaped model with random bf16 weights directly on the GPU (no download, never an fp32
   copy) and saves it as safetensors shards in a temporary folder (13.5 GB; about a minute on an H200 host).
2. One GPU: `python -m qlora_ui train --base-model THAT_FOLDER` on a generated text dataset (rows of ~480
   tokens), batch 1 x 512, LoRA r16, a few steps. The engine logs torch.cuda.max_memory_allocated per step
   (metrics.jsonl, gpu_peak_gb); the largest is compared with qlora_ui.memory's total for the same config.
3. Two or more GPUs: the same with `--processes 2 --accelerate-config fsdp-qlora --quant-storage bf16`
   against the planner's per-device FSDP figure (rank 0's peak).

Peaks count tensors only (not the CUDA context or the allocator's cache) and include the load, as the planner
does. Exit codes: 0 every case ran; 1 a case failed; 3 no CUDA GPU here, nothing checked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CLI, ROOT, make_random_model, read_metrics, shape_dict, write_word_text

NO_GPU = 3
SETTINGS = {"batch_size": 1, "max_length": 512, "lora_r": 16, "grad_accum": 1}


def no_gpu_reason() -> str | None:
    """Why there is nothing to check here, or None when a CUDA GPU is visible."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
    return None


def train_case(model_dir: Path, data: Path, runs: Path, steps: int, processes: int, recipe: str,
               timeout: int) -> dict:
    name = f"gpu-check-{processes}p{'-' + recipe if recipe else ''}"
    cmd = [*CLI, "train", "--base-model", str(model_dir), "--data", str(data),
           "--data-format", "text", "--max-steps", str(steps), "--batch-size", str(SETTINGS["batch_size"]),
           "--max-length", str(SETTINGS["max_length"]), "--lora-r", str(SETTINGS["lora_r"]),
           "--grad-accum", "1", "--eval-fraction", "0", "--save-steps", "1000", "--logging-steps", "1",
           "--runs-dir", str(runs), "--name", name, "--quiet"]
    if processes > 1:
        cmd += ["--processes", str(processes), "--accelerate-config", recipe, "--quant-storage", "bf16"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = {"case": name, "processes": processes, "recipe": recipe or "-", "rc": proc.returncode,
           "seconds": round(time.time() - t0, 1)}
    run_dirs = sorted(runs.glob(f"*-{name}"))
    rows = read_metrics(run_dirs[-1]) if run_dirs and (run_dirs[-1] / "metrics.jsonl").exists() else []
    peaks = [r["gpu_peak_gb"] for r in rows if r.get("gpu_peak_gb") is not None]
    out["measured_gb"] = max(peaks) if peaks else None
    out["steps_logged"] = len([r for r in rows if r.get("loss") is not None])
    if proc.returncode != 0 or not peaks:
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
    return out


def planner_gb(model_dir: Path, processes: int, strategy: str, device_gb: float) -> float:
    from qlora_ui.config import RunConfig
    from qlora_ui.memory import plan_for_config

    cfg = RunConfig().updated(base_model=str(model_dir), **SETTINGS)
    return plan_for_config(cfg, device_gb, processes=processes, strategy=strategy).total_gb()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the random model goes (needs ~14 GB free)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per training case")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    why = no_gpu_reason()
    if why:
        print(f"gpu_check: {why}; nothing to check. Run it on a machine with a CUDA GPU: bash bench/gpu_check.sh",
              file=sys.stderr)
        return NO_GPU

    import torch

    n_gpus = torch.cuda.device_count()
    device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    print(f"gpu_check: {n_gpus} x {torch.cuda.get_device_name(0)} ({device_gb:.0f} GB), torch {torch.__version__}",
          file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.workdir))
    results = []
    try:
        t0 = time.time()
        model_dir = make_random_model(tmp / "llama-7b", shape_dict("llama-7b"), device="cuda")
        print(f"gpu_check: random 7B written in {time.time() - t0:.0f} s", file=sys.stderr)
        data = write_word_text(tmp / "data.jsonl")
        cases = [(1, "", "ddp")] + ([(2, "fsdp-qlora", "fsdp")] if n_gpus >= 2 else [])
        for processes, recipe, strategy in cases:
            r = train_case(model_dir, data, tmp / "runs", args.steps, processes, recipe, args.timeout)
            r["planner_gb"] = round(planner_gb(model_dir, processes, strategy, device_gb), 2)
            r["ratio"] = round(r["measured_gb"] / r["planner_gb"], 2) if r.get("measured_gb") else None
            results.append(r)
            print(f"gpu_check: {r['case']}: rc {r['rc']}, {r['seconds']} s, measured {r['measured_gb']} GB, "
                  f"planner {r['planner_gb']} GB, measured/planner {r['ratio']}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if n_gpus < 2:
        print("gpu_check: one GPU only, FSDP case skipped (needs 2).", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'case':<28}{'rc':>4}{'steps':>7}{'measured GB':>13}{'planner GB':>12}{'meas/plan':>11}")
        for r in results:
            print(f"{r['case']:<28}{r['rc']:>4}{r['steps_logged']:>7}{str(r['measured_gb']):>13}"
                  f"{r['planner_gb']:>12}{str(r['ratio']):>11}")
        for r in results:
            if r.get("error"):
                print(f"\n{r['case']} failed:\n{r['error']}")
    return 0 if all(r["rc"] == 0 and r.get("measured_gb") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
