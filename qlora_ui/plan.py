"""Will it fit? The verdict on a memory estimate (memory.py), the one change that would make it fit, and the
plan as the UI's paragraph and the CLI's JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import RunConfig
from .memory import (
    CPU_RUNTIME_BYTES,
    GB,
    METHODS,
    OPTIMIZER_STATE_BYTES,
    STRATEGIES,
    Device,
    ModelShape,
    PlanSettings,
    Precision,
    Strategy,
    detect_device_memory_gb,
    estimate,
    gathered_bytes,
    offloaded_bytes,
    resolve_shape,
    unquantized_bytes,
)
from .presets import load_preset, preset_target_gb

# "fits" leaves this share of the device free: CUDA context (~0.5 GB), allocator fragmentation and the
# estimate's own error (measured within 30%, docs/memory.md).
FIT_SHARE = 0.9


@dataclass
class Plan:
    model: str
    shape: ModelShape
    settings: PlanSettings
    breakdown: dict[str, dict[str, float]]  # bytes
    device_gb: float
    device_label: str
    verdict: str = ""
    advice: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.settings.method

    def total_gb(self, method: str | None = None) -> float:
        return sum(self.breakdown[method or self.method].values()) / GB

    def machine_need_gb(self, method: str | None = None) -> float:
        """What the memory the verdict compares with must hold: one device's share on GPUs (each process has
        its own), all processes together on CPU (they share this machine's RAM)."""
        s = self.settings
        return self.total_gb(method) * (s.processes if s.device == "cpu" else 1)

    def scope(self) -> str:
        """", per device, 2 processes (FSDP)" when the figures are per device; empty for one process."""
        s = self.settings
        if s.processes <= 1:
            return ""
        off = ", parameters offloaded to CPU" if s.sharded and s.offload else ""
        return f", per device, {s.processes} processes ({STRATEGIES.get(s.strategy, s.strategy)}{off})"

    def spillable_gb(self, method: str | None = None) -> float:
        """Optimizer state a paged optimizer can move to CPU RAM (CUDA unified memory) when the GPU is full."""
        if self.settings.device != "cuda" or not self.settings.optimizer.startswith("paged_"):
            return 0.0
        return self.breakdown[method or self.method]["optimizer"] / GB

    def to_json(self) -> dict:
        s = self.settings
        return {
            "model": self.model,
            "shape": self.shape.name,
            "params_b": round(self.shape.total_params / 1e9, 4),
            "settings": {"batch": s.batch, "seq": s.seq, "rank": s.rank, "targets": s.targets,
                         "optimizer": s.optimizer, "gradient_checkpointing": s.gradient_checkpointing,
                         "quant_type": s.quant_type, "double_quant": s.double_quant,
                         "load_in_4bit": s.load_in_4bit, "precision": s.precision, "device": s.device,
                         "processes": s.processes, "strategy": s.strategy, "offload": s.offload},
            # With processes > 1 every *_gb figure and the breakdown are per device; these say so explicitly.
            "processes": s.processes,
            "strategy": s.strategy,
            "per_device_gb": round(self.total_gb(), 3),
            "per_device_breakdown": {p: round(v / GB, 4) for p, v in self.breakdown[self.method].items()},
            "gathered_gb": round(gathered_bytes(self.shape, self.method, unquantized_bytes(s)) / GB, 3)
            if s.sharded else 0.0,
            "offload": s.sharded and s.offload,
            "offloaded_cpu_gb": round(offloaded_bytes(self.shape, s, self.method) / GB, 3),
            "all_processes_gb": round(self.total_gb() * s.processes, 3),
            "full_finetune_gb": round(self.total_gb("full_finetune"), 3),
            "lora_16bit_gb": round(self.total_gb("lora_16bit"), 3),
            "qlora_gb": round(self.total_gb("qlora"), 3),
            "qlora_no_double_quant_gb": round(self.total_gb("qlora_no_double_quant"), 3),
            "breakdown": {m: {p: round(v / GB, 4) for p, v in parts.items()} for m, parts in self.breakdown.items()},
            "method": self.method,
            "needed_gb": round(self.total_gb(), 3),
            "device_gb": round(self.device_gb, 2),
            "device": self.device_label,
            "verdict": self.verdict,
            "advice": self.advice,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        """One short paragraph for the UI: what the chosen method needs, the verdict and the fix."""
        # A coloured text badge, not an emoji: machines without an emoji font showed an empty box.
        badge = {"fits": "qs-ok", "tight": "qs-warn", "will not fit": "qs-bad"}[self.verdict]
        lines = [(f'<span class="qs-badge {badge}">{self.verdict.upper()}</span> — ' f"{METHODS[self.method]} needs "
                  f"**{self.total_gb():.1f} GB** of "
                  f"{self.device_gb:.1f} GB {self.device_label}{self.scope()} "
                  f"({self.shape.name}, {self.shape.total_params / 1e9:.2f}B params, batch {self.settings.batch} "
                  f"x {self.settings.seq} tokens, rank {self.settings.rank}).")]
        if self.advice:
            lines.append(f"**To make it fit:** {self.advice}")
        lines += [f"_{n}_" for n in self.notes]
        return "\n\n".join(lines)


def make_plan(model: str, settings: PlanSettings, device_gb: float, device_label: str) -> Plan:
    shape = resolve_shape(model)
    plan = Plan(model, shape, settings, estimate(shape, settings), device_gb, device_label)
    plan.verdict = judge(plan)
    if plan.verdict != "fits":
        plan.advice = _advice(plan)
    spill = plan.spillable_gb()
    if plan.verdict == "tight" and spill and plan.total_gb() > device_gb:
        plan.notes.append(f"Runs only by paging up to {spill:.1f} GB of optimizer state to CPU RAM (slower).")
    offloaded = offloaded_bytes(plan.shape, settings, plan.method)
    if offloaded:
        plan.notes.append(f"Each process also holds {offloaded / GB:.1f} GB in CPU RAM (its offloaded shards).")
    if settings.device == "cpu" and settings.processes > 1:
        plan.notes.append(f"{settings.processes} processes share this machine's RAM: {plan.machine_need_gb():.1f} GB "
                          "in all.")
    if settings.device == "cpu":
        plan.notes.append(f"CPU estimate of resident memory, including {CPU_RUNTIME_BYTES / 1e6:.0f} MB of runtime and "
                          "the free memory glibc keeps in its heap (docs/memory.md).")
    return plan


def judge(plan: Plan) -> str:
    need, dev = plan.machine_need_gb(), plan.device_gb
    if need <= FIT_SHARE * dev:
        return "fits"
    # A paged optimizer lets the run go on as long as everything else fits; its state then pages over PCIe.
    if need <= dev or need - plan.spillable_gb() <= dev:
        return "tight"
    return "will not fit"


def _candidates(s: PlanSettings) -> list[tuple[str, PlanSettings]]:
    """Single changes, in the order we would suggest them: the ones that cost no quality first."""
    r = dataclasses.replace
    out = []
    if s.processes > 1 and not s.sharded and s.device == "cuda":
        # Costs no quality: the same run, the model split across the GPUs instead of copied onto each.
        out.append(("shard the model across the GPUs (--accelerate-config fsdp-qlora --quant-storage bf16)",
                    r(s, strategy="fsdp")))
    if not s.load_in_4bit:
        out.append(("load the base model in 4-bit (QLoRA: turn on load_in_4bit)",
                    r(s, load_in_4bit=True, double_quant=True)))
    elif not s.double_quant:
        out.append(("turn on double quantization", r(s, double_quant=True)))
    if not s.gradient_checkpointing:
        out.append(("turn on gradient checkpointing (~30% slower)", r(s, gradient_checkpointing=True)))
    b = s.batch // 2
    while b >= 1:
        label = (f"lower batch_size {s.batch} → {b} and raise grad_accum ×{math.ceil(s.batch / b)} to keep the "
                 "effective batch")
        out.append((label, r(s, batch=b)))
        b //= 2
    if OPTIMIZER_STATE_BYTES.get(s.optimizer, 8) > 2:
        label = "switch the optimizer to paged_adamw_8bit (2 instead of 8 bytes of state per trainable weight)"
        out.append((label, r(s, optimizer="paged_adamw_8bit")))
    n = s.seq // 2
    while n >= 64:
        out.append((f"lower max_length {s.seq} → {n} (longer examples are dropped)", r(s, seq=n)))
        n //= 2
    return out


def _advice(plan: Plan) -> str:
    """The first single change that makes the plan fit (else tight); else what it would take."""
    best: dict[str, tuple[str, float]] = {}
    for label, s2 in _candidates(plan.settings):
        p2 = Plan(plan.model, plan.shape, s2, estimate(plan.shape, s2), plan.device_gb, plan.device_label)
        v = judge(p2)
        if v in ("fits", "tight") and v not in best:
            # Among batch sizes / lengths, the first that fits is the largest, i.e. the smallest change.
            best[v] = (label, p2.total_gb())
        if "fits" in best:
            break
    if "fits" in best:
        label, gb = best["fits"]
        return f"{label}: {plan.total_gb():.1f} → {gb:.1f} GB."
    if plan.verdict == "will not fit" and "tight" in best:
        label, gb = best["tight"]
        return f"{label}: {plan.total_gb():.1f} → {gb:.1f} GB (tight)."
    if plan.verdict == "tight":
        return ""
    s = plan.settings
    floor = dataclasses.replace(s, load_in_4bit=True, double_quant=True, gradient_checkpointing=True, batch=1,
                                optimizer="paged_adamw_8bit", seq=min(s.seq, 256))
    need = sum(estimate(plan.shape, floor)[floor.method].values()) / GB
    return (f"no single change is enough; even 4-bit with batch 1, 256 tokens, checkpointing and an 8-bit "
            f"optimizer needs {need:.1f} GB. Pick a smaller model or a device with ≥ {need / FIT_SHARE:.0f} GB.")


# ---------------------------------------------------------------- entry points

def plan_for_config(cfg: RunConfig, device_gb: float | None = None, *, device: Device | None = None,
                    precision: Precision = "app", processes: int | None = None,
                    strategy: Strategy | None = None, offload: bool | None = None) -> Plan:
    """The plan for a run config. Without `device_gb`, plans for this machine (its GPU, else its RAM); an
    explicit `device_gb` is a GPU of that size unless `device="cpu"`."""
    if device_gb is None:
        device_gb, label = detect_device_memory_gb()
        device = device or ("cuda" if label.startswith("GPU") else "cpu")
    else:
        device = device or "cuda"
        label = "GPU VRAM" if device == "cuda" else "RAM"
    extra = {k: v for k, v in (("processes", processes), ("strategy", strategy), ("offload", offload))
             if v is not None}
    settings = PlanSettings.from_config(cfg, device=device, precision=precision, **extra)
    return make_plan(cfg.model.base_model, settings, float(device_gb), label)


def preset_verdict(preset: str, cfg: RunConfig | None = None) -> str:
    """Markdown: the plan for a preset on the GPU size it is made for (its target_gpu_gb), then on this machine."""
    cfg = cfg if cfg is not None else load_preset(preset)
    lines = []
    target = preset_target_gb(preset)
    if target is not None:
        p = plan_for_config(cfg, target)
        lines.append(f"**{preset}** on a {target:g} GB GPU: {METHODS[p.method]} needs {p.total_gb():.1f} GB → "
                     f"**{p.verdict}**.")
    here = plan_for_config(cfg)
    lines.append(f"On this machine ({here.device_gb:.0f} GB {here.device_label}): {here.total_gb():.1f} GB → "
                 f"**{here.verdict}**." + (f" {here.advice}" if here.advice else ""))
    return "\n\n".join(lines)
