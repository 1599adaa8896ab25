"""LoftQ initialisation of a 4-bit LoRA model, on whatever device the model is on.

LoftQ (Li et al., 2023) starts the adapter at the best rank-r correction of the 4-bit rounding error instead of
at zero: with W the original 16-bit weight and Q its dequantized NF4 copy, the residual W - Q is factored by SVD
and B·A·scaling is set to its top-r part, so that Q + B·A·scaling is closer to W than Q is.

peft 0.21 has this as `replace_lora_weights_loftq`, but its helpers hard-code a CUDA/XPU device and fail on a
CPU-only torch ("Torch not compiled with CUDA enabled"). This module runs the same algorithm (one step: the
frozen 4-bit weights are already quantized, so only the adapter can move) on the model's own device, and uses
peft's function when the model is on a GPU. Both then divide A and B by sqrt(scaling): peft sets B·A to the
residual and leaves the LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) on top, which over- or
under-corrects whenever the scaling is not 1; with the division B·A·scaling equals the residual's top-r part.
The saved adapter is plain PEFT: it loads on the same 4-bit base like any other.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoftQError  # the error family's; importable from here as before

log = logging.getLogger(__name__)
PREFIX = "base_model.model."
# Who hears "LoftQ layer i/N" while apply_loftq runs (a training job's _set_phase): LoftQ takes minutes on a busy
# machine, and the progress line said only "loading model". A context variable, set by the job in its own thread,
# so the engine reports without a parameter through modeling.load_for_training and two jobs never hear each other.
PHASE: contextvars.ContextVar = contextvars.ContextVar("loftq_phase", default=None)


@dataclass
class LoftQReport:
    layers: int = 0
    seconds: float = 0.0
    # Per layer: relative Frobenius error of the quantized layer against the original weight, plain NF4
    # (adapter at zero) and with the LoftQ-initialised adapter.
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def mean_before(self) -> float:
        return sum(b for b, _ in self.errors.values()) / max(len(self.errors), 1)

    @property
    def mean_after(self) -> float:
        return sum(a for _, a in self.errors.values()) / max(len(self.errors), 1)

    def summary(self) -> str:
        return (f"LoftQ: {self.layers} layers initialised in {self.seconds:.1f} s; relative error of the 4-bit "
                f"weights against the original, mean over layers: {self.mean_before:.4f} plain, "
                f"{self.mean_after:.4f} with the adapter")


class SafetensorsWeights:
    """Reads single tensors from a model folder's *.safetensors files (one file or shards) without loading the
    rest: the unquantized weights are needed one layer at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise LoftQError(f"LoftQ needs the model's original 16-bit weights as .safetensors files, and "
                             f"{self.folder.name} has none. Use lora_init default, or a model folder with "
                             "safetensors weights.")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():
                    self._where[k] = f

    def get(self, name: str):
        from safetensors import safe_open

        candidates = [name] + ([name.split(".", 1)[1]] if "." in name else [])  # with or without "model."
        for key in candidates:
            if key in self._where:
                with safe_open(str(self._where[key]), framework="pt", device="cpu") as h:
                    return h.get_tensor(key)
        raise LoftQError(f"LoftQ: the weight {name} is not in the model's safetensors files.")


def _dequantized(layer):
    import bitsandbytes.functional as F

    w = layer.weight
    return F.dequantize_4bit(w.data, w.quant_state).float()


def loftq_factors(q, w, rank: int):
    """(A, B) with B @ A the best rank-`rank` approximation of w - q (both float32), peft's split of the
    singular values: B = U sqrt(S), A = sqrt(S) Vh."""
    import torch

    u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def relative_error(w, q, delta=None) -> float:
    approx = q if delta is None else q + delta
    return float((w - approx).norm() / w.norm())


def _lora_4bit_layers(model, adapter: str):
    from peft.tuners.lora import Linear4bit

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and adapter in module.lora_A:
            if not name.startswith(PREFIX):
                raise LoftQError("LoftQ needs a peft model (get_peft_model) with LoRA on 4-bit layers.")
            yield name[len(PREFIX):], module


def apply_loftq(model, model_path: str | Path, adapter: str = "default") -> LoftQReport:
    """Set every 4-bit LoRA layer's A and B by LoftQ; returns the per-layer errors before and after."""
    import torch

    t0 = time.time()
    report = LoftQReport()
    layers = list(_lora_4bit_layers(model, adapter))
    if not layers:
        raise LoftQError("LoftQ found no 4-bit LoRA layer: it needs load_in_4bit on.")
    say = PHASE.get() or (lambda phase: None)
    n = len(layers)
    say(f"LoftQ: reading the 16-bit weights of {n} layers")
    weights = SafetensorsWeights(model_path)
    on_gpu = next(model.parameters()).is_cuda
    if on_gpu:
        say(f"LoftQ: {n} layers on the GPU (peft)")
        from peft.utils.loftq_utils import replace_lora_weights_loftq

        files = sorted(Path(model_path).glob("*.safetensors"))
        replace_lora_weights_loftq(model, model_path=str(files[0]) if len(files) == 1 else str(model_path),
                                   adapter_name=adapter)
    with torch.no_grad():
        for i, (name, module) in enumerate(layers, 1):
            say(f"LoftQ layer {i}/{n} ({name})")
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            w = weights.get(name + ".weight").to(lora_a.device, torch.float32)
            q = _dequantized(module.base_layer)
            if on_gpu:  # peft has set them; read back what it set
                a, b = lora_a.float(), lora_b.float()
            else:
                a, b = loftq_factors(q, w, module.r[adapter])
            scale = module.scaling[adapter]
            a, b = a / scale ** 0.5, b / scale ** 0.5
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            delta = (lora_b.float() @ lora_a.float()) * scale
            report.errors[name] = (relative_error(w, q), relative_error(w, q, delta))
            del w, q
    report.layers, report.seconds = len(layers), time.time() - t0
    log.info(report.summary())
    return report
