"""The /v1 routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions` over the batch server.

Mounted on the app's own server (same port, same share link: app.py) or served alone (`python -m qlora_ui serve`).
Every request becomes one row of the same batch server the Chat tab uses (serving.py), with the same limits: message
size, prompt tokens, the reply cap (`--chat-max-new-tokens`), the waiting queue (`--chat-max-waiting`, else 429).
A chat request's prompt is rendered by `ChatEngine._prompt_ids`, the Chat tab's own rendering, so the same run,
messages, seed and greedy settings give the same reply on both.

Why the rows are submitted here and not through `ChatEngine.stream`: the API needs the request itself, to count the
generated tokens (`usage`, `finish_reason`) and to drop a row whose client went away while it still waits in line.

A run's exported GGUF is answered by the Chat tab's llama.cpp backend instead (one reply at a time, in its child
process), read through the same row interface.

Every route checks the key first (keys.py), reads its body through requests.py's checks and its 'model' through
models.py. This module imports FastAPI, never gradio: `serve` runs it without the page.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
import uuid
from contextlib import aclosing
from functools import partial

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..chat import MAX_MESSAGE_CHARS, MAX_PROMPT_TOKENS, STREAM_TIMEOUT_S, GenerationSettings
from ..errors import BusyError, ChatError, UserError
from ..native.client import BackendStopped
from ..serving import Request as Row
from .keys import KeyCheck, access
from .models import Models, Target
from .requests import (
    API_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    LLAMA_CPP,
    POLL_S,
    RETRY_AFTER_S,
    ApiError,
    Cutter,
    _json_body,
    _messages,
    _number,
    _refuse_unsupported,
    _stops,
    _stream_flags,
    busy,
)

log = logging.getLogger(__name__)


# ---- the app ----

class Api:
    """One /v1 app's state: the studio (its chat engine and batch server), the model ids, the keys."""

    def __init__(self, studio, keys: list[str] | None = None, exposed: bool = False, runs: list[str] | None = None):
        self.studio, self.models = studio, Models(studio, runs)
        self.check = KeyCheck(list(keys or []), exposed)
        self._gguf_lock, self._gguf_rows = threading.Lock(), 0

    @property
    def engine(self):
        return self.studio.chat

    def max_tokens(self, body: dict) -> int:
        limit = self.studio.chat_max_new_tokens or API_MAX_TOKENS
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        n = _number(body, name, 1, 1 << 31, None, integer=True)
        return min(n, limit) if n is not None else min(DEFAULT_MAX_TOKENS, limit)

    def settings(self, body: dict) -> GenerationSettings:
        seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True)
        return GenerationSettings(system_prompt="", temperature=_number(body, "temperature", 0, 2, 1.0),
                                  top_p=_number(body, "top_p", 0, 1, 1.0, lo_open=True),
                                  max_new_tokens=self.max_tokens(body),
                                  # torch generators take a 64-bit seed; OpenAI's is any integer
                                  seed=(seed % (1 << 63)) if seed is not None else secrets.randbelow(1 << 31))

    async def load(self, target: Target) -> str | None:
        """The engine's adapter name for `target` once its base (and adapter) are loaded."""
        try:
            self.studio.check_model(target.cfg.model)
            return await anyio.to_thread.run_sync(self.engine.load, target.cfg, target.adapter)
        except BusyError as e:
            raise busy(str(e)) from None
        except UserError as e:
            raise ApiError(400, f"The model '{target.id}' cannot be loaded: {e}", param="model",
                           code="model_not_loadable") from None

    async def submit(self, ids: list[int], settings: GenerationSettings, adapter: str | None) -> Row:
        row = Row(ids=list(ids), temperature=float(settings.temperature), top_p=float(settings.top_p),
                  max_new_tokens=int(settings.max_new_tokens), seed=int(settings.seed), adapter=adapter,
                  threads=self.studio.chat_threads(), key=self.engine.key)
        try:
            return self.engine.server.submit(row)
        except BusyError as e:
            raise busy(str(e)) from None

    async def gguf_row(self, target: Target, messages: list[dict], settings: GenerationSettings) -> tuple[Row, int]:
        """A chat request for an exported GGUF: answered by the llama.cpp child (one reply at a time, as the Chat
        tab's llama.cpp backend), read through the same row interface. Tokens are counted with the base's
        tokenizer (the GGUF's own is the same vocabulary)."""
        from ..data import render_chat

        gguf_chat = self.studio.gguf_chat
        try:
            await anyio.to_thread.run_sync(gguf_chat.load, target.gguf)
            tok = await anyio.to_thread.run_sync(self.studio.tokenizer_for, target.cfg.model.base_model)
        except BackendStopped as e:
            raise ApiError(503, f"{e}. Use the run's id for the transformers answer.", type="server_error",
                           code="backend_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except UserError as e:
            raise ApiError(400, f"The model '{target.id}' cannot be loaded: {e}", param="model",
                           code="model_not_loadable") from None
        prompt = len(tok(render_chat(tok, messages, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"])
        if prompt > MAX_PROMPT_TOKENS:
            raise ApiError(400, f"The messages are {prompt:,} tokens with the chat template; this model takes at most "
                           f"{MAX_PROMPT_TOKENS:,}.", param="messages", code="context_length_exceeded")
        with self._gguf_lock:
            if self._gguf_rows >= self.engine.server.max_waiting:
                raise busy(f"The chat is busy: {self._gguf_rows} requests already wait for llama.cpp.")
            self._gguf_rows += 1
        row = Row(ids=[], temperature=settings.temperature, top_p=settings.top_p,
                  max_new_tokens=settings.max_new_tokens, seed=settings.seed, adapter=None, key=LLAMA_CPP)

        def pump() -> None:
            replies = gguf_chat.stream(messages, settings, threads=self.studio.chat_threads())
            text = ""
            try:
                for text in replies:
                    if row.cancelled.is_set():
                        return  # closing the stream cancels the reply in the child
                    row.out.put(("text", text))
                row.tokens = len(tok(text, add_special_tokens=False)["input_ids"])
                row.out.put(("done", text))
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                row.out.put(("error", e))
            finally:
                replies.close()
                with self._gguf_lock:
                    self._gguf_rows -= 1

        threading.Thread(target=pump, daemon=True, name="api-llama-cpp").start()
        return row, prompt

    def release(self, row: Row, finished: bool) -> None:
        if row.key == LLAMA_CPP:
            row.cancelled.set()
        else:
            self.engine.server.release(row)
        row.out.put(("closed", None))  # wakes a reader thread still waiting on the row
        if not finished:
            log.info("api: client went away after %d of %d tokens; its row leaves the batch at the next token",
                     row.tokens, row.max_new_tokens)

    async def replies(self, row: Row, request: Request | None):
        """('text', reply so far) items, then ('done', reply); ('position', n) while it waits. Releases the row
        when the caller stops (finished, failed or disconnected). With `request`, a closed connection ends it."""
        finished, quiet_since, checked = False, time.monotonic(), time.monotonic()
        try:
            while True:
                if request is not None and time.monotonic() - checked >= POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    kind, value = await anyio.to_thread.run_sync(partial(row.out.get, timeout=POLL_S),
                                                                 abandon_on_cancel=True)
                except queue.Empty:
                    if time.monotonic() - quiet_since > STREAM_TIMEOUT_S:
                        raise ApiError(500, "The model stopped answering.", type="server_error",
                                       code="timeout") from None
                    continue
                quiet_since = time.monotonic()
                if kind == "error":
                    finished = True
                    if isinstance(value, BusyError):
                        raise busy(str(value))
                    if isinstance(value, BackendStopped):
                        raise ApiError(503, f"{value}. Send it again (a new llama.cpp process starts), or use the "
                                       "run's id for the transformers answer.", type="server_error",
                                       code="backend_stopped")
                    log.error("api: generation failed: %r", value)
                    raise ApiError(500, "Generation failed; see the app's log.", type="server_error",
                                   code="generation_failed")
                if kind == "closed":
                    return
                finished = kind == "done"
                yield kind, value
                if finished:
                    return
        finally:
            self.release(row, finished)


async def _collect(api: Api, row: Row, request: Request, stops: list[str]) -> Cutter:
    """A non-streaming reply, whole (cut at a stop string); a closed connection stops its row."""
    cut = Cutter(stops)
    async with aclosing(api.replies(row, request)) as replies:
        async for kind, value in replies:
            if kind != "position":
                cut.update(value, kind == "done")
                if cut.stopped:
                    break
    return cut


def _finish(row: Row, cut: Cutter) -> str:
    return "stop" if cut.stopped or row.tokens < row.max_new_tokens else "length"


def _usage(prompt: int, row: Row) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": row.tokens, "total_tokens": prompt + row.tokens}



def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def build_api(studio, keys: list[str] | None = None, exposed: bool = False, runs: list[str] | None = None) -> FastAPI:
    """The /v1 app: mount it at "/v1" (app.py), or serve it alone (serve())."""
    api = Api(studio, keys, exposed, runs)

    async def keys_first(request: Request) -> None:
        try:
            api.check(request)
        except ApiError as e:
            log.warning("api: refused %s %s: %s", request.method, request.url.path, e.code)
            raise

    # Not a middleware: Starlette's BaseHTTPMiddleware wraps every streamed reply (and its disconnect).
    app = FastAPI(title="QLoRA Studio OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(keys_first)])
    app.state.api = api

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        codes = {404: ("Unknown endpoint: this server has GET /v1/models, POST /v1/chat/completions and POST "
                       "/v1/completions.", "unknown_url"), 405: ("Method not allowed here.", "method_not_allowed")}
        msg, code = codes.get(e.status_code, (str(e.detail), None))
        return ApiError(e.status_code, msg, code=code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("api: request failed")
        return ApiError(500, "The server failed on this request; see the app's log.", type="server_error",
                        code="server_error").response()

    @app.get("/models")
    async def list_models():
        targets = await anyio.to_thread.run_sync(api.models.all)
        return {"object": "list", "data": [t.card() for t in targets]}

    @app.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        target = await anyio.to_thread.run_sync(api.models.find, model_id)
        return target.card()

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        _refuse_unsupported(body)
        messages = _messages(body)
        settings, stops = api.settings(body), _stops(body)
        stream, include_usage = _stream_flags(body)
        target = await anyio.to_thread.run_sync(api.models.find, body.get("model"))
        if target.gguf is not None:
            row, prompt_tokens = await api.gguf_row(target, messages, settings)
        else:
            adapter = await api.load(target)
            try:  # the Chat tab's rendering and limits (the oldest turns dropped to fit, a too-long last one refused)
                ids = (await anyio.to_thread.run_sync(api.engine._prompt_ids, messages, settings))["input_ids"][0]
            except ChatError as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            row, prompt_tokens = await api.submit(ids.tolist(), settings, adapter), len(ids)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()),
                    model=target.id, system_fingerprint=target.fingerprint)
        headers = {"X-QLoRA-Adapter": target.fingerprint}
        if stream:
            return StreamingResponse(_chat_events(api, row, meta, stops, prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers=headers | SSE_HEADERS)
        cut = await _collect(api, row, request, stops)
        choice = {"index": 0, "message": {"role": "assistant", "content": cut.text, "refusal": None},
                  "logprobs": None, "finish_reason": _finish(row, cut)}
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(prompt_tokens, row)}, headers=headers)

    @app.post("/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        _refuse_unsupported(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be one non-empty string (token arrays and several prompts are not "
                           "supported).", param="prompt", code="invalid_value")
        if len(prompt) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"'prompt': {len(prompt):,} characters is too long; the limit is "
                           f"{MAX_MESSAGE_CHARS:,}.", param="prompt", code="string_above_max_length")
        settings, stops = api.settings(body), _stops(body)
        stream, include_usage = _stream_flags(body)
        target = await anyio.to_thread.run_sync(api.models.find, body.get("model"))
        if target.gguf is not None:
            raise ApiError(400, f"'{target.id}' (a GGUF, answered by llama.cpp) takes chat completions only; use "
                           "POST /v1/chat/completions, or the run's id here.", param="model", code="unsupported_model")
        adapter = await api.load(target)
        ids = api.engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        budget = api.engine.prompt_budget(settings)
        if len(ids) > budget:
            raise ApiError(400, f"'prompt' is {len(ids):,} tokens; this server takes at most {budget:,} (leaving "
                           "room for the reply).", param="prompt", code="context_length_exceeded")
        row = await api.submit(ids, settings, adapter)
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
                    model=target.id, system_fingerprint=target.fingerprint)
        headers = {"X-QLoRA-Adapter": target.fingerprint}
        if stream:
            return StreamingResponse(_completion_events(api, row, meta, stops, len(ids), include_usage),
                                     media_type="text/event-stream", headers=headers | SSE_HEADERS)
        cut = await _collect(api, row, request, stops)
        choice = {"text": cut.text, "index": 0, "logprobs": None, "finish_reason": _finish(row, cut)}
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(len(ids), row)}, headers=headers)

    return app



SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _events(api: Api, row: Row, stops: list[str], make_chunk, first: dict | None, last, usage_chunk):
    """The SSE stream shared by both endpoints: deltas as the reply grows, a final chunk with finish_reason, the
    usage chunk if asked, then `data: [DONE]`. A comment line while the request waits in line keeps proxies (and
    the disconnect check) going; an error after the start is sent as OpenAI does, as an `error` event."""
    cut = Cutter(stops)
    try:
        if first is not None:
            yield _sse(first)
        async with aclosing(api.replies(row, None)) as replies:
            async for kind, value in replies:
                if kind == "position":
                    yield f": waiting for the model, number {value} in line\n\n".encode()
                    continue
                delta = cut.update(value, kind == "done")
                if delta:
                    yield _sse(make_chunk(delta))
                if cut.stopped:
                    break
        yield _sse(last(_finish(row, cut)))
        if usage_chunk is not None:
            yield _sse(usage_chunk())
        yield _sse("[DONE]")
    except ApiError as e:
        yield _sse(e.body())


def _chat_events(api: Api, row: Row, meta: dict, stops: list[str], prompt_tokens: int, include_usage: bool):
    base = meta | {"object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    return _events(api, row, stops, lambda d: chunk({"content": d}), chunk({"role": "assistant", "content": ""}),
                   lambda f: chunk({}, f),
                   (lambda: {**base, "choices": [], "usage": _usage(prompt_tokens, row)}) if include_usage else None)


def _completion_events(api: Api, row: Row, meta: dict, stops: list[str], prompt_tokens: int, include_usage: bool):
    base = meta | ({"usage": None} if include_usage else {})

    def chunk(text: str, finish: str | None = None) -> dict:
        return {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    return _events(api, row, stops, chunk, None, lambda f: chunk("", f),
                   (lambda: {**base, "choices": [], "usage": _usage(prompt_tokens, row)}) if include_usage else None)


def mount(app, studio, keys: list[str] | None = None, exposed: bool = False) -> FastAPI:
    """Put the API under /v1 of an app already serving (Gradio's): same port, same share link."""
    sub = build_api(studio, keys, exposed)
    app.mount("/v1", sub)
    # The Chat tab's example says whether a key is needed, or that the API is off.
    studio.api_access = access(list(keys or []), exposed)
    return sub


def serve(studio, host: str, port: int, keys: list[str], exposed: bool, allowed_hosts: list[str],
          runs: list[str] | None = None) -> None:
    """`python -m qlora_ui serve`: the /v1 API alone, without the page, behind the same host and origin rule."""
    import uvicorn

    from ..webguard import SameOriginGuard

    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    root.mount("/v1", build_api(studio, keys, exposed, runs))
    uvicorn.run(SameOriginGuard(root, allowed_hosts=tuple(allowed_hosts)), host=host, port=port,
                log_level="warning")
