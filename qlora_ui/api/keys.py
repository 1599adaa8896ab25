"""Who may call /v1: the API keys (--api-key, --api-key-file), their check on every request, and what the Chat
tab says about them.

Keys: the API reads `Authorization: Bearer KEY` only, never Gradio's login cookie; Gradio reads its cookie only, so
an API key does not open the page. A wrong key is throttled like a wrong login (webguard.KeyThrottle).
"""

from __future__ import annotations

from fastapi import Request
from starlette.exceptions import HTTPException

from .requests import ApiError


def read_api_keys(key: str | None, key_file: str | None) -> list[str]:
    """--api-key and --api-key-file (one key per line, '#' comments), the file's permissions checked like
    --auth-file's: keys are passwords. Raises ValueError with the fix."""
    keys = [key] if key is not None else []
    if key_file:
        from ..webguard import read_secret_file

        keys += read_secret_file(key_file, "--api-key-file", "the keys", "a key of their own")
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
        from ..webguard import KeyThrottle

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



# ---- what the Chat tab shows ----

def access(keys: list[str], exposed: bool) -> str:
    """'open' (loopback, no key), 'key' (a key is needed), or 'off' (shared without a key: the API is off)."""
    return "key" if keys else ("off" if exposed else "open")
