"""One autograd function per LoRA layer: the frozen (4-bit) projection and the adapter in one forward and one
backward, instead of peft's chain of modules.

peft's LoRA layer over a bitsandbytes 4-bit layer runs, per call: the 4-bit matmul (dequantize, matmul), a defensive
`clone()` of its output, the adapter's two matmuls, a multiplication by the scaling and an addition — three passes
over a (tokens x out_features) tensor besides the matmuls, each run again in the recompute of gradient checkpointing,
and the backward dequantizes the weight once more. On a CPU, where the matmuls of a small model are short, those
passes and the dispatch around them were a quarter of a training step (profile in docs/performance.md). Here:

    forward   y = x @ W.T, then y += s * (x @ A.T) @ B.T in place (one addmm: no clone, no separate mul or add)
    backward  g @ B -> gB (tokens x r); dx = g @ W, then dx += s * gB @ A in place;
              dA = s * gB.T @ x, dB = s * g.T @ (x @ A.T)

The quantity is the same as peft's: `tests/test_fused_lora.py` compares loss and LoRA gradients with the plain path.
With gradient checkpointing and no recompute cache, the dequantized weight of the recompute is kept for the
backward that follows it at once (one layer's weights alive at a time) instead of being dequantized a third
time; otherwise it is dequantized again in the backward, as bitsandbytes does, so the whole model is never held
in 16-bit.

Under gradient checkpointing a layer's matmuls run twice: in the forward, and again in the recompute just before
its backward. `RecomputeCache` keeps the fused layers' outputs from the forward, up to a byte budget
(`checkpoint_cache_mb`), and the recompute takes them instead of multiplying again: the same values (the
computation is deterministic and the weights do not change within a step), with what is kept bounded by the budget.
Norms, rotary embeddings and attention are still recomputed.

Used only where it is exact and simple: training mode, bf16/fp16 autocast on (the engine's mixed precision), one
active plain LoRA adapter (no DoRA or other variants, not merged, no per-row adapter names), a weight not repacked
for CPU inference. Anything else takes peft's own forward.
"""

from __future__ import annotations

import logging
import types

log = logging.getLogger(__name__)

_IN_USE = "_qlora_studio_fused"


def _dequantized(weight, dtype):
    """The frozen weight as a dense (out_features x in_features) tensor in `dtype`."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)


class RecomputeCache:
    """Fused layers' outputs from the forward under gradient checkpointing, for the recompute that comes before
    each layer's backward. The forward runs outside the autograd engine and the recompute inside it (in backward),
    which is how the two are told apart. At most `budget` bytes are kept: the first layers of a step fill it.

    An output is handed over only to a recompute whose input matches the forward's (shape and a sample of its
    values): a step that ran two forwards before its backward, or a stopped step's leftovers, make the recompute
    compute instead, never take another forward's output. With a cache the layers keep no dequantized weight for
    the backward, so what each layer saves never depends on whether the cache had its output (checkpointing
    compares the forward's saved tensors with the recompute's)."""

    SAMPLE = 16

    def __init__(self, budget_bytes: int):
        self.budget, self.used, self.entries, self.sizes = budget_bytes, 0, {}, {}
        self.hits = 0

    @staticmethod
    def in_recompute() -> bool:
        import torch

        return torch._C._current_graph_task_id() != -1

    def _sample(self, x):
        flat = x.reshape(-1)
        return flat[:: max(1, flat.numel() // self.SAMPLE)][: self.SAMPLE]

    def _drop(self, module) -> None:
        self.entries.pop(module, None)
        self.used -= self.sizes.pop(module, 0)

    def store(self, module, x, y) -> None:
        """Keep this forward's output if it fits (what an earlier forward left for this layer is dropped first)."""
        self._drop(module)
        size = y.numel() * y.element_size()
        if self.used + size > self.budget:
            return
        self.entries[module] = (x.shape, self._sample(x).clone(), y.detach())
        self.sizes[module] = size
        self.used += size

    def take(self, module, x):
        """The forward's output for this recompute, or None (not kept, or kept for another input)."""
        entry = self.entries.get(module)
        self._drop(module)
        if entry is None:
            return None
        shape, sample, y = entry
        if shape != x.shape or not self._sample(x).equal(sample):
            return None
        self.hits += 1
        return y


class FusedLoRALinear:
    """Namespace for the autograd function (built lazily so importing this module does not import torch)."""

    _fn = None

    @classmethod
    def fn(cls):
        if cls._fn is None:
            cls._fn = _make_function()
        return cls._fn


def _make_function():
    import torch

    class _FusedLoRALinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling: float, keep_weight: bool, dtype,
                    cached: list):
            # x: (..., in); x_lora: the adapter's input (x after dropout), or None when it is x itself. cached:
            # [this layer's output from the forward] in a recompute that has it, else [None] (a list, so autograd
            # does not take it for an input).
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            xl2 = x2 if x_lora is None else x_lora.reshape(-1, shape[-1]).to(dtype)
            a = lora_a.to(dtype)
            xa = xl2 @ a.t()
            w = None
            if cached[0] is not None:
                y = cached[0].reshape(-1, cached[0].shape[-1])
            else:
                w = _dequantized(weight, dtype)
                y = x2 @ w.t()
                y.addmm_(xa, lora_b.to(dtype).t(), alpha=scaling)
                if bias is not None:
                    y += bias.to(dtype)
            # keep_weight is off wherever a cache is in use (RecomputeCache says why).
            ctx.save_for_backward(x2, xl2 if x_lora is not None else None, xa, lora_a, lora_b,
                                  w if keep_weight else None)
            ctx.weight, ctx.scaling, ctx.dtype, ctx.shape = weight, scaling, dtype, shape
            ctx.has_bias, ctx.separate_lora_input = bias is not None, x_lora is not None
            return y.reshape(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x2, xl2, xa, lora_a, lora_b, w = ctx.saved_tensors
            s, dtype = ctx.scaling, ctx.dtype
            if xl2 is None:
                xl2 = x2
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            gb = g @ b  # (tokens x r)
            dx = dxl = None
            if ctx.needs_input_grad[0]:
                if w is None:
                    w = _dequantized(ctx.weight, dtype)
                dx = g @ w
                if ctx.separate_lora_input:
                    dxl = (gb @ a).mul_(s).reshape(ctx.shape)
                else:
                    dx.addmm_(gb, a, alpha=s)
                dx = dx.reshape(ctx.shape)
            elif ctx.needs_input_grad[1]:
                dxl = (gb @ a).mul_(s).reshape(ctx.shape)
            da = (gb.t() @ xl2).mul_(s).to(lora_a.dtype) if ctx.needs_input_grad[4] else None
            db = (g.t() @ xa).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[5] else None
            dbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
            return dx, dxl, None, dbias, da, db, None, None, None, None

    return _FusedLoRALinear


def _fused_forward(self, x, *args, **kwargs):
    """Replaces a peft LoRA layer's forward; falls back to it wherever the fused path is not exact."""
    import torch

    device_type = x.device.type
    adapters = self.active_adapters
    if (not self.training or args or kwargs or self.merged or self.disable_adapters or len(adapters) != 1
            or not torch.is_autocast_enabled(device_type)):
        return self._qlora_studio_peft_forward(x, *args, **kwargs)
    name = adapters[0]
    weight = self.get_base_layer().weight
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)):
        return self._qlora_studio_peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x_lora = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    self._qlora_studio_calls += 1
    dtype = torch.get_autocast_dtype(device_type)
    cache = self._qlora_studio_cache
    recompute = cache is not None and cache.in_recompute()
    cached = [cache.take(self, x) if recompute else None]
    y = FusedLoRALinear.fn().apply(
        x, x_lora, weight, self.get_base_layer().bias, self.lora_A[name].weight, self.lora_B[name].weight,
        float(self.scaling[name]), self._qlora_studio_keep_weight and cache is None, dtype, cached)
    if cache is not None and not recompute:
        cache.store(self, x, y)
    return y


def fuse_lora_layers(model, keep_weight: bool, cache: RecomputeCache | None = None) -> int:
    """Switch every plain LoRA linear layer of a peft model (over a 4-bit or a 16-bit linear) to the fused
    forward. `keep_weight`: keep the dequantized weight from forward to backward — only right under gradient
    checkpointing, where the forward that keeps it is the recompute run just before that layer's backward.
    `cache`: under gradient checkpointing, outputs the recompute takes instead of recomputing (one cache for the
    model). Returns the number of layers switched."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes
        LoraLinear4bit = LoraLinear
    n = 0
    for module in model.modules():
        if not isinstance(module, (LoraLinear, LoraLinear4bit)) or getattr(module, _IN_USE, False):
            continue
        base = module.get_base_layer()
        if not isinstance(base, torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
            continue
        module._qlora_studio_peft_forward = module.forward
        module._qlora_studio_keep_weight = keep_weight
        module._qlora_studio_cache = cache
        module._qlora_studio_calls = 0
        module.forward = types.MethodType(_fused_forward, module)
        setattr(module, _IN_USE, True)
        n += 1
    return n


def fused_calls(model) -> int:
    """How many forwards took the fused path so far (for tests and the training log)."""
    return sum(getattr(m, "_qlora_studio_calls", 0) for m in model.modules())


def fuse_for_training(model, tr) -> int:
    """The fused layers as a run's training settings ask (tr: TrainingConfig): with gradient checkpointing and a
    cache budget, a RecomputeCache; without a cache, the recompute's dequantized weight is kept for the backward
    that follows it at once (RecomputeCache says why not with a cache); without checkpointing, keeping it would hold
    every layer's weight in 16 bits, so it is dequantized again in backward."""
    cache = (RecomputeCache(tr.checkpoint_cache_mb * 2**20)
             if tr.gradient_checkpointing and tr.checkpoint_cache_mb > 0 else None)
    n = fuse_lora_layers(model, keep_weight=tr.gradient_checkpointing, cache=cache)
    log.info("fused LoRA layers: %d%s", n, f"; recompute cache {tr.checkpoint_cache_mb} MB" if cache else "")
    return n
