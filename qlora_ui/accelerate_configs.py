"""The multi-process recipes shipped as accelerate config files (presets/accelerate/*.yaml), by name.

`python -m qlora_ui train --processes N --accelerate-config NAME` hands the file to `accelerate launch`
(qlora_ui/launch.py); the memory planner and the quantization check read the strategy from the same file, so a
recipe is one YAML file and nothing else. docs/scaling.md says when to use which.

Reading a file needs only PyYAML: the UI lists the recipes without importing accelerate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import yaml

from .errors import ConfigError
from .paths import PRESETS_DIR

ACCELERATE_DIR = PRESETS_DIR / "accelerate"

Strategy = Literal["ddp", "fsdp", "deepspeed"]
# accelerate's distributed_type -> how the planner counts memory. MULTI_GPU (also the CPU recipe, see
# cpu-ddp.yaml) replicates the model; FSDP and DeepSpeed ZeRO-3 shard it.
_STRATEGY_OF_TYPE: dict[str, Strategy] = {"NO": "ddp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "FSDP": "fsdp",
                                          "DEEPSPEED": "deepspeed"}
SHARDED: tuple[Strategy, ...] = ("fsdp", "deepspeed")


class QuantSettings(Protocol):
    """What the checks read of a config.QuantConfig (config.py validates through this module, so this module
    does not import it)."""

    load_in_4bit: bool
    compute_dtype: str
    quant_storage: str


def list_accelerate_configs() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    return sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))


def accelerate_config_path(name: str) -> Path:
    """The file for a recipe name ("fsdp-qlora", or "fsdp-qlora.yaml"); an existing path to a user's own
    accelerate config (from `accelerate config`) is accepted as is."""
    raw = (name or "").strip()
    stem = raw[:-5] if raw.endswith(".yaml") else raw
    if stem in list_accelerate_configs():
        return ACCELERATE_DIR / f"{stem}.yaml"
    p = Path(raw).expanduser()
    if raw and p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        return p
    raise ConfigError([f"accelerate_config '{raw}' is not a known recipe. Known: "
                       f"{', '.join(list_accelerate_configs())} (presets/accelerate/), or give the path of an "
                       "accelerate config file."])


def read_accelerate_config(name: str) -> dict:
    path = accelerate_config_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"accelerate_config {path}: cannot read it ({e})"]) from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise ConfigError([f"accelerate_config {path}: not an accelerate config (no distributed_type)"])
    return data


def strategy_of(name: str) -> Strategy:
    """"ddp", "fsdp" or "deepspeed" for a recipe name or config path."""
    dtype = str(read_accelerate_config(name)["distributed_type"]).upper()
    return _STRATEGY_OF_TYPE.get(dtype, "ddp")


def offloads_params(name: str) -> bool:
    """True when the recipe keeps parameters in CPU RAM (FSDP offload_params, ZeRO-3 offload_param_device)."""
    conf = read_accelerate_config(name)
    fsdp = conf.get("fsdp_config") or {}
    ds = conf.get("deepspeed_config") or {}
    return (str(fsdp.get("fsdp_offload_params", "false")).lower() == "true"
            or str(ds.get("offload_param_device", "none")).lower() not in ("none", ""))


def quant_storage_for(strategy: str, compute_dtype: str) -> str:
    """The `quant_storage` (bnb_4bit_quant_storage) a strategy needs.

    FSDP and ZeRO-3 flatten and shard each wrapped unit as one tensor of a single float dtype, so the packed
    4-bit weights must be stored in the same float dtype as the rest of the model (compute_dtype) instead of
    uint8; the bytes are the same (a bf16 element carries four 4-bit values). DDP never touches the storage."""
    return compute_dtype if strategy in SHARDED else "uint8"


def fsdp_needs_quant_storage(q: QuantSettings, strategy: str) -> bool:
    """True when this quantization config cannot be sharded as it is (4-bit with a storage dtype that is not
    the compute dtype)."""
    return strategy in SHARDED and q.load_in_4bit and q.quant_storage != quant_storage_for(strategy,
                                                                                          q.compute_dtype)


def check_quant_for_strategy(q: QuantSettings, name: str) -> list[str]:
    """Problems (one line each) running this quantization config under the recipe `name`; empty when fine."""
    strategy = strategy_of(name)
    if not fsdp_needs_quant_storage(q, strategy):
        return []
    want = quant_storage_for(strategy, q.compute_dtype)
    return [f"quant_storage {q.quant_storage}: the {name} recipe shards the 4-bit weights, which needs "
            f"quant_storage equal to compute_dtype ({want}); add --quant-storage {want}"]
