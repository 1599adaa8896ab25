"""llama.cpp's own converter (convert_hf_to_gguf.py + conversion/ + gguf-py), fetched once from the
llama-cpp-python source package of the version native/build.py builds, and what it can convert."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ..errors import ExportError
from ..modeling import cache_dir
from ..native.build import LLAMA_CPP_VERSION  # one version for the converter and the compiled library

CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


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


def check_architecture(model_path: str) -> str:
    conf = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    archs = conf.get("architectures") or []
    supported = supported_architectures()
    if not archs or archs[0] not in supported:
        raise ExportError(f"llama.cpp's converter does not support the architecture {archs[0] if archs else '?'!r} "
                          f"of this base model, so it cannot be made into a GGUF. Export --format merged instead "
                          "and use it with transformers.")
    return archs[0]
