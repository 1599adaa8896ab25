"""One export of a run, written under a hidden temporary name in the output folder and renamed at the end, so an
interrupted or failed export never leaves something that looks complete; and the finished exports of a run."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, ExportError, ModelError
from ..runs import RunDir
from .converter import check_architecture, converter_script
from .gguf import GGUF_QUANTS, _require_llama_cpp, convert_to_gguf, quantize_gguf
from .merge import DEFAULT_MERGE_INTO, merge_model, require_adapter
from .modelfile import modelfile_path, ollama_modelfile

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")

Progress = Callable[[float, str], None]  # (fraction 0..1, what is happening)


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(f"Not enough disk space in {folder}: this export needs about {needed / 1e6:,.0f} MB and "
                          f"{free / 1e6:,.0f} MB are free. Free some space or pass another --out folder.")


def weights_bytes(model_path: str) -> int:
    return sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))


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
    from ..modeling import resolve_model_path

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


def download_dir() -> Path:
    """Where downloads are handed to the browser: the temp folder, which Gradio serves (a --runs-dir elsewhere is
    not, so a GGUF there could not be downloaded), private to this user."""
    import tempfile

    d = Path(tempfile.gettempdir()) / f"qlora-studio-zips-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def served_download(paths: list[Path], key: str) -> list[Path]:
    """`paths` (files, or a folder as a zip) side by side under their own names in download_dir()/<key>-<version>
    (a GGUF beside its Modelfile, which names it): a hard link where the temp folder shares the file system (no
    second copy of a GB-sized model), else a copy. Older versions under the same `key` are removed: each export
    used to leave a new zip behind (three exports: 785 MB)."""
    import hashlib

    files = sorted(f for p in paths for f in ([p, *p.rglob("*")] if p.is_dir() else [p]))
    stamp = repr([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()
    version = hashlib.sha1(stamp).hexdigest()[:12]  # a re-export within the same second is another version
    d = download_dir()
    folder = d / f"{key}-{version}"
    if not folder.is_dir():
        for old in d.glob(f"{key}-*"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        tmp_dir = d / f".{folder.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(mode=0o700)
        for p in paths:
            if p.is_dir():
                zip_folder(p, tmp_dir / f"{p.name}.zip")
                continue
            try:
                os.link(p, tmp_dir / p.name)
            except OSError:
                shutil.copyfile(p, tmp_dir / p.name)
        os.replace(tmp_dir, folder)  # whole or absent: a download never gets half a file
    return [folder / (f"{p.name}.zip" if p.is_dir() else p.name) for p in paths]
