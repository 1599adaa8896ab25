"""transformers (and peft, which imports it) imported once, under one lock, before any thread of the app uses them.

Two threads importing transformers for the first time at the same moment break it: Python's import locks, seeing
two threads take transformers' submodules in different orders, hand one of them a module still being initialised,
and `from transformers import set_seed` (or AutoTokenizer) raises ImportError. In the app that was a resume started
while the page-load data inspection loaded its tokenizer, in a freshly started app (reproduced with four threads:
three of four imports failed, every time). The engine's entry points that run on worker threads (training, model
and tokenizer loading, export, benchmarks) call `ml_libraries()` first: the first one imports, the others wait.
Not imported at launch: it would add seconds to the app's start on a 2-core machine.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_READY = threading.Event()  # set once the imports are done: later calls return without taking the lock


def ml_libraries() -> None:
    """Import transformers, the lazy names the job threads use, and peft, once; later calls return at once."""
    if _READY.is_set():
        return
    with _LOCK:
        if _READY.is_set():
            return
        import peft  # noqa: F401
        import transformers
        from transformers import AutoTokenizer, TrainerCallback, set_seed  # noqa: F401 - resolves the lazy names

        del transformers
        _READY.set()
