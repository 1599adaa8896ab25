"""What the portable llama.cpp build costs: generation speed of the installed build (qlora_ui/native/build.py:
x86-64-v3, no AVX-512, no AMX) against a native `-march=native` build of the same llama-cpp-python, both run as the
app runs them (a child process per GGUF), alternating in one invocation so both see the same machine load.

    python bench/llama_build.py --native-wheel /tmp/native-wheel/llama_cpp_python-0.3.36-*.whl [--rounds 5]

The native wheel is what `pip wheel --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36` builds
with no CMAKE_ARGS (llama.cpp's own default); it is unpacked into a temporary folder and put first on the child's
PYTHONPATH, so the two builds differ in nothing else. Reported: decode tokens/s (after the first token) and the
time to the first token (prompt evaluation), medians over the rounds, and native/portable ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from common import table

from qlora_ui.modeling import bundled_gguf_path
from qlora_ui.native.build import amx_instruction_count, build_key
from qlora_ui.native.client import LlamaCppProcess

PROMPT = [{"role": "user", "content": "Write a long story about a pirate who finds a treasure map. "
                                      "Describe every island on the way."}]


def one_reply(child: LlamaCppProcess, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, decode tokens/s after it, tokens) for one greedy reply."""
    t0 = time.perf_counter()
    first, n = None, 0
    for msg in child.request("chat", messages=PROMPT, max_tokens=tokens, temperature=0.0, seed=0):
        if msg.get("delta"):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / max(end - first, 1e-9), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--native-wheel", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    gguf = bundled_gguf_path()
    native_dir = Path(tempfile.mkdtemp(prefix="llama-native-"))
    with zipfile.ZipFile(args.native_wheel) as z:
        z.extractall(native_dir)
    native_lib = sorted((native_dir / "llama_cpp" / "lib").glob("libggml-cpu.so*"))[0]
    print(f"portable build {build_key()} vs native {args.native_wheel.name}; model {gguf.name}; "
          f"native libggml-cpu AMX tile instructions: {amx_instruction_count(native_lib)}")

    builds = {"portable": None, "native": str(native_dir)}
    children = {}
    for name, path in builds.items():
        old = os.environ.get("PYTHONPATH")
        if path:
            os.environ["PYTHONPATH"] = path  # the client puts the repository first, then this, then site-packages
        try:
            children[name] = LlamaCppProcess(gguf, n_ctx=1024)
            children[name].start()
        finally:
            os.environ.pop("PYTHONPATH", None) if old is None else os.environ.__setitem__("PYTHONPATH", old)
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in builds}
    try:
        for name in builds:  # one warm-up reply each (page cache, thread pool)
            one_reply(children[name], 16)
        for r in range(args.rounds):
            order = list(builds) if r % 2 == 0 else list(reversed(builds))
            for name in order:
                results[name].append(one_reply(children[name], args.tokens))
    finally:
        for c in children.values():
            c.close()
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), v[0][2])
           for k, v in results.items()}
    rows = [[k, f"{m[2]}", f"{m[0] * 1000:.0f} ms", f"{m[1]:.1f}"] for k, m in med.items()]
    rows.append(["native / portable", "", f"{med['native'][0] / med['portable'][0]:.2f}x",
                 f"{med['native'][1] / med['portable'][1]:.2f}x"])
    print(table(["build", "tokens", "first token (median)", "decode tokens/s (median)"], rows, "markdown"))
    print(f"portable decode speed = {med['portable'][1] / med['native'][1]:.3f} of native "
          f"({args.rounds} rounds, alternating)")


if __name__ == "__main__":
    main()
