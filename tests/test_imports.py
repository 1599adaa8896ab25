"""The app's worker threads import transformers through qlora_ui.imports.ml_libraries: four threads importing it for
the first time at once broke it (ImportError: cannot import name 'set_seed' from 'transformers'; found when a resume
and the page-load data inspection started together in a freshly started app)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

RACE = textwrap.dedent("""
    import sys, threading
    import gradio, torch  # loaded first, as in the app
    GUARDED = sys.argv[1] == "guarded"
    errors = []

    def use(name):
        try:
            if GUARDED:
                from qlora_ui.imports import ml_libraries
                ml_libraries()
            exec(f"from transformers import {name}")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=use, args=(n,)) for n in ("set_seed", "AutoTokenizer") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(len(errors), errors[:1])
""")


def run(mode: str) -> int:
    p = subprocess.run([sys.executable, "-c", RACE, mode], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[0])


def test_four_threads_importing_transformers_at_once_all_succeed_through_ml_libraries():
    # Unguarded, the same four threads failed 3 of 4 imports in each of two fresh processes on this stack.
    assert run("guarded") == 0
