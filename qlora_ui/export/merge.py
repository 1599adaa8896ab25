"""The adapter added into 16-bit weights, never into 4-bit ones (a 4-bit round trip would throw the LoRA update
away in quantization noise). Which 16-bit weights is a measured choice, see docs/export.md and
bench/merge_choice.py: `dequantized` (the NF4 weights the adapter was trained against) or `base` (the original)."""

from __future__ import annotations

from typing import Literal

from ..errors import ExportError
from ..runs import RunDir

MERGE_INTO = ("dequantized", "base")
# By measurement (bench/merge_choice.py, docs/export.md): the dequantized NF4 weights reproduce the 4-bit model the
# adapter was trained with more closely than the original 16-bit ones do.
DEFAULT_MERGE_INTO = "dequantized"


def require_adapter(run: RunDir) -> None:
    if not run.has_adapter():
        raise ExportError(f"{run.name} has no adapter yet, so there is nothing to export. A run saves its adapter when "
                          "it finishes or is stopped; train (or resume) it first.")


def _sixteen_bit(run_cfg):
    import torch

    # fp32 compute still exports 16-bit weights: bf16 keeps fp32's range.
    return torch.float16 if run_cfg.quantization.compute_dtype == "fp16" else torch.bfloat16


def dequantized_weights(model_path: str, run_cfg) -> dict[str, object]:
    """The 16-bit weights the adapter was trained against: each Linear4bit of the 4-bit base, dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from ..modeling import load_base_model

    q4 = load_base_model(model_path, run_cfg.model, run_cfg.quantization)
    dtype = _sixteen_bit(run_cfg)
    out = {}
    for name, module in q4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            out[name] = F.dequantize_4bit(w.data, w.quant_state).to(dtype)
    del q4
    return out


def merge_model(run: RunDir, merge_into: Literal["dequantized", "base"] = DEFAULT_MERGE_INTO):
    """(the merged 16-bit transformers model, its tokenizer). Loads fresh instances: never one that generated."""
    import torch

    from ..imports import ml_libraries

    ml_libraries()  # an export thread may be the first to import transformers (imports.py says why)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..modeling import load_tokenizer, resolve_model_path

    require_adapter(run)
    if merge_into not in MERGE_INTO:
        raise ExportError(f"merge_into '{merge_into}' is not one of {', '.join(MERGE_INTO)}.")
    cfg = run.config()
    path = resolve_model_path(cfg.model)
    dtype = _sixteen_bit(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "cpu"},
                                                 revision=cfg.model.revision,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    if merge_into == "dequantized" and cfg.quantization.load_in_4bit:
        deq = dequantized_weights(path, cfg)
        with torch.no_grad():
            for name, w in deq.items():
                model.get_submodule(name).weight.copy_(w)
    model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    model = model.merge_and_unload()
    model.config.use_cache = True
    tok = load_tokenizer(str(run.adapter_dir), cfg.model) if (run.adapter_dir / "tokenizer_config.json").is_file() \
        else load_tokenizer(path, cfg.model)
    return model, tok
