"""Chat from an exported GGUF through llama.cpp (llama-cpp-python): the fast CPU backend beside chat.ChatEngine.

Same contract as ChatEngine.stream: yields the growing reply text, takes the same GenerationSettings, stops
generating when its reader goes away, and holds its lock only inside the generation thread, never across a yield.
The prompt is rendered by the chat template stored in the GGUF (the model's own, written by the converter).

llama.cpp itself runs in a child process (native/worker.py), one per loaded GGUF, kept warm: a fault there ends the
reply in progress with `BackendStopped` (the caller answers with transformers instead), never the app, and the next
request starts a new child.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from .chat import MAX_MESSAGE_CHARS, MAX_PROMPT_TOKENS, GenerationSettings
from .errors import ChatError
from .native.client import BackendStopped, LlamaCppProcess, probe

log = logging.getLogger(__name__)

N_CTX = MAX_PROMPT_TOKENS + 1024

__all__ = ("BackendStopped", "LlamaCppEngine")  # BackendStopped: callers catch it from here


class LlamaCppEngine:
    """One loaded GGUF at a time, in its own child process; generation is serialised by a lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.path: str | None = None
        self.child: LlamaCppProcess | None = None
        # probe()'s answer, asked once per engine: it reads /proc/cpuinfo and the probe file, which every message
        # (chat, API, each arena battle) did before. Forgotten when a child is found dead, so that a crash (a
        # rebuilt or unsuitable library) is checked again before the restart.
        self._probed: tuple[bool, str] | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def load(self, gguf: str | Path) -> None:
        """Have `gguf` loaded in a live child: start one if none runs, the last one crashed or held another file.
        Raises BackendStopped when llama.cpp cannot run here (the probe says why) or the child dies loading."""
        from .export import ExportError, _require_llama_cpp

        gguf = str(Path(gguf).resolve())
        if not Path(gguf).is_file():
            raise ExportError(f"{Path(gguf).name} does not exist; export the run to GGUF first (Runs tab, Export).")
        _require_llama_cpp()
        with self.lock:
            if self.path == gguf and self.child is not None and self.child.alive():
                return
            if self.child is not None and not self.child.alive():
                self._probed = None  # it crashed: ask again whether llama.cpp runs here before starting another
            if self._probed is None:
                self._probed = probe()
            ok, why = self._probed
            if not ok:
                raise BackendStopped(f"llama.cpp does not run on this machine: {why}")
            if self.child is not None:
                self.child.close()
                self.child, self.path = None, None
            log.info("loading GGUF %s for chat in a llama.cpp child process", gguf)
            child = LlamaCppProcess(gguf, n_ctx=N_CTX)
            child.start()
            self.child, self.path = child, gguf

    def close(self) -> None:
        with self.lock:
            if self.child is not None:
                self.child.close()
            self.child, self.path = None, None

    def _messages(self, messages: list[dict], settings: GenerationSettings) -> list[dict]:
        for m in messages:
            if len(m.get("content") or "") > MAX_MESSAGE_CHARS:
                raise ChatError(f"Message: {len(m['content']):,} characters is too long; the limit is "
                                f"{MAX_MESSAGE_CHARS:,}. Send a shorter message.")
        msgs = list(messages)
        if settings.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": settings.system_prompt}] + msgs
        return msgs

    def stream(self, messages: list[dict], settings: GenerationSettings, threads: int | None = None) -> Iterator[str]:
        if self.path is None:
            raise ChatError("No GGUF is loaded for the llama.cpp backend. Export the run to GGUF first.")
        msgs = self._messages(messages, settings)
        pieces: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        done = object()

        def work():
            try:
                with self.lock:
                    if self.child is None or not self.child.alive():
                        # The last child crashed or was closed: the next request starts a new one.
                        path, self.path = self.path, None
                        self.child = LlamaCppProcess(path, n_ctx=N_CTX)
                        self.child.start()
                        self.path = path
                    answers = self.child.request(
                        "chat", messages=msgs, max_tokens=int(settings.max_new_tokens),
                        temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=40,
                        seed=int(settings.seed), threads=int(threads or 0))
                    try:
                        for msg in answers:
                            if cancelled.is_set():
                                break  # the reader left: closing the request cancels it in the child
                            if msg.get("delta"):
                                pieces.put(msg["delta"])
                    finally:
                        answers.close()
            except BaseException as e:  # noqa: BLE001 - handed to the reader's thread below
                pieces.put(e)
            finally:
                pieces.put(done)

        t = threading.Thread(target=work, daemon=True, name="chat-llama-cpp")
        t.start()
        text, finished = "", False
        try:
            while True:
                item = pieces.get(timeout=600)
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                text += item
                yield text
            finished = True
        finally:
            if not finished:
                cancelled.set()
        t.join()

    def reply(self, messages: list[dict], settings: GenerationSettings) -> str:
        text = ""
        for text in self.stream(messages, settings):  # noqa: B007 - keep the last, complete text
            pass
        return text.strip()
