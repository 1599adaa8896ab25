"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions` over the batch server.

Mounted on the app's own server (same port, same share link: app.py) or served alone (`python -m qlora_ui serve`).
Every request becomes one row of the same batch server the Chat tab uses (serving.py), with the same limits: message
size, prompt tokens, the reply cap (`--chat-max-new-tokens`), the waiting queue (`--chat-max-waiting`, else 429).
A chat request's prompt is rendered by `ChatEngine._prompt_ids`, the Chat tab's own rendering, so the same run,
messages, seed and greedy settings give the same reply on both.

Why the rows are submitted here and not through `ChatEngine.stream`: the API needs the request itself, to count the
generated tokens (`usage`, `finish_reason`) and to drop a row whose client went away while it still waits in line.

A run's exported GGUF is answered by the Chat tab's llama.cpp backend instead (one reply at a time, in its child
process), read through the same row interface.

Keys: the API reads `Authorization: Bearer KEY` only, never Gradio's login cookie; Gradio reads its cookie only, so
an API key does not open the page. This module imports FastAPI, never gradio: `serve` runs it without the page.
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .chat import MAX_MESSAGE_CHARS, MAX_PROMPT_TOKENS, STREAM_TIMEOUT_S, GenerationSettings, adapter_choices
from .config import BUNDLED_MODEL, RunConfig
from .errors import BusyError, ChatError, UserError
from .native.client import BackendStopped
from .serving import Request as Row

log = logging.getLogger(__name__)

API_MAX_TOKENS = 1024  # the Chat tab's own maximum, when the app sets no --chat-max-new-tokens
DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 1 << 20  # a request body; the messages inside have their own limits
MAX_STOPS, MAX_STOP_CHARS = 4, 200
POLL_S = 1.0  # a non-streaming request looks for a closed connection this often
RETRY_AFTER_S = 2
LLAMA_CPP = "llama.cpp"  # the `key` of a row answered by the llama.cpp child, not by the batch server
ROLES = {"system", "user", "assistant", "developer"}  # "developer" is OpenAI's newer name for system
# Parameters some clients always send: accepted at their neutral value, refused otherwise (never ignored silently).
NEUTRAL = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (False, None),
           "top_logprobs": (0, None), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
           "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}), "best_of": (1, None),
           "echo": (False, None), "suffix": (None, ""), "parallel_tool_calls": (None, True, False)}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def busy(message: str) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


# ---- keys ----

def read_api_keys(key: str | None, key_file: str | None) -> list[str]:
    """--api-key and --api-key-file (one key per line, '#' comments), the file's permissions checked like
    --auth-file's: keys are passwords. Raises ValueError with the fix."""
    keys = [key] if key is not None else []
    if key_file:
        mode = Path(key_file).stat().st_mode
        if mode & 0o002:
            raise ValueError(f"--api-key-file {key_file} is writable by every user of this machine, who could add a "
                             f"key of their own. Fix it with: chmod 600 {key_file}")
        if mode & 0o004:
            raise ValueError(f"--api-key-file {key_file} is readable by every user of this machine, and it holds "
                             f"the keys in plain text. Fix it with: chmod 600 {key_file}")
        keys += [line.strip() for line in Path(key_file).read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    for k in keys:
        if not k.strip() or any(c.isspace() for c in k.strip()) or len(k) > 512:
            raise ValueError("API keys are 1 to 512 characters without spaces (one per line in --api-key-file).")
    if key_file and not keys:
        raise ValueError(f"--api-key-file {key_file} holds no key.")
    return [k.strip() for k in keys]


class KeyCheck:
    """Who may call /v1. Keys configured: a matching `Authorization: Bearer` key, compared in constant time, failed
    attempts throttled like the login (webguard.KeyThrottle). No key on loopback: anyone (any key is accepted, as
    llama-server does). No key on an app reachable beyond loopback: nobody (the API stays off)."""

    def __init__(self, keys: list[str], exposed: bool):
        from .webguard import KeyThrottle

        self.keys, self.exposed = list(keys), exposed
        self.throttle = KeyThrottle(self.keys) if self.keys else None

    def __call__(self, request: Request) -> None:
        if self.throttle is None:
            if self.exposed:
                raise ApiError(401, "The API is off: this app is reachable beyond this machine (--share or a "
                               "non-local --host) and was started without --api-key or --api-key-file.",
                               code="api_off")
            return
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "No API key: send it as 'Authorization: Bearer KEY'.", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        who = request.client.host if request.client else "?"
        try:
            ok = self.throttle(who, token.strip())
        except HTTPException as e:  # locked out after too many wrong keys
            raise ApiError(429, str(e.detail), type="rate_limit_error", code="too_many_failed_keys",
                           headers=dict(e.headers or {})) from None
        if not ok:
            raise ApiError(401, "Incorrect API key.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ---- models ----

@dataclass
class Target:
    """What a model id answers with: a base (adapter None) or a run's latest saved adapter."""

    id: str
    cfg: RunConfig
    adapter: Path | None
    created: int
    parent: str | None = None
    fingerprint: str = "base"
    gguf: Path | None = None  # answered by llama.cpp from this exported file instead

    def card(self) -> dict:
        card = {"id": self.id, "object": "model", "created": self.created, "owned_by": "qlora-studio"}
        if self.parent:
            card["parent"] = self.parent
        return card


def latest_adapter(run) -> Path | None:
    """The adapter saved last: a finished run's final adapter, or a training run's newest checkpoint (its final
    adapter, if any, is from before a resume)."""
    found = adapter_choices(run.path)
    if not found:
        return None
    return max(found, key=lambda p: (p / "adapter_config.json").stat().st_mtime)


class Models:
    """Model ids -> targets: every run with a saved adapter (id = the run folder's name) and their base models
    (id = the hub id or bundled name, or a local model folder's name), plus the bundled base."""

    def __init__(self, studio, runs: list[str] | None = None):
        self.studio, self.only = studio, (set(runs) if runs else None)
        self.started = int(time.time())
        self._llama_cpp: bool | None = None

    def base_id(self, name: str) -> str:
        name = name.strip()
        return name if name == BUNDLED_MODEL or self.studio.is_hub_id(name) else Path(name).name

    def _runs(self):
        for run in self.studio.runs():
            if self.only is not None and run.name not in self.only:
                continue
            try:
                cfg = run.config()
                adapter = latest_adapter(run)
            except (UserError, OSError, ValueError):
                continue
            if adapter is not None:
                yield run, cfg, adapter

    def _run_target(self, run, cfg, adapter) -> Target:
        state = run.read_status()
        # Which adapter answered: the final one, or checkpoint-N (the step) of a run that may still be training.
        fp = f"{run.name}/{adapter.name}" + (" (still training)" if state.get("state") == "running" else "")
        return Target(run.name, cfg, adapter, int(state.get("created") or run.path.stat().st_mtime),
                      parent=self.base_id(cfg.model.base_model), fingerprint=fp)

    def _gguf_targets(self, run, cfg, parent: str) -> list[Target]:
        """A run's exported GGUFs (id RUN/FILE.gguf), when llama.cpp runs on this machine."""
        from .export import ggufs

        found = ggufs(run)
        if not found or not self.llama_cpp_ok():
            return []
        return [Target(f"{run.name}/{g.name}", cfg, None, int(g.stat().st_mtime), parent=parent,
                       fingerprint=f"{run.name}/export/{g.name} (llama.cpp)", gguf=g) for g in found]

    def llama_cpp_ok(self) -> bool:
        """The once-per-machine probe (a child evaluates a few tokens), asked once: its answer is kept."""
        if self._llama_cpp is None:
            from .native.client import probe

            try:
                self._llama_cpp = bool(probe()[0])
            except Exception:  # noqa: BLE001 - no llama.cpp here: the GGUFs are simply not offered
                log.info("api: llama.cpp is not available; exported GGUFs are not listed", exc_info=True)
                self._llama_cpp = False
        return self._llama_cpp

    def all(self) -> list[Target]:
        runs, bases = [], {}
        for run, cfg, adapter in self._runs():
            target = self._run_target(run, cfg, adapter)
            runs.append(target)
            runs += self._gguf_targets(run, cfg, target.parent)
            # A base answers with the quantization of its newest run, so it shares that run's loaded model.
            bases.setdefault(target.parent, Target(target.parent, cfg, None, self.started))
        if self.only is None:
            bases.setdefault(BUNDLED_MODEL, Target(BUNDLED_MODEL, RunConfig().updated(base_model=BUNDLED_MODEL),
                                                   None, self.started))
        return list(bases.values()) + runs

    def find(self, model_id: Any) -> Target:
        if not isinstance(model_id, str) or not model_id.strip():
            raise ApiError(400, "'model' is required: one of the ids GET /v1/models lists.", param="model",
                           code="missing_model")
        for run, cfg, adapter in self._runs():
            if run.name == model_id:
                return self._run_target(run, cfg, adapter)
            if model_id.startswith(f"{run.name}/"):
                for t in self._gguf_targets(run, cfg, self.base_id(cfg.model.base_model)):
                    if t.id == model_id:
                        return t
        for t in self.all():
            if t.id == model_id:
                return t
        raise ApiError(404, f"The model '{model_id[:200]}' does not exist here. GET /v1/models lists the base models "
                       "and every run with a saved adapter.", param="model", code="model_not_found")


# ---- parameters ----

def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}.", param=name,
                       code="invalid_type")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise ApiError(400, f"'{name}' is {v}; it must be {'above' if lo_open else 'at least'} {lo:g} and at most "
                       f"{hi:g}.", param=name, code="invalid_value")
    return int(v) if integer else float(v)


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "'n' must be 1: this server writes one reply per request. Send the request again for "
                       "another one.", param="n", code="unsupported_value")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server (see docs/api.md); leave it out.",
                           param=name, code="unsupported_parameter")


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"'stop' is a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters.", param="stop", code="invalid_value")
    return stops


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported.",
                           param=f"messages[{i}].content", code="unsupported_content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string.", param=f"messages[{i}].content",
                       code="invalid_type")
    if len(content) > MAX_MESSAGE_CHARS:
        raise ApiError(400, f"messages[{i}]: {len(content):,} characters is too long; the limit is "
                       f"{MAX_MESSAGE_CHARS:,}.", param=f"messages[{i}].content", code="string_above_max_length")
    return content


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}.", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant.",
                           param=f"messages[{i}].role", code="invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    if out[-1]["role"] == "assistant":
        raise ApiError(400, "The last message is the assistant's: end with the user's message.", param="messages",
                       code="invalid_value")
    return out


class Cutter:
    """Turns the growing reply into what may be sent: cut at the first stop string, holding back an unfinished
    UTF-8 character ('\ufffd' until its last byte comes) and a tail that may be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.sent, self.stopped = stops, 0, False
        self.text = ""  # what was sent so far; the whole reply once final

    def update(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, final, self.stopped = text[:min(hits)], True, True
        safe = len(text)
        if not final:
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            for s in self.stops:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        self.text = text[:self.sent]
        return delta


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
        from .data import render_chat

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


async def _json_body(request: Request) -> dict:
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is over {MAX_BODY_BYTES:,} bytes.", code="body_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is over {MAX_BODY_BYTES:,} bytes.", code="body_too_large")
    try:
        body = json.loads(bytes(raw))
    except ValueError:
        raise ApiError(400, "The request body is not JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


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


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream, opts = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream", code="invalid_type")
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options", code="invalid_type")
    # stream_options without stream: ignored (some clients always send it); usage is in every whole reply anyway.
    return stream, stream and bool(opts.get("include_usage"))


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

    from .webguard import SameOriginGuard

    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    root.mount("/v1", build_api(studio, keys, exposed, runs))
    uvicorn.run(SameOriginGuard(root, allowed_hosts=tuple(allowed_hosts)), host=host, port=port,
                log_level="warning")


# ---- what the Chat tab shows ----

def access(keys: list[str], exposed: bool) -> str:
    """'open' (loopback, no key), 'key' (a key is needed), or 'off' (shared without a key: the API is off)."""
    return "key" if keys else ("off" if exposed else "open")


def base_url(host: str | None, scheme: str = "http") -> str:
    """The /v1 address as the browser reached the app (its Host header: the share link's host behind it)."""
    return f"{scheme}://{host or '127.0.0.1:7860'}/v1"


def client_examples(url: str, model: str, api_access: str = "open") -> dict[str, str]:
    """A curl line and an `openai` snippet for `model` at `url`, copyable as they are."""
    key = "$QLORA_API_KEY" if api_access != "open" else "none"
    auth = " -H \"Authorization: Bearer $QLORA_API_KEY\"" if api_access != "open" else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64})
    curl = f"curl -s {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
    key_py = 'os.environ["QLORA_API_KEY"]' if api_access != "open" else '"none"'
    python = "\n".join([
        *(["import os", ""] if api_access != "open" else []),
        "from openai import OpenAI",
        "",
        f"client = OpenAI(base_url={json.dumps(url)}, api_key={key_py})",
        f"reply = client.chat.completions.create(model={json.dumps(model)}, max_tokens=64,",
        '                                       messages=[{"role": "user", "content": "Hi!"}])',
        "print(reply.choices[0].message.content)",
    ])
    return {"curl": curl, "python": python, "key": key}
