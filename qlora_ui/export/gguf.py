"""A merged folder into a GGUF: llama.cpp's converter writes f16 / q8_0, its quantizer (llama_cpp.llama_model_quantize)
makes q4_k_m from the f16 file. Both run in child processes: a crash in C code must not take the app with it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

from ..errors import ExportError
from .converter import LLAMA_CPP_VERSION, converter_script

GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
# The quantizer's file-type ids (llama.h: LLAMA_FTYPE_MOSTLY_*).
LLAMA_FTYPES = {"q4_k_m": 15}


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
