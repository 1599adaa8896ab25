"""Check the memory planner (qlora_ui/memory.py) against the peak memory of real QLoRA training steps.

Each case runs in a fresh subprocess (so the load's own peak and earlier cases cannot hide the step's peak):
load the model in NF4 with LoRA through qlora_ui.modeling.load_for_training, record the baseline, run
`--steps` real steps (forward + backward + clip + optimizer step + zero_grad), record the peak, and compare
the increase with the planner's step-dependent parts (gradients + optimizer state + activations).

    python bench/measure_memory.py                        # CPU table: tiny random models + the bundled model
    python bench/measure_memory.py --model PATH --batch 2 --seq 128 --json    # one local model
    python bench/measure_memory.py --device cuda          # GPU: 7B/13B-shaped random-weight models

CPU: memory is the process's resident set (RSS). The peak is the kernel's high-water mark (ru_maxrss) when
the step raised it, else the highest value a sampling thread saw every 2 ms. glibc's free memory is handed
back (malloc_trim) before the baseline so the baseline is live memory, not the loader's leftovers. RSS also
holds glibc's freed-but-kept heap and oneDNN's kernel workspaces, which differ between CPUs (AMX, AVX-512 BF16)
and between runs; `--tensors` measures each case once more with a tally of the live tensors the step creates
(TensorTally, the allocator's view), which does not.

    python bench/measure_memory.py --model bundled --batch 2 --seq 256 --tensors --also-trim   # all three views
CUDA: torch.cuda.max_memory_allocated (tensors only; the CUDA context and allocator cache are not included).

Two steps by default: the optimizer allocates its state at the end of the first step, so the steady-state
peak — activations while the optimizer state exists — is reached in the second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, make_random_model, shape_dict

# Random Llama shapes for CPU: the conftest tiny model, a wider one, and a deeper one with a small vocabulary
# (so the layers, not the logits, dominate).
TINY = {
    "tiny-64": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": True},
    "tiny-256": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 4, "vocab_size": 49152, "tie_word_embeddings": True},
    "deep-512": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 8, "vocab_size": 4096, "tie_word_embeddings": False},
}
CPU_CASES = [  # (model, batch, seq, gradient checkpointing)
    ("tiny-64", 2, 128, True),
    ("tiny-256", 2, 256, True),
    ("deep-512", 4, 256, True),
    ("deep-512", 4, 256, False),
    ("bundled", 1, 256, True),
    ("bundled", 2, 256, True),
    ("bundled", 1, 512, True),
    ("bundled", 4, 256, True),
    ("bundled", 1, 256, False),
    ("bundled", 8, 128, False),  # the cpu-quickstart preset's setting
]
CUDA_CASES = [("llama-7b", 1, 512, True), ("llama-7b", 4, 512, True), ("llama-7b", 1, 512, False),
              ("llama-13b", 1, 512, True), ("llama-13b", 4, 512, True)]


# ---------------------------------------------------------------- one measurement (child process)

def make_optimizer(name: str, params):
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=2e-4)
    import bitsandbytes as bnb

    # On CPU bitsandbytes' paged optimizers fall back to plain ones (same state bytes, nothing to page to).
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return cls(params, lr=2e-4)


class PeakSampler(threading.Thread):
    """Polls a reading every `every` seconds and keeps the highest."""

    def __init__(self, read, every: float = 0.002):
        super().__init__(daemon=True)
        self.read, self.every, self.peak = read, every, read()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.every)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, self.read())
        return self.peak


def _rss_reader():
    # /proc/self/statm is far cheaper than psutil at 500 reads a second.
    page = os.sysconf("SC_PAGE_SIZE")
    if Path("/proc/self/statm").exists():
        def read():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        return read
    from qlora_ui.modeling import rss_bytes

    return rss_bytes


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline just includes some free heap
        pass


class TensorTally:
    """The allocator's view of a step: bytes of the tensor storages that the step's ops create and that are still
    alive, and the peak of that sum — independent of glibc's heap and of oneDNN's kernel workspaces (which are
    not tensors), so the same on every CPU.

    A TorchDispatchMode sees every aten op the step runs (forward, the recomputed forward of gradient
    checkpointing, backward — on CPU the autograd engine runs it in the calling thread — and the optimizer's
    ops); each storage an op returns that none of its inputs already held is counted until a weak reference says
    it was freed. Parameters, quantized weights and the input ids exist before the step and are not counted (an
    in-place update of a parameter returns the parameter's own storage, which is an input of the op). Tensors
    allocated inside a custom op's kernel and freed before it returns are not seen: the dispatch mode sees the
    op's outputs only.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tally = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tally._record(func, args, kwargs, out)
                return out

        self.mode = _Mode()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._sizes: dict[int, int] = {}  # storage id -> bytes counted

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def _record(self, func, args, kwargs, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor)}
        for t in outs:
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs and key not in self._sizes:
                continue  # an input's storage: in place, a view, or out= into memory that existed before
            n = st.nbytes()
            old = self._sizes.get(key)
            if old is None:
                self._sizes[key] = n
                weakref.finalize(st, self._freed, key)
            elif old != n:  # resized in place (out= into an empty tensor)
                self._sizes[key] = n
            self.live += n - (old or 0)
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, str(func)

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def measure_one(model: str, batch: int, seq: int, rank: int, optimizer: str, checkpointing: bool,
                steps: int, device: str, tally: bool = False) -> dict:
    import gc

    import torch

    from qlora_ui.config import RunConfig
    from qlora_ui.modeling import load_for_training, trainable_parameters

    cfg = RunConfig()
    cfg.model.base_model = model
    cfg.lora.lora_r = rank
    lm = load_for_training(cfg.model, cfg.quantization, cfg.lora, checkpointing)
    net = lm.model
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params)
    dev = next(net.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(lm.model.config.vocab_size, 30000), (batch, seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    gc.collect()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        _malloc_trim()
        read = _rss_reader()
        baseline = read()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampler = PeakSampler(read)
        sampler.start()
    t0 = time.time()
    losses = []
    # As the app's Trainer does: bf16 autocast around forward + loss on a GPU (bf16=True), none on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    counter = TensorTally() if tally else None
    for _ in range(steps):
        if counter is not None:
            counter.__enter__()
        # Like the Trainer: the model output (and its logits) is dropped before backward.
        with autocast:
            loss = net(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        del loss
        if counter is not None:
            counter.__exit__(None, None, None)
    step_s = (time.time() - t0) / steps
    if device == "cuda":
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "cuda.max_memory_allocated"
    else:
        sampled = sampler.stop()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # The kernel's high-water mark is exact, but only tells us about the step if the step raised it.
        peak, how = (maxrss_after, "ru_maxrss") if maxrss_after > maxrss_before else (sampled, "sampled")
    trainable, _ = trainable_parameters(net)
    extra = {}
    if counter is not None:
        gc.collect()
        # Peak of the live tensors the steps created, and what is left after them: the optimizer state.
        extra = {"tally_peak_bytes": counter.peak, "tally_end_bytes": counter.live, "tally_peak_op": counter.peak_op}
    return extra | {"model": model, "batch": batch, "seq": seq, "rank": rank, "optimizer": optimizer,
            "gradient_checkpointing": checkpointing, "steps": steps, "device": device,
            "baseline_bytes": baseline, "peak_bytes": peak, "increase_bytes": peak - baseline, "peak_from": how,
            "footprint_bytes": lm.footprint_bytes, "tensor_bytes": tensor_bytes(net), "trainable": trainable,
            "step_seconds": round(step_s, 2), "losses": losses, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "tally": tally}


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer after kbit preparation, plus the 4-bit quantization constants."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += qs.absmax.nbytes + qs.code.nbytes
            if qs.nested:
                total += qs.state2.absmax.nbytes + qs.state2.code.nbytes
    return total


def run_child(model: str, batch: int, seq: int, checkpointing: bool, args, env: dict | None = None,
              tally: bool = False) -> dict:
    """measure_one in a fresh interpreter: peaks of earlier cases and of loading cannot leak in."""
    cmd = [sys.executable, __file__, "--child", "--model", model, "--batch", str(batch), "--seq", str(seq),
           "--rank", str(args.rank), "--optimizer", args.optimizer, "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads)]
    if not checkpointing:
        cmd.append("--no-gradient-checkpointing")
    if tally:
        cmd.append("--tally")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement of {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- estimate vs measured

def estimate_for(result: dict, model_for_plan: str) -> dict:
    from qlora_ui.memory import (
        CPU_RUNTIME_BYTES,
        GB,
        PlanSettings,
        cpu_allocator_slack,
        estimate,
        resolve_shape,
    )

    shape = resolve_shape(model_for_plan)
    s = PlanSettings(batch=result["batch"], seq=result["seq"], rank=result["rank"], optimizer=result["optimizer"],
                     gradient_checkpointing=result["gradient_checkpointing"], device=result["device"],
                     mixed_precision=result["device"] == "cuda")  # this loop's autocast: on CUDA only (below)
    parts = estimate(shape, s)["qlora"]
    step = parts["gradients"] + parts["optimizer"] + parts["activations"]
    static = parts["weights"] + parts["quant_constants"] + parts["adapter"]
    slack = cpu_allocator_slack(shape, s, "qlora") if s.device == "cpu" else 0.0
    runtime = CPU_RUNTIME_BYTES if s.device == "cpu" else 0.0
    # est_live: what RSS should show once glibc hands freed memory back; est_tensors: the tensors alone (the
    # runtime term is memory outside any tensor).
    return {"est_step_gb": step / GB, "est_total_gb": (step + static) / GB, "est_static_gb": static / GB,
            "est_live_gb": (step - slack) / GB, "est_tensors_gb": (step - slack - runtime) / GB}


def row(result: dict, label: str, est: dict, trimmed: dict | None = None, tallied: dict | None = None) -> dict:
    from qlora_ui.memory import GB

    meas = result["increase_bytes"] / GB
    out = {"case": label, "batch": result["batch"], "seq": result["seq"],
           "gradient_checkpointing": result["gradient_checkpointing"],
           "est_step_gb": round(est["est_step_gb"], 3), "measured_step_gb": round(meas, 3),
           "ratio": round(est["est_step_gb"] / meas, 2) if meas > 0 else None,
           "est_static_gb": round(est["est_static_gb"], 3), "tensor_gb": round(result["tensor_bytes"] / GB, 3),
           "peak_from": result["peak_from"], "step_seconds": result["step_seconds"]}
    if trimmed is not None:
        t = trimmed["increase_bytes"] / GB
        out.update(est_live_gb=round(est["est_live_gb"], 3), measured_trim_gb=round(t, 3),
                   ratio_trim=round(est["est_live_gb"] / t, 2) if t > 0 else None)
    if tallied is not None:
        t = tallied["tally_peak_bytes"] / GB
        out.update(est_tensors_gb=round(est["est_tensors_gb"], 3), measured_tensors_gb=round(t, 3),
                   ratio_tensors=round(est["est_tensors_gb"] / t, 3) if t > 0 else None,
                   tensors_after_gb=round(tallied["tally_end_bytes"] / GB, 4),
                   tensors_peak_op=tallied["tally_peak_op"])
    if result["device"] == "cuda":
        out["est_total_gb"] = round(est["est_total_gb"], 3)
        out["measured_peak_gb"] = round(result["peak_bytes"] / GB, 3)
    return out


def print_table(rows: list[dict], device: str) -> None:
    if device == "cuda":
        head = ("| case | batch x seq | estimate total GB | max_memory_allocated GB | estimate step GB | "
                "measured step GB | est/meas |")
        print(head + "\n|" + "---|" * 7)
        for r in rows:
            print(f"| {r['case']} | {r['batch']} x {r['seq']} | {r['est_total_gb']:.2f} | "
                  f"{r['measured_peak_gb']:.2f} | {r['est_step_gb']:.2f} | {r['measured_step_gb']:.2f} | "
                  f"{r['ratio']} |")
        return
    trim = "measured_trim_gb" in rows[0]
    tens = "measured_tensors_gb" in rows[0]
    head = ("| case | batch x seq | ckpt | estimate GB | measured GB | est/meas |"
            + (" estimate, no heap slack GB | measured, heap trimmed GB | est/meas |" if trim else "")
            + (" estimate, tensors GB | measured, live tensors GB | est/meas |" if tens else "")
            + " loaded: estimate GB | loaded: tensors GB | s/step |")
    print(head)
    print("|" + "---|" * head.count(" |"))
    for r in rows:
        # † marks a peak taken from the 2 ms sampler because the step did not raise the process's high-water mark.
        mark = "†" if r["peak_from"] == "sampled" else ""
        line = (f"| {r['case']} | {r['batch']} x {r['seq']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                f"{r['est_step_gb']:.3f} | {r['measured_step_gb']:.3f}{mark} | {r['ratio']} |")
        if trim:
            line += f" {r['est_live_gb']:.3f} | {r['measured_trim_gb']:.3f} | {r['ratio_trim']} |"
        if tens:
            line += f" {r['est_tensors_gb']:.3f} | {r['measured_tensors_gb']:.3f} | {r['ratio_tensors']} |"
        line += f" {r['est_static_gb']:.3f} | {r['tensor_gb']:.3f} | {r['step_seconds']} |"
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", help="one local model folder (or 'bundled') instead of the default cases")
    ap.add_argument("--case", action="append", help="run only the default cases of this name (repeatable)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--optimizer", choices=["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"],
                    help="default: paged_adamw_32bit on CPU (where it is not paged); adamw_torch on CUDA, because "
                    "paged state lives in unified memory that torch.cuda.max_memory_allocated does not count "
                    "(same 8 bytes per trainable weight)")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine may be shared)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per case")
    ap.add_argument("--also-trim", action="store_true",
                    help="CPU: measure each case a second time with MALLOC_TRIM_THRESHOLD_=131072, so glibc gives "
                    "freed heap back and RSS follows the live tensors (compared with the estimate minus its "
                    "allocator slack)")
    ap.add_argument("--tensors", action="store_true",
                    help="CPU: measure each case once more with a tally of the live tensors the step creates (a "
                    "TorchDispatchMode; peak over the steps), compared with the estimate minus its allocator "
                    "slack and runtime terms: the allocator's view, the same on every CPU")
    ap.add_argument("--tally", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help="where random models are written (default: a temp folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.optimizer is None:
        args.optimizer = "adamw_torch" if args.device == "cuda" else "paged_adamw_32bit"

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = measure_one(args.model, args.batch, args.seq, args.rank, args.optimizer, args.gradient_checkpointing,
                          args.steps, args.device, tally=args.tally)
        print(json.dumps(res))
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda needs a CUDA GPU; none is visible.", file=sys.stderr)
            return 2

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.model:
            cases = [(args.model, args.batch, args.seq, args.gradient_checkpointing)]
        else:
            cases = CUDA_CASES if args.device == "cuda" else CPU_CASES
            cases = [c for c in cases if not args.case or c[0] in args.case]
        built: dict[str, str] = {}
        for name, batch, seq, ckpt in cases:
            if name not in built:
                if name in TINY:
                    built[name] = str(make_random_model(Path(tmp) / name, TINY[name]))
                elif args.device == "cuda" and not Path(name).exists():
                    # Only one big random model on disk at a time (13B in bf16 is 26 GB).
                    for old in list(built.values()):
                        shutil.rmtree(old, ignore_errors=True)
                    built.clear()
                    built[name] = str(make_random_model(Path(tmp) / name, shape_dict(name), device="cuda"))
                else:
                    built[name] = name
            res = run_child(built[name], batch, seq, ckpt, args)
            trimmed = None
            if args.also_trim and args.device == "cpu":
                trimmed = run_child(built[name], batch, seq, ckpt, args, env={"MALLOC_TRIM_THRESHOLD_": "131072"})
            tallied = None
            if args.tensors and args.device == "cpu":
                tallied = run_child(built[name], batch, seq, ckpt, args, tally=True)
            plan_name = built[name] if name in TINY else name
            r = row(res, name, estimate_for(res, plan_name), trimmed, tallied)
            rows.append(r)
            if args.json:
                print(json.dumps(r | {"raw": res}), flush=True)
    if not args.json:
        print(f"\n{args.device}, rank {args.rank}, {args.optimizer}, {args.steps} steps, {args.threads} threads\n")
        print_table(rows, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
