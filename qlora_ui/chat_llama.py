"""Chat from an exported GGUF through llama.cpp (llama-cpp-python): the fast CPU backend beside chat.ChatEngine.

Same contract as ChatEngine.stream: yields the growing reply text, takes the same GenerationSettings, stops
generating when its reader goes away, and holds its lock only inside the generation thread, never across a yield.
The prompt is rendered by the chat template stored in the GGUF (the model's own, written by the converter).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from .chat import MAX_MESSAGE_CHARS, MAX_PROMPT_TOKENS, GenerationSettings
from .config import ConfigError

log = logging.getLogger(__name__)

N_CTX = MAX_PROMPT_TOKENS + 1024


class LlamaCppEngine:
    """One loaded GGUF at a time; generation is serialised by a lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.path: str | None = None
        self.llm = None

    def load(self, gguf: str | Path) -> None:
        from .export import ExportError, _require_llama_cpp

        gguf = str(Path(gguf).resolve())
        if not Path(gguf).is_file():
            raise ExportError(f"{Path(gguf).name} does not exist; export the run to GGUF first (Runs tab, Export).")
        _require_llama_cpp()
        with self.lock:
            if self.path == gguf:
                return
            from llama_cpp import Llama

            log.info("loading GGUF %s for chat", gguf)
            self.llm = Llama(model_path=gguf, n_ctx=N_CTX, verbose=False, seed=0)
            self.path = gguf

    def _messages(self, messages: list[dict], settings: GenerationSettings) -> list[dict]:
        for m in messages:
            if len(m.get("content") or "") > MAX_MESSAGE_CHARS:
                raise ConfigError([f"Message: {len(m['content']):,} characters is too long; the limit is "
                                   f"{MAX_MESSAGE_CHARS:,}. Send a shorter message."])
        msgs = list(messages)
        if settings.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": settings.system_prompt}] + msgs
        return msgs

    def stream(self, messages: list[dict], settings: GenerationSettings, threads: int | None = None) -> Iterator[str]:
        if self.llm is None:
            raise ConfigError(["No GGUF is loaded for the llama.cpp backend. Export the run to GGUF first."])
        msgs = self._messages(messages, settings)
        pieces: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        done = object()

        def work():
            try:
                with self.lock:
                    llm = self.llm
                    if threads:
                        llm.set_n_threads(threads, threads) if hasattr(llm, "set_n_threads") else None
                    greedy = settings.temperature <= 0
                    out = llm.create_chat_completion(
                        messages=msgs, stream=True, max_tokens=int(settings.max_new_tokens),
                        temperature=0.0 if greedy else float(settings.temperature),
                        top_p=1.0 if greedy else float(settings.top_p), top_k=1 if greedy else 40,
                        seed=int(settings.seed))
                    for chunk in out:
                        if cancelled.is_set():
                            break  # the reader left: stop generating for nobody
                        delta = chunk["choices"][0].get("delta", {}).get("content")
                        if delta:
                            pieces.put(delta)
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
