"""What stands between a shared link and strangers, beyond Gradio's own login: sign-in throttling and a
same-origin rule for every request.

Kept out of the engine (it knows nothing of the web) and out of the tab builders (it is about the server).
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

_API_INFO = re.compile(rb"window\.gradio_api_info\s*=.*?;</script>", re.S)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}


class LoginThrottle:
    """Gradio's `auth=` callable: checks USER:PASS pairs in constant time, and after `max_failures` wrong
    passwords for one user name within `window_s` refuses that name for `lockout_s` (doubling on each further
    failure, at most `max_lockout_s`), even with the right password. Keyed by user name, not client address:
    behind the share tunnel every client has the tunnel's address."""

    def __init__(self, pairs: list[tuple[str, str]], max_failures: int = 5, window_s: float = 300,
                 lockout_s: float = 30, max_lockout_s: float = 600, max_names: int = 10_000):
        self.pairs = [(u.encode(), p.encode()) for u, p in pairs]
        self.max_failures, self.window_s = max_failures, window_s
        self.lockout_s, self.max_lockout_s, self.max_names = lockout_s, max_lockout_s, max_names
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def locked_for(self, username: str, now: float | None = None) -> float:
        """Seconds until `username` may try again (0 = now)."""
        now = time.time() if now is None else now
        with self._lock:
            times = [t for t in self._failures.get(username, []) if now - t < self.window_s]
        if len(times) < self.max_failures:
            return 0.0
        extra = len(times) - self.max_failures
        wait = min(self.lockout_s * 2 ** extra, self.max_lockout_s)
        return max(0.0, times[-1] + wait - now)

    def check(self, username: str, password: str) -> bool:
        u, p = username.encode(), password.encode()
        ok = False
        for user, pw in self.pairs:  # every pair, every time: the answer's timing says nothing
            ok |= hmac.compare_digest(user, u) & hmac.compare_digest(pw, p)
        return ok

    def __call__(self, username: str, password: str) -> bool:
        wait = self.locked_for(username)
        if wait > 0:
            from fastapi import HTTPException

            log.warning("sign-in refused: too many failures for one user name (%.0f s left)", wait)
            raise HTTPException(status_code=429, detail=f"Too many failed sign-ins for this user name. "
                                f"Try again in {int(wait) + 1} s.", headers={"Retry-After": str(int(wait) + 1)})
        if self.check(username, password):
            with self._lock:
                self._failures.pop(username, None)
            return True
        now = time.time()
        with self._lock:
            times = [t for t in self._failures.pop(username, []) if now - t < self.window_s] + [now]
            self._failures[username] = times
            while len(self._failures) > self.max_names:
                self._failures.popitem(last=False)
        return False


def _host_name(value: str) -> str:
    """'https://a.b:7860' or 'a.b:7860' -> 'a.b'."""
    if "//" not in value:
        value = "//" + value
    try:
        return (urlsplit(value).hostname or "").lower()
    except ValueError:
        return ""


def same_origin(origin: str, host: str | None, forwarded_host: str | None = None) -> bool:
    o = _host_name(origin)
    if not o or origin == "null":
        return False
    hosts = {_host_name(h) for h in (host, forwarded_host) if h}
    if o in hosts:
        return True
    # A page served on localhost talking to 127.0.0.1 (or back) is still this machine.
    return o in LOOPBACK_NAMES and bool(hosts & LOOPBACK_NAMES)


class SameOriginGuard:
    """ASGI middleware, outermost: a request that carries an `Origin` other than the app's own is refused
    before Gradio's CORS layer can grant it (Gradio grants any origin, with credentials, whenever the app is
    reached by a name other than localhost: a share link or a LAN address). Also turns Gradio's
    `SameSite=None` login cookie into `SameSite=Lax`, so other sites' pages do not send it at all."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, headers.get("host"), headers.get("x-forwarded-host")):
            log.warning("refused a cross-origin request from %s to %s", origin[:100], scope.get("path"))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b"Cross-origin requests are not allowed."
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def lax_cookies(message):
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, v.replace(b"SameSite=none", b"SameSite=lax").replace(b"samesite=none", b"samesite=lax"))
                    if k.lower() == b"set-cookie" else (k, v) for k, v in message.get("headers", [])]
            await send(message)

        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") in ("", "/"):
            await self._page_without_api_info(scope, receive, lax_cookies)
            return
        await self.app(scope, receive, lax_cookies)

    async def _page_without_api_info(self, scope, receive, send):
        """Gradio's login page embeds the whole API description (every endpoint, its parameters and defaults,
        with server paths) for anyone who asks. Served to a visitor who has not signed in, it is cut out."""
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"])
        start, chunks = None, []

        async def collect(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if b'"auth_required":true' in body.replace(b" ", b""):
                body = _API_INFO.sub(b"window.gradio_api_info = null;</script>", body)
            headers = [(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                       for k, v in start.get("headers", [])]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, collect)


def install_same_origin_guard(app) -> None:
    """Put SameOriginGuard outside every middleware Gradio added. Gradio builds its app inside launch(), so this
    runs after launch: Starlette rebuilds its middleware stack on the next request."""
    app.middleware_stack = None
    app.add_middleware(SameOriginGuard)
