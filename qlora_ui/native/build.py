"""Build llama-cpp-python for this machine, once per build configuration, without AMX tile code.

Why not `pip install llama-cpp-python`: its default build compiles llama.cpp with `-march=native`, and on a CPU that
advertises Intel AMX (many Sapphire-Rapids-class cloud VMs) that puts AMX tile kernels into libggml-cpu, which then
fault with SIGILL at run time where the hypervisor does not really provide them. Turning only the GGML_AMX_* options
off changes nothing (`-march=native` turns the instructions back on), and a native wheel also breaks when the venv,
the pip cache or a Docker layer moves to another CPU.

What we build instead, on x86-64: GGML_NATIVE=OFF with an explicit x86-64-v3 set (SSE4.2, AVX, AVX2, FMA, F16C, BMI2;
every x86 CPU since 2013/2017) and no AVX-512 or AMX. docs/export.md has the measured cost against a native build.
Other architectures keep llama.cpp's own defaults (there is no AMX there to avoid).

The wheel is built with pip's cache off into a folder named by its configuration, so a wheel built with other flags
(the pip cache, an older venv) is never picked up, and the venv records which configuration it holds.

    python -m qlora_ui.native.build          # build if needed, install into this Python, check the library
    python -m qlora_ui.native.build --check  # only check what is installed
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import BuildError  # the error family's; importable from here as before
from ..modeling import cache_dir

LLAMA_CPP_VERSION = "0.3.36"
X86_PORTABLE = ("-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF",
                "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
                "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
# Intel AMX mnemonics as objdump prints them (ldtilecfg, sttilecfg, tileloadd[t1], tilestored, tilezero,
# tilerelease, tdpbssd/tdpbsud/tdpbusd/tdpbuud, tdpbf16ps, tdpfp16ps).
AMX_MNEMONIC = re.compile(r"\t(ldtilecfg|sttilecfg|tile\w+|tdpb[su][su]d|tdpbf16ps|tdpfp16ps)\b")


def cmake_args(machine: str | None = None) -> list[str]:
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return list(X86_PORTABLE)
    return []  # llama.cpp's defaults: no AMX outside x86


def build_key(machine: str | None = None) -> str:
    """Names one build configuration: the version, the architecture and the exact CMake arguments."""
    machine = (machine or platform.machine()).lower()
    digest = hashlib.sha256(" ".join(cmake_args(machine)).encode()).hexdigest()[:10]
    return f"{LLAMA_CPP_VERSION}-{machine}-{digest}"


def wheel_dir() -> Path:
    return cache_dir() / "wheels" / f"llama-cpp-python-{build_key()}"


def marker_path() -> Path:
    """Where this environment (the venv: sys.prefix) records the build configuration of its llama-cpp-python."""
    return Path(sys.prefix) / ".llama-cpp-build"


def installed_lib_dir() -> Path | None:
    """llama_cpp/lib of the installed package, found without importing it (importing loads the native code)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def cpu_libraries(lib_dir: Path | None = None) -> list[Path]:
    lib_dir = lib_dir or installed_lib_dir()
    if lib_dir is None or not lib_dir.is_dir():
        return []
    # A wheel stores libggml-cpu.so, .so.0 and .so.0.x.y as three copies of one file: check each content once.
    seen: dict[tuple[int, str], Path] = {}
    for p in sorted(lib_dir.glob("libggml-cpu*.so*")):
        if p.is_file() and not p.is_symlink():
            seen.setdefault((p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()), p)
    return sorted(seen.values())


def amx_instruction_count(library: Path) -> int:
    """How many AMX tile instructions the disassembly of one shared library holds."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise BuildError("objdump is not installed (Debian: apt-get install binutils); it checks the build.")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if AMX_MNEMONIC.search(line))


def is_current() -> bool:
    m = marker_path()
    return installed_lib_dir() is not None and m.is_file() and m.read_text().strip() == build_key()


def build_wheel(log=print) -> Path:
    """The wheel of this configuration, built once (pip's own cache off: it keys wheels by name, not by flags)."""
    target = wheel_dir()
    found = sorted(target.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args()), FORCE_CMAKE="1")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    log(f"building llama-cpp-python {LLAMA_CPP_VERSION} ({build_key()}): CMAKE_ARGS={env['CMAKE_ARGS'] or '(defaults)'}"
        " - about 7-10 minutes on 2 cores, once per machine")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-deps",
                           "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                           "-w", str(tmp)], env=env)
    if proc.returncode != 0:
        raise BuildError(f"building llama-cpp-python failed (exit {proc.returncode}); it needs cmake and a C++ "
                         "compiler (Debian: apt-get install cmake g++). The rest of the app works without it: the "
                         "transformers chat backend and the merged export do not need llama.cpp.")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # write, then rename: a half-built folder is never taken for a wheel
    return sorted(target.glob("llama_cpp_python-*.whl"))[-1]


def ensure_installed(log=print) -> None:
    """Install this configuration's wheel into the running Python unless it is there already."""
    if is_current():
        return
    wheel = build_wheel(log)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True)
    # llama-cpp-python's own Python dependencies (numpy, jinja2, diskcache, typing-extensions).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheel)], check=True)
    marker_path().write_text(build_key() + "\n")


def check(log=print) -> int:
    """Every installed CPU library free of AMX tile code; returns the count found (0 is the only good answer)."""
    libs = cpu_libraries()
    if not libs:
        raise BuildError("llama-cpp-python's libggml-cpu is not installed. Run `make install`.")
    total = 0
    for lib in libs:
        n = amx_instruction_count(lib)
        log(f"{lib.name}: {n} AMX tile instructions")
        total += n
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_ui.native.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the installed build for AMX tile code")
    args = ap.parse_args(argv)
    try:
        if not args.check:
            ensure_installed()
        n = check()
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if n:
        print(f"error: the installed llama.cpp holds {n} AMX tile instructions; remove {marker_path()} and run "
              "`make install` to rebuild it portably.", file=sys.stderr)
        return 1
    print(f"llama-cpp-python {build_key()}: installed, no AMX tile code")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
