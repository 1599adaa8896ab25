"""The typed run config: one source for the UI form, the CLI flags and the YAML presets.

Every field carries its help text and limits in `metadata`, so the Gradio form (sliders with these
bounds), every CLI's flags (cli_flags.py) and the presets (presets.py) are all generated from here. Field names
are unique across sections so that each maps to exactly one CLI flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from .accelerate_configs import accelerate_config_path, check_quant_for_strategy
from .column_map import parse_column_map
from .errors import ConfigError
from .paths import PRESETS_DIR  # noqa: F401 - re-exported: where the bundled presets are

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"

DATA_FORMATS = ("auto", "alpaca", "dolly", "sharegpt", "messages", "prompt_completion", "text", "guanaco")


# Longest text a field accepts. The app may be shared: a 5 MB system prompt once held the one-at-a-time data
# inspection for minutes, so every free-text field is capped before anything parses or tokenizes it.
SHORT_TEXT = 256


def fld(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        step: float | None = None, log: bool = False, ui: bool = True, factory: Any = None,
        max_chars: int = SHORT_TEXT):
    """A dataclass field with the metadata the form, the CLI and validation read."""
    meta = {"help": help, "min": min, "max": max, "step": step, "log": log, "ui": ui, "max_chars": max_chars}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    base_model: str = fld(BUNDLED_MODEL, "Base model: the bundled SmolLM2-135M-Instruct, a local Hugging Face "
                          "folder, or a hub id (needs internet).", max_chars=1024)
    revision: str | None = fld(None, "Hub revision (branch, tag or commit) when base_model is a hub id.")
    trust_remote_code: bool = fld(False, "Run Python code shipped with the model. Only for models you trust.")
    allow_pickle: bool = fld(False, "Allow loading pickle `.bin` weights (can run arbitrary code). "
                             "Safetensors are used whenever present.")


@dataclass
class QuantConfig:
    load_in_4bit: bool = fld(True, "Quantize the frozen base to 4 bits (QLoRA). Off = 16-bit LoRA.")
    quant_type: Literal["nf4", "fp4"] = fld("nf4", "4-bit data type. NF4 is information-theoretically optimal "
                                             "for normally distributed weights (QLoRA paper, sec. 3).")
    double_quant: bool = fld(True, "Quantize the quantization constants too: saves ~0.37 bits/parameter.")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = fld("bf16", "Dtype the 4-bit weights are dequantized to "
                                                         "for each matmul; also the LoRA adapter dtype.")
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = fld(
        "uint8", "Dtype that holds the packed 4-bit weights (same bytes either way). FSDP and DeepSpeed ZeRO-3 "
        "need it equal to compute_dtype (bf16) to shard them; one GPU and DDP use uint8.")


@dataclass
class LoraConfig:
    lora_r: int = fld(16, "LoRA rank: size of the low-rank update. Higher = more capacity, more memory.",
                      min=1, max=256, step=1)
    lora_alpha: int = fld(32, "LoRA alpha: the update is scaled by alpha / rank.", min=1, max=512, step=1)
    lora_dropout: float = fld(0.05, "Dropout on the LoRA input.", min=0.0, max=0.5, step=0.01)
    target_modules: str = fld("all-linear", "Layers that get adapters: 'all-linear' (every linear layer but "
                              "lm_head, as in the paper) or a comma-separated list like 'q_proj,v_proj'.")
    lora_init: Literal["default", "gaussian", "loftq"] = fld(
        "default", "How the adapter starts. default: A random, B zero (the update starts at 0). gaussian: A "
        "Gaussian instead of Kaiming-uniform. loftq: A and B start as the best rank-r fix of the 4-bit rounding "
        "error (LoftQ), so the quantized model starts closer to the 16-bit one; costs an SVD per layer at start "
        "(seconds on a small model, minutes on a 7B) and needs the model's safetensors on disk.")
    use_dora: bool = fld(False, "DoRA: learn each weight's magnitude and direction separately; often better than "
                         "LoRA at the same rank. Steps are slower (about 1.3-2x here) and use more memory.")
    use_rslora: bool = fld(False, "rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank, which "
                           "keeps high ranks learning. Free; change alpha with it.")
    init_adapter: str = fld("", "Start from this adapter instead of a fresh one: a run (its name in the runs folder, "
                            "or its path) or an adapter folder. The usual SFT -> DPO recipe: train SFT, then DPO "
                            "from its run. The adapter's own rank, alpha and target layers apply.", max_chars=4096)


@dataclass
class DataConfig:
    data_path: str = fld("", "Dataset: a file (CSV, JSON, JSONL, Parquet or TXT), a local dataset folder "
                         "(save_to_disk output, or data files with a README), or a Hub dataset as hf://owner/name.",
                         max_chars=4096)
    data_config: str = fld("", "Hub dataset or dataset folder: its subset (config) name (empty = the default one).",
                           max_chars=200)
    data_split: str = fld("train", "Hub dataset or dataset folder: the split to train on.", max_chars=200)
    data_revision: str | None = fld(None, "Hub dataset: branch, tag or commit (empty = main). The run records the "
                                    "commit it resolved to.", max_chars=200)
    data_format: Literal["auto", "alpaca", "dolly", "sharegpt", "messages", "prompt_completion", "text",
                         "guanaco"] = fld("auto", "Dataset format; 'auto' detects it from the columns.")
    column_map: dict[str, str] = fld(None, "Rename columns before detection: file column=expected column, "
                                     "comma-separated, e.g. question=instruction, answer=output.", factory=dict,
                                     ui=False, max_chars=2000)
    max_length: int = fld(512, "Longest example in tokens; longer rows are dropped (not truncated).",
                          min=16, max=32768, step=16)
    eval_fraction: float = fld(0.05, "Share of rows held out for eval loss (0 = no eval).", min=0.0, max=0.5,
                               step=0.01)
    train_on_source: bool = fld(False, "Also train on the prompt tokens. Off = train on responses only, "
                                "like the paper's train_on_source=False.")
    system_prompt: str = fld("", "System prompt added to every example that has none (empty = none).",
                             max_chars=4000)
    max_rows: int = fld(0, "Use at most this many rows (0 = all).", min=0, max=10_000_000, step=1)


@dataclass
class TrainConfig:
    epochs: float = fld(1.0, "Passes over the data (ignored when max_steps > 0).", min=0.01, max=100, step=0.1)
    max_steps: int = fld(0, "Stop after this many optimizer steps (0 = run the epochs).", min=0, max=1_000_000,
                         step=1)
    batch_size: int = fld(4, "Examples per device step.", min=1, max=512, step=1)
    grad_accum: int = fld(1, "Gradient accumulation steps: effective batch = batch_size x grad_accum.",
                          min=1, max=512, step=1)
    learning_rate: float = fld(2e-4, "Peak learning rate.", min=1e-7, max=1e-2, log=True)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = fld(
        "constant_with_warmup", "Learning-rate schedule (the paper uses constant).")
    warmup_ratio: float = fld(0.03, "Share of steps spent warming the learning rate up.", min=0.0, max=0.5,
                              step=0.01)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"] = fld(
        "paged_adamw_32bit", "Optimizer. Paged optimizers move state to CPU RAM on GPU memory spikes.")
    weight_decay: float = fld(0.0, "AdamW weight decay.", min=0.0, max=1.0, step=0.01)
    max_grad_norm: float = fld(0.3, "Clip gradients to this norm (the paper uses 0.3).", min=0.0, max=100.0,
                               step=0.05)
    gradient_checkpointing: bool = fld(True, "Recompute activations in backward: far less memory, ~30% slower.")
    group_by_length: bool = fld(True, "Batch examples of similar length together: less padding, faster.")
    padding_free: bool = fld(True, "Pack each batch's rows into one sequence with per-row positions, so no "
                             "padding is computed. Same loss; off = pad rows to the longest.")
    labelled_head: bool = fld(True, "Run the output layer and the loss only on labelled (trained) tokens, in "
                              "chunks. Same loss, far less memory; off = full logits.")
    mixed_precision: bool = fld(True, "Autocast the 16-bit parts (embeddings, LoRA, output layer) to "
                                "compute_dtype, on CPU too, and keep frozen weights in it. Off = fp32.")
    fused_lora: bool = fld(True, "Run each LoRA layer and its frozen (4-bit) weight as one fused forward and "
                           "backward (with mixed precision). Same loss; off = peft's own layers.")
    checkpoint_cache_mb: int = fld(256, "With gradient checkpointing and fused LoRA layers: keep up to this many MB "
                                   "of layer outputs from the forward, so the recompute skips their matmuls. Same "
                                   "loss; 0 = recompute everything.", min=0, max=1_000_000, step=64)
    seed: int = fld(42, "Random seed for data order, LoRA init and dropout.", min=0, max=2**31 - 1, step=1)
    logging_steps: int = fld(1, "Log metrics every N steps.", min=1, max=10_000, step=1)
    eval_steps: int = fld(20, "Compute eval loss every N steps (0 = only at the end).", min=0, max=100_000,
                          step=1)
    save_steps: int = fld(20, "Save a resumable checkpoint every N steps.", min=1, max=100_000, step=1)
    save_total_limit: int = fld(3, "Keep at most this many checkpoints.", min=1, max=1000, step=1)
    processes: int = fld(1, "Training processes (one per GPU when there are GPUs; CPU processes otherwise). "
                         "Over 1, the run is launched through accelerate (data parallel): global batch = "
                         "batch_size x grad_accum x processes.", min=1, max=64, step=1)
    accelerate_config: str = fld("", "accelerate recipe for processes > 1, by name from presets/accelerate "
                                 "(empty = plain data parallel, DDP).", max_chars=200)
    method: Literal["sft", "dpo", "orpo"] = fld(
        "sft", "Training method. sft: learn the answers (supervised). dpo: learn which of two answers is preferred "
        "(Direct Preference Optimization through TRL; the reference is the starting model, computed from the same "
        "4-bit base, no second copy). orpo: SFT and preference in one loss, no reference (TRL experimental). dpo "
        "and orpo need preference data: prompt, chosen, rejected.")
    beta: float = fld(0.1, "dpo: how far the model may move from its reference (higher = stays closer; 0.1 is "
                      "usual). orpo: weight of the preference (odds-ratio) term against the SFT loss.",
                      min=0.001, max=10.0, step=0.001)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quantization": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "training": TrainConfig,
}


@dataclass
class RunConfig:
    name: str = fld("run", "Run name; the run folder is runs/<timestamp>-<name>.")
    runs_dir: str = fld("runs", "Folder that holds the run folders.", max_chars=4096)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    # ---- flat access: each leaf field has one unique name (= its CLI flag) ----
    def flat(self) -> dict[str, Any]:
        out = {"name": self.name, "runs_dir": self.runs_dir}
        for sec in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, sec)))
        return out

    def set(self, key: str, value: Any) -> None:
        sec, f = FIELD_INDEX[key]
        setattr(self if sec is None else getattr(self, sec), key, value)

    def get(self, key: str) -> Any:
        sec, _ = FIELD_INDEX[key]
        return getattr(self if sec is None else getattr(self, sec), key)

    def updated(self, **values: Any) -> RunConfig:
        """A copy with the given flat fields replaced (values are coerced to the field types)."""
        new = from_dict(to_dict(self))
        problems = []
        for k, v in values.items():
            if k not in FIELD_INDEX:
                problems.append(f"unknown setting '{k}'")
                continue
            _set_coerced(new, k, v, problems)
        if problems:
            raise ConfigError(problems)
        return new

    def validate(self, *, need_data: bool = False) -> RunConfig:
        problems = validate_fields(self)
        d, q, lo = self.data, self.quantization, self.lora
        if need_data and not d.data_path:
            problems.append("data_path: no dataset given. Pass --data FILE (CSV, JSON, JSONL, Parquet or TXT), a "
                            "dataset folder, or hf://owner/name.")
        if q.compute_dtype == "fp16" and not q.load_in_4bit:
            problems.append("compute_dtype fp16 without 4-bit loading trains in pure fp16, which overflows: "
                            "use bf16 or fp32.")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.name or ""):
            problems.append(f"name '{self.name}': use 1-64 letters, digits, '.', '_' or '-'.")
        if lo.target_modules.strip() != "all-linear" and not all(
                re.fullmatch(r"[A-Za-z0-9_.]+", m.strip()) for m in lo.target_modules.split(",")):
            problems.append("target_modules: give 'all-linear' or comma-separated layer names like q_proj,v_proj.")
        if lo.lora_init == "loftq" and not q.load_in_4bit:
            problems.append("lora_init loftq: LoftQ fixes the 4-bit rounding error, so it needs load_in_4bit on. "
                            "Use default with 16-bit LoRA.")
        if lo.lora_init == "loftq" and lo.use_dora:
            problems.append("lora_init loftq with use_dora: DoRA's magnitudes are computed before LoftQ sets the "
                            "adapter, so the two do not combine. Turn one off.")
        if lo.init_adapter and lo.lora_init != "default":
            problems.append(f"lora_init {lo.lora_init} with init_adapter: the adapter is loaded as it was trained, "
                            "so no init applies. Set lora_init to default.")
        if self.training.method == "orpo" and self.training.processes > 1:
            problems.append("method orpo: TRL's ORPO trainer is experimental and not wired for several processes "
                            "here. Use processes 1, or method dpo.")
        if self.training.processes > 1:
            # One process per device: more only compete for the same GPUs or cores (3 on 2 cores crawled).
            import os

            import torch

            gpus = torch.cuda.device_count()
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            have = gpus or cores
            if self.training.processes > have:
                problems.append(f"processes: {self.training.processes} is more than the {have} "
                                f"{'GPUs' if gpus else 'CPU cores'} of this machine; use at most {have}.")
        if self.training.accelerate_config:
            try:
                accelerate_config_path(self.training.accelerate_config)
                problems += check_quant_for_strategy(q, self.training.accelerate_config)
            except ConfigError as e:
                problems += e.problems
        if problems:
            raise ConfigError(problems)
        return self


def _field_index() -> dict[str, tuple[str | None, dataclasses.Field]]:
    idx: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in fields(RunConfig):
        if f.name not in SECTIONS:
            idx[f.name] = (None, f)
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in idx, f"duplicate config field {f.name}"
            idx[f.name] = (sec, f)
    return idx


def field_type(f: dataclasses.Field) -> Any:
    """The resolved annotation (annotations are strings under `from __future__ import annotations`)."""
    return _TYPES[f.name]


def choices(f: dataclasses.Field) -> tuple | None:
    t = field_type(f)
    return get_args(t) if get_origin(t) is Literal else None


def _short(v: Any, n: int = 60) -> str:
    """A value echoed in an error message, cut: a request may post megabytes into any field."""
    s = str(v)
    return s if len(s) <= n else s[:n] + f"… ({len(s):,} characters)"


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn a CLI string / form value / YAML scalar into the field's type, or raise ValueError."""
    t = field_type(f)
    if value is None:
        if f.default is None:
            return None
        raise ValueError("a value is required")
    if get_origin(t) is Literal:
        v = str(value)
        if v not in get_args(t):
            raise ValueError(f"'{_short(v)}' is not one of {', '.join(get_args(t))}")
        return v
    base = t
    if get_origin(t) is not None and type(None) in get_args(t):  # X | None
        base = next(a for a in get_args(t) if a is not type(None))
        if value == "" or str(value).lower() == "none":
            return None
    if base is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"'{_short(value)}' is not true/false")
    if base is int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        try:
            fv = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"'{_short(value)}' is not a whole number") from None
        if not math.isfinite(fv) or fv != int(fv):
            raise ValueError(f"'{_short(value)}' is not a whole number")
        return int(fv)
    if base is float:
        try:
            fv = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"'{_short(value)}' is not a number") from None
        if not math.isfinite(fv):
            raise ValueError(f"'{value}' is not a finite number")
        return fv
    if get_origin(base) is dict or base is dict:
        return parse_column_map(value, f.metadata.get("max_chars", SHORT_TEXT))
    s = str(value)
    cap = f.metadata.get("max_chars", SHORT_TEXT)
    if len(s) > cap:
        raise ValueError(f"{len(s):,} characters is too long; the limit is {cap:,}")
    return s


def _set_coerced(cfg: RunConfig, key: str, value: Any, problems: list[str], label: str = "") -> None:
    """Set one flat field from a typed or form value; a bad value becomes a line in `problems`."""
    try:
        cfg.set(key, coerce(FIELD_INDEX[key][1], value))
    except ValueError as e:
        problems.append(f"{label or key}: {e}")


def validate_fields(cfg: RunConfig) -> list[str]:
    problems = []
    for key, (_, f) in FIELD_INDEX.items():
        v = cfg.get(key)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        ch = choices(f)
        if ch is not None and v not in ch:
            problems.append(f"{key}: '{v}' is not one of {', '.join(map(str, ch))}.")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{key}: {v} is not a finite number.")
            elif lo is not None and v < lo or hi is not None and v > hi:
                problems.append(f"{key}: {v} is outside the allowed range {_fmt(lo)}..{_fmt(hi)} "
                                f"({f.metadata['help']})")
    return problems


def _fmt(x: float | None) -> str:
    return "" if x is None else (f"{x:g}")


# ---- dict (the YAML shape; the files themselves are presets.py's) ----

def _gpu_gb_problem(value: Any) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return "" if ok else f"'{_short(value)}' is not a positive number of GB"


# Keys a preset file may hold that describe the recipe, not the run: validated when a file is read, never stored in
# a RunConfig (so a run's saved config and `train` flags do not carry them). presets.preset_target_gb reads them.
PRESET_KEYS: dict[str, Callable[[Any], str]] = {
    "target_gpu_gb": _gpu_gb_problem,  # the GPU size the recipe is made for: the memory panel plans for it
}


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any] | None, base: RunConfig | None = None) -> RunConfig:
    """Build a config from a nested dict (YAML shape). Unknown keys and bad values are collected, then raised."""
    cfg = from_dict(to_dict(base)) if base is not None else RunConfig()
    problems = []
    for key, value in (d or {}).items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"section '{key}' must be a mapping")
                continue
            for k, v in value.items():
                if k not in FIELD_INDEX or FIELD_INDEX[k][0] != key:
                    problems.append(f"unknown setting '{key}.{k}'")
                    continue
                _set_coerced(cfg, k, v, problems, f"{key}.{k}")
        elif key in FIELD_INDEX and FIELD_INDEX[key][0] is None:
            _set_coerced(cfg, key, value, problems)
        elif key in PRESET_KEYS:
            problem = PRESET_KEYS[key](value)  # checked here, kept by the preset store, not in the run config
            if problem:
                problems.append(f"{key}: {problem}")
        else:
            problems.append(f"unknown setting '{key}'")
    if problems:
        raise ConfigError(problems)
    return cfg


FIELD_INDEX = _field_index()
_TYPES: dict[str, Any] = {}
for _cls in (RunConfig, *SECTIONS.values()):
    import typing as _typing

    _hints = _typing.get_type_hints(_cls)
    _TYPES.update({k: v for k, v in _hints.items() if k not in SECTIONS})


# Moved to their own modules, which import this one: the old `from qlora_ui.config import load_preset` still works,
# resolved on first use so that no import cycle comes back.
_MOVED = {
    **dict.fromkeys(("to_yaml", "from_yaml", "save_yaml", "load_yaml", "user_presets_dir", "list_presets",
                     "load_preset", "save_preset", "preset_target_gb"), "presets"),
    **dict.fromkeys(("cli_flag", "add_cli_flags", "apply_cli_flags", "cli_command", "CLI_ALIASES"), "cli_flags"),
    "_shell_quote": "shell",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        module = importlib.import_module(f"{__package__}.{_MOVED[name]}")
        return getattr(module, "shell_quote" if name == "_shell_quote" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
