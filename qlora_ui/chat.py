"""Streaming generation with the base model or a trained adapter, from one loaded 4-bit base.

The chat model is its own instance and is never trained: on CPU, bitsandbytes repacks 4-bit weights
for inference on the first no-grad generate(), after which LoRA gradients silently come back None.
The batch server tags every model that generated (`modeling.mark_generated`); `modeling.prepare_for_training`
refuses such a model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig, QuantConfig, RunConfig
from .errors import ChatError
from .serving import BatchServer, Request

log = logging.getLogger(__name__)

# Prompt tokens one chat request may send. Prompt time grows with the square of its length on a CPU (a 1 MB
# message held the app for minutes); the oldest turns are dropped first, a single message over it is refused.
MAX_PROMPT_TOKENS = 2048
MAX_MESSAGE_CHARS = 8000
STREAM_TIMEOUT_S = 600  # a reader waits at most this long for its next token (a stuck worker must not hang it)


class Waiting(str):
    """A stream item that is not reply text: the request's place in the queue, shown where the reply will be."""

    def __new__(cls, position: int):
        obj = super().__new__(cls, f"⏳ Waiting for the model: you are number {position} in line.")
        obj.position = position
        return obj


@dataclass
class GenerationSettings:
    system_prompt: str = ""
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int = 0


def uses_dora(adapter_path: str | Path) -> bool:
    import json

    try:
        return bool(json.loads((Path(adapter_path) / "adapter_config.json").read_text()).get("use_dora"))
    except (OSError, ValueError):
        return False


def adapter_choices(run_dir: Path) -> list[Path]:
    """The run's final adapter plus each checkpoint's (PEFT saves an adapter in every checkpoint)."""
    from .runs import RunDir

    run = RunDir(Path(run_dir))
    out = [run.adapter_dir] if run.has_adapter() else []
    out += [c for c in reversed(run.checkpoints()) if (c / "adapter_config.json").is_file()]
    return out


class ChatEngine:
    """One loaded 4-bit base with adapters switched on and off. Generation is serialised by a lock."""

    def __init__(self, dequantize: str = "auto"):
        from .decode_weights import MODES

        if dequantize not in MODES:
            raise ChatError(f"Chat dequantize: {dequantize!r} is not a mode; use one of {', '.join(MODES)}.")
        # Decode from the base's 4-bit weights dequantized once (decode_weights.py): auto = where bitsandbytes has
        # no fused 4-bit kernel (a CPU without AVX512-BF16) and the copy is small.
        self.dequantize = dequantize
        self.decoding_from = ""  # what the loaded base decodes from, and why (logged, and read by tests)
        self.lock = threading.Lock()  # guards the model: loading, adapter switching, generating
        self.key: tuple | None = None
        self.model = None  # PeftModel once an adapter is loaded, else the base
        self.tokenizer = None
        self.adapters: dict[str, str] = {}  # adapter name -> path
        self.dora: set[str] = set()  # adapter names that use DoRA (peft cannot mix them with others in a batch)
        self.server = BatchServer(self)

    def _ensure_base(self, m: ModelConfig, q: QuantConfig, plain_layout: bool = False) -> None:
        from .modeling import keep_4bit_layout_trainable, load_base_model, load_tokenizer, resolve_model_path

        path = resolve_model_path(m)
        key = (path, q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype)
        # A base in the plain layout serves every adapter; a repacked one cannot serve DoRA (below).
        if self.key is not None and self.key[:5] == key and (self.key[5] or not plain_layout):
            return
        log.info("loading chat base %s%s", path, " (plain 4-bit layout, for DoRA)" if plain_layout else "")
        self.tokenizer = load_tokenizer(path, m)
        model = load_base_model(path, m, q)
        if plain_layout:
            # On a CPU with AVX512-BF16 the first no-grad forward repacks each 4-bit weight for a faster kernel,
            # and DoRA's weight norm, which dequantizes that weight itself, then reads the repacked bytes as if
            # they were plain: logits were off by 0.16 on a tiny model (tests/test_lora_options.py).
            keep_4bit_layout_trainable(model)
            self.decoding_from = "4-bit (a DoRA adapter is loaded)"
        else:
            self.decoding_from = self._dequantize(model)
        key = (*key, plain_layout)
        model.config.use_cache = True
        model.eval()
        self.model, self.key, self.adapters, self.dora = model, key, {}, set()

    def _dequantize(self, model) -> str:
        """Give the freshly loaded base (before its first forward) dequantized weights when the mode and budget
        say so. DoRA keeps the 4-bit path: its weight norm is computed from the 4-bit bytes (plain layout above),
        and one code path for it is enough."""
        from .decode_weights import dequantize_for_decoding, should_dequantize

        on, why = should_dequantize(model, self.dequantize)
        if not on:
            log.info("chat base decodes from its 4-bit weights: %s", why)
            return f"4-bit ({why})"
        added = dequantize_for_decoding(model)
        log.info("chat base decodes from dequantized weights (+%.0f MiB): %s", added / 2**20, why)
        return f"dequantized ({why})"

    def load(self, cfg: RunConfig, adapter_path: str | Path | None = None) -> str | None:
        """Make sure the base of `cfg` is loaded and the adapter (if any) attached; returns the adapter name."""
        # Already loaded (the usual case): answered without the lock, which the batch being decoded holds for a
        # whole reply. Waiting for it, a new request could not queue, hear its place in line or that the chat is
        # busy: it sat silent until the reply before it ended (issue 24, security 6a).
        from .modeling import resolve_model_path

        q, key, adapters = cfg.quantization, self.key, dict(self.adapters)
        dora = adapter_path is not None and uses_dora(adapter_path)
        want = (resolve_model_path(cfg.model), q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype)
        if key is not None and key[:5] == want and (key[5] or not dora):
            if adapter_path is None:
                return None
            resolved = str(Path(adapter_path).resolve())
            for name, p in adapters.items():
                if p == resolved:
                    return name
        with self.lock:
            dora = adapter_path is not None and uses_dora(adapter_path)
            self._ensure_base(cfg.model, cfg.quantization, plain_layout=dora)
            if adapter_path is None:
                return None
            adapter_path = str(Path(adapter_path).resolve())
            for name, p in self.adapters.items():
                if p == adapter_path:
                    return name
            from peft import PeftModel

            name = f"a{len(self.adapters)}"
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, adapter_path, adapter_name=name)
            else:
                self.model.load_adapter(adapter_path, adapter_name=name)
            self.model.eval()
            self.adapters[name] = adapter_path
            if dora:
                self.dora.add(name)
            return name

    def _prompt_ids(self, messages: list[dict], settings: GenerationSettings, max_tokens: int | None = None):
        """Token ids of the rendered conversation, cut to fit: the oldest turns go first; a last message that
        cannot fit on its own is refused with its size and the limit."""
        from .data import render_chat  # the same rendering (and fallback template) as training

        msgs = list(messages)
        for m in msgs:
            if len(m.get("content") or "") > MAX_MESSAGE_CHARS:
                raise ChatError(f"Message: {len(m['content']):,} characters is too long; the limit is "
                                f"{MAX_MESSAGE_CHARS:,}. Send a shorter message.")
        system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt and not any(
            m["role"] == "system" for m in msgs) else []
        budget = self.prompt_budget(settings) if max_tokens is None else max_tokens
        while True:
            text = render_chat(self.tokenizer, system + msgs, add_generation_prompt=True)
            inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            n = inputs["input_ids"].shape[1]
            if n <= budget:
                return inputs
            turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
            if len(turns) <= 1:
                raise ChatError(f"Message: {n:,} tokens with the chat template is more than this chat "
                                f"accepts ({budget:,}, leaving room for the reply). Send a shorter message.")
            # Drop the oldest user/assistant pair (or the oldest turn), never the newest message.
            drop = turns[:2] if len(turns) > 2 else turns[:1]
            msgs = [m for i, m in enumerate(msgs) if i not in drop]

    def prompt_budget(self, settings: GenerationSettings) -> int:
        ctx = getattr(getattr(self.model, "config", None), "max_position_embeddings", None) or MAX_PROMPT_TOKENS
        return max(16, min(MAX_PROMPT_TOKENS, int(ctx) - int(settings.max_new_tokens)))

    def stream(self, messages: list[dict], settings: GenerationSettings, adapter: str | None,
               threads: int | None = None, session: str | None = None) -> Iterator[str]:
        """Yield the reply text as it grows. `adapter=None` generates with the adapters switched off.

        The request joins the batch server's queue (serving.py): requests waiting together share forward passes.
        While it waits, the stream yields a `Waiting` notice with its place in line; the last item is the full
        reply. Closing the stream (a browser that left) takes the request out of its batch at the next token.
        `session` allows one request at a time per browser session (`ChatBusy` otherwise).
        """
        inputs = self._prompt_ids(messages, settings)
        req = Request(ids=inputs["input_ids"][0].tolist(), temperature=float(settings.temperature),
                      top_p=float(settings.top_p), max_new_tokens=int(settings.max_new_tokens),
                      seed=int(settings.seed), adapter=adapter, session=session, threads=threads, key=self.key)
        self.server.submit(req)
        text, done = "", False
        try:
            while not done:
                kind, value = req.out.get(timeout=STREAM_TIMEOUT_S)
                if kind == "position":
                    if not text:
                        yield Waiting(value)
                elif kind == "error":
                    raise value
                else:
                    text, done = value, kind == "done"
                    if not done:
                        yield text
            yield text
        finally:
            self.server.release(req)
            if not done:
                log.info("chat reply abandoned by its reader: generation stopped after %d characters", len(text))

    def reply(self, messages: list[dict], settings: GenerationSettings, adapter: str | None) -> str:
        text = ""
        for text in self.stream(messages, settings, adapter):  # noqa: B007 - keep the last, complete text
            pass
        return text.strip()
