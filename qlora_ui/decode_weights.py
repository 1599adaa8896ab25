"""Decode the chat base from its 4-bit weights dequantized once, where that is faster and the copy is small.

Without a fast 4-bit kernel, bitsandbytes dequantizes every NF4 weight again at each decode step (its plain layout:
dequantize, then `F.linear`): one 64-token reply on the bundled model does that 210 x 64 times. The chat engine's
own base (never the training model) may instead keep, beside each frozen 4-bit weight, its dequantization in the
compute dtype, and multiply by that. The values are the NF4 weights the adapter was trained against, not the
original 16-bit checkpoint, and the product is the plain layout's bit for bit (the same dequantization, the same
`F.linear`), so replies do not change.

Where it pays (docs/performance.md, one battle's decode on the bundled model, CPU seconds on 2 cores):
- a CPU without AVX512-BF16 (bitsandbytes' plain 4-bit path): 7.0-9.0 s in 4-bit, 4.6-5.6 s dequantized;
- a CPU with AVX512-BF16: bitsandbytes repacks each 4-bit weight for a fused kernel (`gemv_4bit`) that is as fast
  as a bf16 matmul per layer and reads 4x fewer bytes per token; decoding is memory-bound, so there the 4-bit path
  was faster (3.6-4.5 s against 4.6-5.6 s) and `auto` keeps it;
- a GPU: bitsandbytes' CUDA kernels; `auto` keeps 4-bit.

Budget (`--chat-dequantize auto`): the copy must be at most `MAX_BYTES` (1 GiB) and at most `MAX_RAM_SHARE` (10%)
of the RAM available when the base loads. A copy costs 2 bytes per weight in bf16 (4x the 4-bit size, 4 bytes at
an fp32 compute dtype): 212 MB on the bundled SmolLM2-135M, ~2.5 GB on a 1.2B model, which stays in 4-bit.
`on` dequantizes whatever the size and kernel, `off` never.

The layers stay `bnb.nn.Linear4bit` (a subclass, only `forward` differs), so peft wraps them exactly as before:
its LoRA and mixed-adapter code call `base_layer(x)` and never see the difference.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]
MODES: tuple[str, ...] = ("auto", "on", "off")
# The flag's help, shared by the app (app.py) and `python -m qlora_ui serve` (cli.py).
FLAG_HELP = ("Chat decodes from its base's 4-bit weights dequantized once (2 bytes of RAM per weight; 1.6x faster "
             "where bitsandbytes has no fused kernel): auto = on a CPU without AVX512-BF16 when the copy is at most "
             "1 GiB and 10%% of the available RAM (default), on, or off. Training never uses it. See "
             "docs/performance.md.")
MAX_BYTES = 1 << 30
MAX_RAM_SHARE = 0.10

def _linear4bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _compute_dtype(layer):
    import torch

    return layer.compute_dtype if layer.compute_dtype is not None else torch.float32


def dense_bytes(model) -> int:
    """Bytes the dequantized copies of `model`'s 4-bit layers would take, in each layer's compute dtype."""
    import torch

    total = 0
    for layer in _linear4bit_layers(model):
        rows, cols = layer.weight.quant_state.shape
        total += rows * cols * torch.empty((), dtype=_compute_dtype(layer)).element_size()
    return total


def available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def fast_4bit_kernel(model) -> str | None:
    """The fast kernel bitsandbytes will decode `model`'s 4-bit layers with, or None (its plain dequantize path)."""
    layers = _linear4bit_layers(model)
    if any(layer.weight.device.type != "cpu" for layer in layers):
        return "bitsandbytes' GPU kernel"
    # Linear4bit repacks for its fused CPU kernel only where this flag is set (AVX512-BF16 present, and
    # modeling.keep_4bit_layout_trainable not called: the DoRA layout keeps it off).
    if any(getattr(layer, "support_avx512bf16_for_cpu", False) for layer in layers):
        return "bitsandbytes' AVX512-BF16 kernel"
    return None


def should_dequantize(model, mode: Mode) -> tuple[bool, str]:
    """(whether to decode from dequantized copies, why), following `mode`; auto applies the budget above."""
    if mode not in MODES:
        raise ValueError(f"chat dequantize mode {mode!r}: use one of {', '.join(MODES)}")
    if not _linear4bit_layers(model):
        return False, "no 4-bit layers"
    need = dense_bytes(model)
    if mode != "auto":
        return mode == "on", f"--chat-dequantize {mode}"
    if (kernel := fast_4bit_kernel(model)) is not None:
        return False, f"{kernel} is faster than a dequantized copy"
    limit = min(MAX_BYTES, int(MAX_RAM_SHARE * available_ram()))
    if need > limit:
        return False, f"the copy ({need / 2**20:.0f} MiB) is over the budget ({limit / 2**20:.0f} MiB)"
    return True, f"the copy ({need / 2**20:.0f} MiB) is within the budget ({limit / 2**20:.0f} MiB)"


@functools.cache
def _dense_linear4bit():
    """The Linear4bit subclass whose forward multiplies by `dense_weight` (made once, bitsandbytes imported late:
    the engine modules import nothing heavy at import time)."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    class DequantizedLinear4bit(bnb.nn.Linear4bit):
        """A frozen Linear4bit that decodes from its weight dequantized once (`dense_weight`). Same dtype
        handling as Linear4bit.forward: the input in the compute dtype, the output back in the input's."""

        def forward(self, x):
            inp_dtype = x.dtype
            x = x.to(self.dense_weight.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dense_weight, bias).to(inp_dtype)

    return DequantizedLinear4bit


def dequantize_for_decoding(model) -> int:
    """Give each 4-bit layer of `model` its dequantized weight and the forward that uses it; returns the bytes added.

    Must run before the model's first forward: on a CPU with AVX512-BF16 that forward repacks the 4-bit bytes
    into a layout `dequantize_4bit` does not read (chat.py's note on DoRA)."""
    import bitsandbytes.functional as bf

    cls, added = _dense_linear4bit(), 0
    for layer in _linear4bit_layers(model):
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer was already repacked for CPU inference; dequantize before decoding")
        # Dequantized straight into the compute dtype, as bitsandbytes' plain-layout forward does (the layout
        # training uses): a bf16 checkpoint's weights land in fp32 without a detour through bf16.
        state = copy.copy(layer.weight.quant_state)
        state.dtype = _compute_dtype(layer)
        w = bf.dequantize_4bit(layer.weight.data, state)
        # Not persistent: never saved with the model, and the 4-bit weight stays (peft's DoRA and merges read it).
        layer.register_buffer("dense_weight", w.contiguous(), persistent=False)
        layer.__class__ = cls
        added += w.numel() * w.element_size()
    return added


def is_dequantized(model) -> bool:
    return any(hasattr(m, "dense_weight") for m in _linear4bit_layers(model))
