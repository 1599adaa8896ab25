"""What a /v1 request may hold: the limits, OpenAI's error shape, and the checks on a request's body.

Every route reads its body through these (`_json_body`, `_refuse_unsupported`, `_messages`, `_stops`,
`_stream_flags`, `_number`), so both endpoints take and refuse the same things with the same OpenAI-style errors.
`Cutter` cuts a growing reply at a stop string for both the whole and the streamed answer. Nothing here loads a
model or touches the batch server; the routes (routes.py) do.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from ..chat import MAX_MESSAGE_CHARS

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



def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream, opts = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream", code="invalid_type")
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options", code="invalid_type")
    # stream_options without stream: ignored (some clients always send it); usage is in every whole reply anyway.
    return stream, stream and bool(opts.get("include_usage"))
