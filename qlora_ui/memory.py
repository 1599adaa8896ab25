"""Will it fit? Training-memory estimates from a model config alone (no weights are loaded); plan.py turns them
into a verdict, advice and the text the UI and the CLI show.

Four methods are compared, each split into the same six parts (docs/memory.md has the derivations and the
measurements that check them):

    weights          frozen or trained base weights
    quant_constants  NF4 block constants (absmax), QLoRA only
    adapter          LoRA A/B matrices
    gradients        one gradient per *trainable* parameter
    optimizer        Adam's two moments per trainable parameter
    activations      tensors autograd keeps for backward, plus the largest transient buffers

Numbers follow Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314):

* Full 16-bit fine-tuning of LLaMA-65B "requires more than 780 GB of GPU memory" (Sec. 1). That figure is
  16-bit weights + 16-bit gradients + 32-bit Adam moments: 2 + 2 + 8 = 12 bytes/param x 65B = 780 GB
  (mixed precision with an fp32 master copy would be 16 bytes/param; the paper's figure does not include one).
* NF4 stores 4 bits per weight plus one fp32 absmax per block of 64: 32/64 = 0.5 bits/param. Double
  quantization stores the absmax as 8-bit floats in blocks of 256 with one fp32 constant each:
  8/64 + 32/(64*256) = 0.127 bits/param, a saving of 0.373 bits/param, ~3 GB at 65B (Sec. 3).
* LoRA gradients and optimizer state exist only for adapter weights (Sec. 2); paged optimizers (Sec. 3) keep
  the optimizer state in CUDA unified memory, so on a GPU it can spill to CPU RAM under pressure.

GB here are 10^9 bytes, as in the paper's 780 GB. The engine never imports gradio; torch is imported only to
detect the device, so planning works without a GPU and without loading a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .accelerate_configs import offloads_params, strategy_of
from .config import RunConfig
from .errors import ConfigError

# Re-exported: callers (the UI, benches, tests) name the planner's shapes through this module.
from .shapes import LINEARS, ModelShape, ShapeError, known_shapes, resolve_shape, shape_from_config  # noqa: F401

GB = 1e9

PARTS = ("weights", "quant_constants", "adapter", "gradients", "optimizer", "activations")
METHODS = {
    "full_finetune": "Full 16-bit fine-tuning",
    "lora_16bit": "16-bit LoRA",
    "qlora_no_double_quant": "QLoRA (NF4)",
    "qlora": "QLoRA (NF4 + double quant)",
}

# NF4: 4 bits per weight; one fp32 absmax per 64 weights (32/64 bits); with double quantization the absmax is
# 8-bit in blocks of 256 with an fp32 second-level constant: 8/64 + 32/(64*256) bits (QLoRA Sec. 3).
NF4_BITS = 4.0
BLOCK = 64
BLOCK2 = 256
CONST_BITS_SINGLE = 32 / BLOCK
CONST_BITS_DOUBLE = 8 / BLOCK + 32 / (BLOCK * BLOCK2)

# Measured on CPU (bench/measure_memory.py): RSS a first training step adds that no tensor accounts for —
# autograd engine, bitsandbytes/oneDNN kernels and thread pools, glibc arenas. Not present on CUDA, where
# torch.cuda.max_memory_allocated counts tensors only.
CPU_RUNTIME_BYTES = 25e6
# glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB), and the share of the
# per-layer tensors below it that stays in the heap after being freed (cpu_allocator_slack).
GLIBC_MMAP_MAX = 32 * 2**20
CPU_SLACK_SHARE = 0.45


# ---------------------------------------------------------------- settings

Device = Literal["cuda", "cpu"]
Precision = Literal["app", "paper"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]
STRATEGIES = {"ddp": "DDP", "fsdp": "FSDP", "deepspeed": "DeepSpeed ZeRO-3"}
OPTIMIZER_STATE_BYTES = {"paged_adamw_32bit": 8, "adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2}


@dataclass(frozen=True)
class PlanSettings:
    """Everything besides the model shape that the estimate depends on."""

    batch: int = 4
    seq: int = 512
    rank: int = 16
    targets: str = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    load_in_4bit: bool = True
    double_quant: bool = True
    quant_type: str = "nf4"
    compute_dtype: str = "bf16"
    # "app": what qlora_ui.modeling builds — peft's prepare_model_for_kbit_training upcasts embeddings, norms
    # and lm_head to fp32 and peft keeps LoRA weights in fp32. "paper": artidoro/qlora with --bf16 casts the
    # LoRA layers, embeddings and lm_head back to bf16.
    precision: Precision = "app"
    device: Device = "cuda"
    # Several processes (docs/memory.md, "Several processes"): the estimate is then per device. DDP replicates
    # the model on each; FSDP and DeepSpeed ZeRO-3 shard it.
    processes: int = 1
    strategy: Strategy = "ddp"
    # FSDP offload_params / ZeRO-3 offload_param_device: the shards (and their gradients and optimizer state)
    # live in CPU RAM; the GPU keeps only the gathered units and the activations.
    offload: bool = False
    # DPO / ORPO (training.method): every row is two sequences, chosen and rejected, run as one batch of 2 x batch;
    # DPO's reference pass is a no-grad forward of the same batch whose activations are freed layer by layer.
    preference: bool = False
    # DPO's head: TRL 1.16's DPOTrainer computes the answer tokens' log-probs in tiles (its fused LM head), never the
    # whole logits; ORPO's trainer computes full logits like the plain SFT head.
    chunked_head: bool = False
    # training.mixed_precision: autocast around forward + loss (16-bit attention and LoRA inputs saved).
    mixed_precision: bool = True
    # The app's recompute cache (training.checkpoint_cache_mb, qlora_ui/fused_lora.py): under checkpointing, up
    # to this many bytes of layer outputs kept from the forward for the recompute.
    recompute_cache: int = 0

    @classmethod
    def from_config(cls, run: RunConfig, **overrides) -> PlanSettings:
        t, q, lo = run.training, run.quantization, run.lora
        # TRL's preference trainers switch every dropout off (disable_dropout=True), LoRA's too: no dropout masks,
        # and adapters on one input share its saved tensor.
        sft = getattr(t, "method", "sft") == "sft"
        s = cls(batch=t.batch_size, seq=run.data.max_length, rank=lo.lora_r, targets=lo.target_modules,
                lora_dropout=lo.lora_dropout if sft else 0.0, optimizer=t.optimizer,
                gradient_checkpointing=t.gradient_checkpointing,
                load_in_4bit=q.load_in_4bit, double_quant=q.double_quant, quant_type=q.quant_type,
                compute_dtype=q.compute_dtype, processes=max(1, int(getattr(t, "processes", 1) or 1)),
                preference=not sft, chunked_head=getattr(t, "method", "sft") == "dpo",
                mixed_precision=getattr(t, "mixed_precision", True),
                recompute_cache=(t.checkpoint_cache_mb * 2**20 if t.gradient_checkpointing and t.fused_lora
                                 and t.mixed_precision and sft else 0),
                **_strategy_of(getattr(t, "accelerate_config", "")))
        return dataclasses.replace(s, **overrides)

    @property
    def sharded(self) -> bool:
        """FSDP / ZeRO-3 across more than one process: model, adapter, gradients and optimizer state split N ways."""
        return self.processes > 1 and self.strategy in ("fsdp", "deepspeed")

    @property
    def method(self) -> str:
        """The method this config trains with."""
        if not self.load_in_4bit:
            return "lora_16bit"
        return "qlora" if self.double_quant else "qlora_no_double_quant"


def _strategy_of(accelerate_config: str) -> dict:
    """{"strategy", "offload"} for a recipe name; plain data parallel when none is named (or it is unknown: the
    config's own validation reports that, the planner keeps planning)."""
    if not (accelerate_config or "").strip():
        return {"strategy": "ddp", "offload": False}
    try:
        return {"strategy": strategy_of(accelerate_config), "offload": offloads_params(accelerate_config)}
    except ConfigError:
        return {"strategy": "ddp", "offload": False}


# ---------------------------------------------------------------- the estimate

def estimate(shape: ModelShape, s: PlanSettings) -> dict[str, dict[str, float]]:
    """Bytes per method and part. Each formula is written out in docs/memory.md."""
    n_all = shape.total_params
    n_q = shape.quantized_params
    n_lora = shape.lora_params(s.rank, s.targets)
    opt = OPTIMIZER_STATE_BYTES.get(s.optimizer, 8)
    adapter = 4 if s.precision == "app" else 2  # peft autocasts adapters to fp32; the paper's code uses bf16
    frozen_16 = 2  # bf16/fp16 copy of every frozen weight
    u_bytes = unquantized_bytes(s)
    unquantized = (n_all - n_q) * u_bytes

    out: dict[str, dict[str, float]] = {}
    out["full_finetune"] = _parts(weights=frozen_16 * n_all, gradients=2 * n_all, optimizer=opt * n_all,
                                  activations=activation_bytes(shape, s, kind="full"))
    lora_common = {"adapter": adapter * n_lora, "gradients": adapter * n_lora, "optimizer": opt * n_lora}
    out["lora_16bit"] = _parts(weights=frozen_16 * n_all, **lora_common,
                               activations=activation_bytes(shape, s, kind="lora_16bit"))
    q_weights = n_q * NF4_BITS / 8 + unquantized
    q_act = activation_bytes(shape, s, kind="qlora")
    out["qlora_no_double_quant"] = _parts(weights=q_weights, quant_constants=n_q * CONST_BITS_SINGLE / 8,
                                          **lora_common, activations=q_act)
    out["qlora"] = _parts(weights=q_weights, quant_constants=n_q * CONST_BITS_DOUBLE / 8, **lora_common,
                          activations=q_act)
    if s.processes > 1:
        out = {m: per_device(shape, s, m, parts, u_bytes) for m, parts in out.items()}
    return out


def unquantized_bytes(s: PlanSettings) -> int:
    """Bytes per QLoRA parameter that is not 4-bit (embeddings, norms, lm_head)."""
    # After prepare_model_for_kbit_training every non-4-bit parameter is fp32. Sharded QLoRA skips that upcast
    # and loads the whole model in the storage dtype (bf16): FSDP flattens each unit into one tensor of one dtype.
    return 4 if s.precision == "app" and not s.sharded else 2


def per_device(shape: ModelShape, s: PlanSettings, method: str, parts: dict[str, float],
               u_bytes: int) -> dict[str, float]:
    """One device's share of a method's parts when `s.processes` > 1. Activations stay per device: each
    process runs its own batch of `s.batch` examples.

    DDP: every part is replicated; the reducer also keeps its own bucketed copy of the trainable gradients.
    FSDP / ZeRO-3: weights, constants, adapter, gradients and optimizer state are split N ways, and the
    device also holds the full weights of the units gathered for compute (gathered_bytes).
    """
    p = dict(parts)
    if not s.sharded:
        p["gradients"] *= 2
        return p
    for k in ("weights", "quant_constants", "adapter", "gradients", "optimizer"):
        p[k] = 0.0 if s.offload else p[k] / s.processes
    p["weights"] += gathered_bytes(shape, method, u_bytes)
    return p


def offloaded_bytes(shape: ModelShape, s: PlanSettings, method: str) -> float:
    """CPU RAM each process holds with offload: its shard of everything but the activations."""
    if not (s.sharded and s.offload):
        return 0.0
    full = estimate(shape, dataclasses.replace(s, offload=False))[method]
    gathered = gathered_bytes(shape, method, unquantized_bytes(s))
    return sum(v for k, v in full.items() if k != "activations") - gathered


def gathered_bytes(shape: ModelShape, method: str, u_bytes: int) -> float:
    """Unsharded weights a sharded device holds at its peak: two decoder layers (the one computing and the one
    prefetched for backward, BACKWARD_PRE) and the root unit (embeddings, lm_head, final norm), which FSDP
    keeps gathered from forward to backward. A QLoRA layer is gathered as packed 4-bit + constants."""
    layer_linear = sum(a * b for a, b in shape.linears().values())
    norms = 2 * shape.hidden
    if method.startswith("qlora"):
        const = CONST_BITS_DOUBLE if method == "qlora" else CONST_BITS_SINGLE
        layer = layer_linear * (NF4_BITS + const) / 8 + norms * u_bytes
        root_bytes = u_bytes
    else:
        layer, root_bytes = (layer_linear + norms) * 2, 2
    counts = shape.param_counts()
    return 2 * layer + (counts["embeddings"] + counts["lm_head"] + shape.hidden) * root_bytes


def _parts(**values: float) -> dict[str, float]:
    return {p: float(values.get(p, 0.0)) for p in PARTS}


def _stream_bytes(s: PlanSettings, kind: str) -> int:
    # QLoRA's fp32 norms make the residual stream fp32; sharded QLoRA keeps the whole model in bf16 (no upcast).
    return 4 if kind == "qlora" and not s.sharded else 2


def _autocast(s: PlanSettings) -> bool:
    # As training.py decides: bf16/fp16 autocast with training.mixed_precision; on the CPU bf16 only (no fp16 CPU
    # kernels worth having).
    return s.mixed_precision and (s.compute_dtype == "bf16" or (s.compute_dtype == "fp16" and s.device == "cuda"))


def layer_saved_tensors(shape: ModelShape, s: PlanSettings, kind: str) -> dict[str, float]:
    """Bytes per token that autograd keeps for backward in one decoder layer, tensor by tensor.

    Checked tensor by tensor against torch.autograd.graph.saved_tensors_hooks on this stack (docs/memory.md).
    Element sizes follow what the stack really holds. QLoRA: prepare_model_for_kbit_training makes the norms
    fp32, so every norm output is fp32, and bitsandbytes' Linear4bit casts its output back to its input's
    dtype: the residual stream and every projection output are fp32 (4 bytes) although the matmuls run in
    bf16, and MatMul4Bit saves only the packed 4-bit weight. 16-bit LoRA and full fine-tuning keep 2-byte
    activations. The LoRA branch runs in the adapter dtype. Under the Trainer's bf16 autocast (training.py: on a GPU,
    and on the CPU with mixed_precision) the attention kernel and the LoRA matmuls save 16-bit copies of their
    inputs (tests/test_memory.py checks both against autograd's saved tensors on the CPU).
    """
    h, i = shape.hidden, shape.intermediate
    qd, kvd = shape.heads * shape.hd, shape.kv_heads * shape.hd
    e = _stream_bytes(s, kind)  # residual stream and MLP elementwise ops (autocast leaves them alone)
    ac = _autocast(s)
    e_attn = 2 if ac else e  # SDPA is on autocast's 16-bit list
    a = 4 if s.precision == "app" else 2  # adapter dtype: where LoRA's input is cast and dropped out
    a_saved = 2 if ac else a  # what lora_A / lora_B keep for their weight gradients
    out = {
        "layer input (RMSNorm input)": e * h,
        "post-attention residual": e * h,
        # Flash / memory-efficient SDPA keeps q, k, v, the output and a log-sum-exp: no seq x seq matrix.
        "rotated q": e_attn * qd, "rotated k": e_attn * kvd, "v": e_attn * kvd, "attention output": e_attn * qd,
        "attention log-sum-exp, norm statistics": 4 * shape.heads + 8,
    }
    if shape.gated_mlp:
        out.update({"gate output (SiLU input)": e * i, "SiLU output": e * i, "up output": e * i})
    else:
        out.update({"fc1 output (activation input)": e * i, "activation output": e * i})
    if kind == "full":
        # Training every weight also keeps each linear's input for its weight gradient, and the normalized rows
        # for the norm weights.
        out.update({"norm outputs (q/k/v and gate/up input)": 2 * e * h, "o_proj input": e * qd,
                    "down_proj input": e * i, "normalized rows for norm weights": 2 * e * h})
        return out
    # LoRA: lora_A's weight gradient needs its (dropped-out) input, lora_B's needs lora_A's output. Each adapter
    # draws its own dropout mask, so q, k and v each keep a copy of the same input. The mask is a bool on CUDA
    # (fused native_dropout) but a tensor of the input's dtype on CPU (x * noise).
    mask = (a if s.device == "cpu" else 1) if s.lora_dropout > 0 else 0
    shared: dict[str, float] = {}
    for name, (d_in, _) in shape._targets(s.targets).items():
        if s.lora_dropout > 0 or a_saved != e:
            out[f"{name} LoRA input"] = (a_saved + mask) * d_in
        else:  # no dropout, same dtype: adapters on one input share the saved tensor
            shared[_input_group(name)] = a_saved * d_in
        out[f"{name} lora_A output"] = a_saved * s.rank
    for group, b in shared.items():
        out[f"{group} (shared LoRA input)"] = b
    return out


def activation_bytes(shape: ModelShape, s: PlanSettings, kind: str) -> float:
    """Peak activation bytes of one training step (batch x seq tokens), largest transient buffers included:

    stored  = with checkpointing, each layer's input (L x e*h per token); without, every layer's saved tensors
    peak    = stored + max(loss phase, one layer's backward)
      loss phase  = 12 bytes per logit: log_softmax output, nll_loss's gradient and the logits' gradient, all
                    fp32 (transformers upcasts logits for the loss); 16-bit logits add their own 2 bytes
      layer phase = (with checkpointing: that layer's saved tensors, recomputed) + gradient buffers
                    e*(2h + 3i) + QLoRA's dequantized weight (bf16, then fp32 in backward: 6 bytes x the
                    largest matrix)
    On CPU, add the runtime (CPU_RUNTIME_BYTES) and glibc's heap slack (cpu_allocator_slack).

    Both phases are upper bounds, checked against a tally of the live tensors (bench/measure_memory.py
    --tensors, docs/memory.md): the loss phase is exact, but estimate() adds the gradients to it although backward
    has made none yet (the bundled model: 5% high); the layer phase counts its terms as if all alive at once
    (a deep, small-vocabulary model: 19% high). Conservative on purpose: "fits" must not be optimistic.
    """
    # A preference step trains chosen + rejected together: twice the tokens. The reference pass (no grad) holds at
    # most one layer's transient buffers on top of the stored activations, within the layer phase below.
    t = s.batch * s.seq * (2 if s.preference else 1)
    h, i, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    e = _stream_bytes(s, kind)
    per_layer = sum(layer_saved_tensors(shape, s, kind).values())
    working = e * (2 * h + (3 if shape.gated_mlp else 2) * i)  # residual grad + MLP hidden grads
    if s.gradient_checkpointing:
        stored = L * e * h * t
        layer_peak = (per_layer + working) * t
        if s.recompute_cache and kind in ("qlora", "lora_16bit"):
            # Layer outputs (16-bit) kept for the recompute, up to the cache's budget.
            stored += min(s.recompute_cache, L * 2 * t * sum(o for _, o in shape.linears().values()))
    else:
        stored = L * per_layer * t
        layer_peak = working * t
    stored += e * h * t  # the final norm's input
    # lm_head is fp32 after kbit preparation, so QLoRA's logits are fp32 unless autocast makes them 16-bit.
    logits_fp32 = kind == "qlora" and s.precision == "app" and not _autocast(s) and not s.sharded
    logits_peak = t * V * (12 + (0 if logits_fp32 else 2))
    if s.chunked_head:
        logits_peak = chunked_head_bytes(s, t, h, V)
    if kind == "qlora":
        layer_peak += 6 * max(a_ * b_ for a_, b_ in shape.linears().values())
    peak = stored + max(logits_peak, layer_peak)
    if s.device == "cpu":
        peak += CPU_RUNTIME_BYTES + cpu_allocator_slack(shape, s, kind)
    return float(peak)


# TRL's fused LM head (trl/kernels/chunked_logprob.py): tiles of at most this many tokens x vocabulary entries.
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768


def chunked_head_bytes(s: PlanSettings, t: int, h: int, V: int) -> float:
    """Peak of DPO's tiled head: one tile of logits in the compute dtype and the 16-bit slice of the head's weight
    it multiplies, plus the hidden states' fp32 gradient. On the CPU (no Triton) the torch fallback of its backward
    (_backward_tile) holds, at its peak, the tile as fp32 logits, scaled logits, log p, p and the gradient, the
    target mask as bool and as fp32, the mask minus p and its product with the incoming gradient: 38 bytes per tile
    entry on top of the tile (checked against bench/preference_memory.py, docs/preference.md). On a GPU a Triton
    kernel folds the tile in place."""
    tile = min(t, HEAD_TILE_TOKENS) * min(V, HEAD_TILE_VOCAB)
    c = 2 if s.compute_dtype in ("bf16", "fp16") else 4  # the tile is in the autocast dtype
    per_entry = c + (38 if s.device == "cpu" else 0)
    return tile * per_entry + min(V, HEAD_TILE_VOCAB) * h * c + t * h * 4


def cpu_allocator_slack(shape: ModelShape, s: PlanSettings, kind: str) -> float:
    """Freed memory glibc keeps in its heaps during a step (part of RSS, not of any tensor).

    glibc raises its mmap threshold to the size of each freed block (up to 32 MiB), so after the first
    step-sized free every per-layer tensor below 32 MiB comes from the heap, and freed blocks pinned under
    later allocations (the next layer's checkpoint, the autograd thread's own arena) are not given back.
    Measured (bench/measure_memory.py, glibc defaults vs MALLOC_TRIM_THRESHOLD_=131072) at
    CPU_SLACK_SHARE of the per-layer tensors below 32 MiB, summed over layers; tensors above are mmapped and
    returned at once.
    """
    t = s.batch * s.seq
    small = sum(b * t for b in layer_saved_tensors(shape, s, kind).values() if b * t < GLIBC_MMAP_MAX)
    return CPU_SLACK_SHARE * shape.layers * small


def _input_group(name: str) -> str:
    return {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "gate_proj": "n2", "up_proj": "n2"}.get(name, name)


# ---------------------------------------------------------------- the device

def detect_device_memory_gb() -> tuple[float, str]:
    """Total memory of the device training would run on: GPU 0's VRAM, else this machine's RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory / GB, f"GPU VRAM ({props.name})"
    except RuntimeError:  # a broken CUDA install still leaves the CPU: plan for RAM
        pass
    import psutil

    return psutil.virtual_memory().total / GB, "RAM (CPU machine)"


# The verdict, the advice and their rendering moved to plan.py, which imports this module: the old
# `from qlora_ui.memory import plan_for_config` still works, resolved on first use so that there is no import cycle.
_MOVED = {**dict.fromkeys(("FIT_SHARE", "Plan", "make_plan", "judge", "plan_for_config", "preset_verdict"), "plan"),
          "preset_target_gb": "presets"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
