"""Take a trained run out of the app: a merged 16-bit model folder, a GGUF for llama.cpp / Ollama, a Modelfile.

Merge: the adapter is added into 16-bit weights, never into 4-bit ones (a 4-bit round trip would throw the LoRA
update away in quantization noise). Which 16-bit weights is a measured choice, see docs/export.md and
bench/merge_choice.py: `dequantized` (the NF4 weights the adapter was trained against) or `base` (the original).

GGUF: llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python 0.3.36 source package, fetched
and cached once by `make install`) writes f16 / q8_0; its own quantizer (llama_cpp.llama_model_quantize) makes
q4_k_m from the f16 file. Everything is written under a hidden temporary name in the output folder and renamed at
the end, so an interrupted or failed export never leaves something that looks complete.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import ConfigError
from .modeling import ModelError, cache_dir
from .runs import RunDir

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"
FORMATS = ("merged", "gguf")
GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
MERGE_INTO = ("dequantized", "base")
# By measurement (bench/merge_choice.py, docs/export.md): the dequantized NF4 weights reproduce the 4-bit model the
# adapter was trained with more closely than the original 16-bit ones do.
DEFAULT_MERGE_INTO = "dequantized"
# The quantizer's file-type ids (llama.h: LLAMA_FTYPE_MOSTLY_*).
LLAMA_FTYPES = {"q4_k_m": 15}
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")

Progress = Callable[[float, str], None]  # (fraction 0..1, what is happening)


class ExportError(ValueError):
    """An export that cannot be done, with what to do about it."""


# ---- the converter, fetched once ----

def converter_dir() -> Path:
    return Path(os.environ.get("QLORA_STUDIO_LLAMA_CPP") or cache_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}")


def converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, or an ExportError saying how to get it."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file() or not (converter_dir() / "conversion").is_dir():
        raise ExportError(f"llama.cpp's converter is not installed (looked in {converter_dir()}). Run `make install` "
                          "(or `python -c 'import qlora_ui.export as e; e.fetch_converter()'`) to fetch it once.")
    return script


def fetch_converter(sdist_dir: Path | None = None) -> Path:
    """Extract convert_hf_to_gguf.py + conversion/ + gguf-py from the llama-cpp-python source package (cached)."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist_dir = sdist_dir or cache_dir() / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    sdist = sdist_dir / name
    if not sdist.is_file():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(sdist_dir)], check=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # write, then rename: a half-extracted converter is never used
    return target


def supported_architectures() -> set[str]:
    """The architectures llama.cpp's converter knows, read from its own registry (no import needed)."""
    src = (converter_script().parent / "conversion" / "__init__.py").read_text(encoding="utf-8")
    for node in ast.parse(src).body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    return set()


# ---- what a run can export ----

def require_adapter(run: RunDir) -> None:
    if not run.has_adapter():
        raise ExportError(f"{run.name} has no adapter yet, so there is nothing to export. A run saves its adapter when "
                          "it finishes or is stopped; train (or resume) it first.")


def check_architecture(model_path: str) -> str:
    conf = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    archs = conf.get("architectures") or []
    supported = supported_architectures()
    if not archs or archs[0] not in supported:
        raise ExportError(f"llama.cpp's converter does not support the architecture {archs[0] if archs else '?'!r} "
                          f"of this base model, so it cannot be made into a GGUF. Export --format merged instead "
                          "and use it with transformers.")
    return archs[0]


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(f"Not enough disk space in {folder}: this export needs about {needed / 1e6:,.0f} MB and "
                          f"{free / 1e6:,.0f} MB are free. Free some space or pass another --out folder.")


def weights_bytes(model_path: str) -> int:
    return sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))


# ---- merge ----

def _sixteen_bit(run_cfg):
    import torch

    # fp32 compute still exports 16-bit weights: bf16 keeps fp32's range.
    return torch.float16 if run_cfg.quantization.compute_dtype == "fp16" else torch.bfloat16


def dequantized_weights(model_path: str, run_cfg) -> dict[str, object]:
    """The 16-bit weights the adapter was trained against: each Linear4bit of the 4-bit base, dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from .modeling import load_base_model

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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .modeling import load_tokenizer, resolve_model_path

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


# ---- outputs ----

@dataclass
class ExportResult:
    path: Path  # what was written last: the merged folder, or the .gguf
    files: list[Path]
    seconds: float
    modelfile: Path | None = None


def default_out(run: RunDir) -> Path:
    return run.path / "export"


def _staging(out: Path, name: str) -> Path:
    tmp = out / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _place(tmp: Path, final: Path) -> None:
    """Rename a finished file/folder into place, replacing an older export of the same name."""
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    os.replace(tmp, final)


def _disk_error(e: OSError, out: Path) -> ExportError | OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"The disk holding {out} is full; the export was removed. Free some space or pass "
                           "another --out folder.")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return ExportError(f"Cannot write to {out} ({e.strerror}). Pass a writable --out folder.")
    return e


def _save_merged(run: RunDir, folder: Path, merge_into: str, progress: Progress) -> None:
    progress(0.05, "loading the base model and the adapter")
    model, tok = merge_model(run, merge_into)
    progress(0.35, "writing the merged 16-bit model")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    # Without a chat template file some tools fall back to no template at all.
    if getattr(tok, "chat_template", None) and not (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    meta = {"run": run.name, "merge_into": merge_into, "adapter": str(run.adapter_dir)}
    (folder / "qlora_studio_export.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def export_run(run: RunDir, fmt: Literal["merged", "gguf"] = "merged", quant: str = "q8_0",
               out: str | Path | None = None, merge_into: str = DEFAULT_MERGE_INTO,
               progress: Progress | None = None) -> ExportResult:
    """Write RUN/export/<run>-merged/ or RUN/export/<run>-<quant>.gguf + Modelfile; returns what was written."""
    from .modeling import resolve_model_path

    progress = progress or (lambda f, m: log.info("export %3.0f%% %s", 100 * f, m))
    t0 = time.time()
    if fmt not in FORMATS:
        raise ExportError(f"format '{fmt}' is not one of {', '.join(FORMATS)}.")
    if fmt == "gguf" and quant not in GGUF_QUANTS:
        raise ExportError(f"quant '{quant}' is not one of {', '.join(GGUF_QUANTS)}.")
    require_adapter(run)
    cfg = run.config()
    try:
        path = resolve_model_path(cfg.model)
    except (ModelError, ConfigError) as e:
        raise ExportError(f"The run's base model cannot be loaded: {e}") from None
    if fmt == "gguf":
        converter_script()
        check_architecture(path)
        if quant == "q4_k_m":
            _require_llama_cpp()
    out = Path(out) if out else default_out(run)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(e, out) from None
    sixteen = weights_bytes(path) * (2 if cfg.quantization.compute_dtype == "fp32" else 1) or 1
    # merged folder + (for GGUF) the converted file, plus room to spare
    check_free_space(out, int(sixteen * (2.2 if fmt == "gguf" else 1.1)))

    stem = f"{run.name}-merged" if fmt == "merged" else f"{run.name}-{quant}"
    tmp = _staging(out, stem)
    try:
        merged = tmp / "merged"
        _save_merged(run, merged, merge_into, progress)
        if fmt == "merged":
            final = out / stem
            _place(merged, final)
            progress(1.0, f"wrote {final}")
            return ExportResult(final, [final], time.time() - t0)
        gguf_tmp = tmp / f"{stem}.gguf"
        progress(0.5, f"converting to GGUF ({'f16' if quant == 'q4_k_m' else quant}) with llama.cpp's converter")
        convert_to_gguf(merged, gguf_tmp if quant != "q4_k_m" else tmp / "f16.gguf",
                        "f16" if quant == "q4_k_m" else quant)
        if quant == "q4_k_m":
            progress(0.8, "quantizing to Q4_K_M with llama.cpp's quantizer")
            quantize_gguf(tmp / "f16.gguf", gguf_tmp, quant)
        progress(0.95, "writing the Ollama Modelfile")
        final = out / gguf_tmp.name
        modelfile_text = ollama_modelfile(final.name, merged, cfg.data.system_prompt)
        mf_tmp = tmp / "Modelfile"
        mf_tmp.write_text(modelfile_text, encoding="utf-8")
        _place(gguf_tmp, final)
        mf = modelfile_path(final)
        _place(mf_tmp, mf)
        progress(1.0, f"wrote {final}")
        # The .gguf is written last of what the user runs: print it.
        return ExportResult(final, [final, mf], time.time() - t0, modelfile=mf)
    except OSError as e:
        raise _disk_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_to_gguf(merged: Path, outfile: Path, outtype: str) -> None:
    """llama.cpp's own converter, in a subprocess (it sets up its own imports and prints its own progress)."""
    script = converter_script()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # use the converter's own gguf-py, matched to it, not whatever is installed
    proc = subprocess.run([sys.executable, str(script), str(merged), "--outfile", str(outfile), "--outtype", outtype],
                          cwd=script.parent, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not outfile.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        text = " ".join(tail)
        if "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device")
        if "not supported" in text:
            raise ExportError(f"llama.cpp's converter does not support this model: {text[-300:]} Export --format "
                              "merged instead.")
        raise ExportError(f"llama.cpp's converter failed (exit {proc.returncode}): {text[-400:]}")


def _require_llama_cpp() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ExportError(f"llama-cpp-python is not installed, and Q4_K_M needs its quantizer. Run `make install` "
                          f"(or `pip install llama-cpp-python=={LLAMA_CPP_VERSION}`, which builds llama.cpp, ~7 min).")


QUANTIZE_CODE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if rc else 0)
"""


def quantize_gguf(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer through llama-cpp-python's low-level API, in a subprocess: a crash in C code must
    not take the app with it."""
    _require_llama_cpp()
    proc = subprocess.run([sys.executable, "-c", QUANTIZE_CODE, str(src), str(dst), str(LLAMA_FTYPES[quant])],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        text = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        if "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device")
        raise ExportError(f"llama.cpp's quantizer failed (exit {proc.returncode}): {text[-400:]}")


# ---- Ollama Modelfile ----

_S, _U, _A, _U2 = "\x02SYS\x03", "\x02USR\x03", "\x02AST\x03", "\x02USR2\x03"


@dataclass
class TurnFormat:
    """The chat template as per-role prefix/suffix strings: what a Go template for Ollama can express."""
    prefix: dict[str, str]
    suffix: str
    generation: str
    default_system: str
    bos: str

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix for m in messages)
        return text + (self.generation if add_generation_prompt else "")


def turn_format(tokenizer) -> TurnFormat:
    """Read the template's pieces by rendering marked messages through the model's own chat template."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                   {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}])
    sys_prefix, rest = full.split(_S, 1)
    between_su, rest = rest.split(_U, 1)
    between_ua, rest = rest.split(_A, 1)
    between_au, _ = rest.split(_U2, 1)
    last = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                   {"role": "assistant", "content": _A}]).split(_A, 1)[1]
    # What follows every turn's content, whatever comes next, is the turn end (<|im_end|>\n, <|eot_id|>).
    suffix = os.path.commonprefix([between_su, between_ua, between_au, last])
    bos = tokenizer.bos_token or ""
    if bos and sys_prefix.startswith(bos) and not between_su[len(suffix):].startswith(bos):
        sys_prefix = sys_prefix[len(bos):]  # a BOS only at the very start: llama.cpp adds it itself
    prefix = {"system": sys_prefix, "user": between_su[len(suffix):], "assistant": between_ua[len(suffix):]}
    two = [{"role": "system", "content": _S}, {"role": "user", "content": _U}]
    generation = render(two, True)[len(render(two)):]
    # A template that adds its own system message when there is none (SmolLM2 does): keep it as the default.
    alone = render([{"role": "user", "content": _U}])
    default_system = ""
    if alone.count(prefix["system"]) and prefix["system"]:
        head = alone.split(prefix["system"], 1)[1]
        default_system = head.split(suffix, 1)[0] if suffix and suffix in head else ""
    return TurnFormat(prefix, suffix, generation, default_system, bos)


def _go_quote(s: str) -> str:
    return json.dumps(s)[1:-1]


def ollama_template(fmt: TurnFormat) -> str:
    # One line of actions, no {{- trimming: the newlines inside the prefixes and the turn end are part of the
    # prompt the model was trained on, and a trim marker would eat them.
    parts = ["{{ range .Messages }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        parts.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{fmt.prefix[role]}'
                     f'{{{{ .Content }}}}{fmt.suffix}')
    parts += ["{{ end }}{{ end }}", fmt.generation]
    return "".join(parts)


def ollama_modelfile(gguf_name: str, merged: Path, system_prompt: str = "") -> str:
    """FROM the GGUF beside it, TEMPLATE from the model's chat template, stop tokens, and a system prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    stem = Path(gguf_name).stem
    out = [f"# Made by QLoRA Studio. Run: ollama create {stem.lower()} -f {stem}.Modelfile", f"FROM ./{gguf_name}"]
    stops = [s for s in {tok.eos_token} if s]
    if getattr(tok, "chat_template", None):
        fmt = turn_format(tok)
        template = ollama_template(fmt)
        if '"""' in template:
            raise ExportError('The chat template contains """, which a Modelfile cannot quote.')
        out.append(f'TEMPLATE """{template}"""')
        end = fmt.suffix.strip()
        if end and end not in stops:
            stops.insert(0, end)
        # The special token that opens a turn (<|im_start|>): the model starting a new turn has finished.
        for special in getattr(tok, "all_special_tokens", []):
            if special and fmt.prefix["user"].startswith(special) and special not in stops:
                stops.append(special)
        system = system_prompt or fmt.default_system
    else:
        system = system_prompt
    if system:
        out.append(f'SYSTEM """{system}"""')
    out += [f'PARAMETER stop "{_go_quote(s)}"' for s in stops]
    out.append("PARAMETER temperature 0")
    return "\n".join(out) + "\n"


def modelfile_path(gguf: Path) -> Path:
    """One Modelfile per GGUF (<name>.Modelfile beside it): exports of several quant types live side by side."""
    return gguf.with_suffix(".Modelfile")


def run_commands(gguf: Path) -> dict[str, str]:
    """The one-line commands that run an export elsewhere."""
    mf = modelfile_path(gguf)
    name = gguf.stem.lower()
    return {"ollama": f"cd {gguf.parent} && ollama create {name} -f {mf.name} && ollama run {name}",
            "llama-cli": f"llama-cli -m {gguf} -cnv"}


def exports(run: RunDir) -> list[Path]:
    """The finished exports of a run, newest first (hidden temporary names are never listed)."""
    folder = default_out(run)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if not p.name.startswith(".")
             and (p.suffix == ".gguf" or (p.is_dir() and (p / "config.json").is_file()))]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def ggufs(run: RunDir) -> list[Path]:
    return [p for p in exports(run) if p.suffix == ".gguf"]


# ---- in the background (the app) ----

class ExportJob:
    """One export in a thread: progress, the result or the caught error. The app stays usable meanwhile."""

    def __init__(self, run: RunDir, fmt: str, quant: str, merge_into: str = DEFAULT_MERGE_INTO):
        self.run, self.fmt, self.quant, self.merge_into = run, fmt, quant, merge_into
        self.fraction, self.message = 0.0, "waiting"
        self.state: Literal["running", "finished", "failed"] = "running"
        self.result: ExportResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name=f"export-{run.name}")

    def _progress(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message
        log.info("export %s: %3.0f%% %s", self.run.name, 100 * fraction, message)

    def _work(self) -> None:
        try:
            self.result = export_run(self.run, self.fmt, self.quant, merge_into=self.merge_into,
                                     progress=self._progress)
            self.state = "finished"
        except BaseException as e:  # noqa: BLE001 - shown to the user; the app keeps serving
            self.error = e
            self.state = "failed"
            self.message = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {str(e)[:400]}"
            if not isinstance(e, ExportError):
                log.exception("export of %s failed", self.run.name)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


class ExportJobs:
    """The app's exports, one at a time per run (two exports writing one folder would race)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, ExportJob] = {}

    def start(self, run: RunDir, fmt: str, quant: str) -> ExportJob:
        with self.lock:
            old = self.jobs.get(run.name)
            if old is not None and old.alive:
                raise ExportError(f"{run.name} is already being exported ({old.message}). Wait for it to finish.")
            require_adapter(run)
            job = ExportJob(run, fmt, quant)
            self.jobs[run.name] = job
            job.thread.start()
            return job

    def get(self, run_name: str) -> ExportJob | None:
        return self.jobs.get(run_name)


def zip_folder(folder: Path, target: Path) -> Path:
    """A stored (uncompressed: safetensors do not shrink) zip of a merged folder, written then renamed."""
    import zipfile

    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, Path(folder.name) / p.relative_to(folder))
    os.replace(tmp, target)
    return target
