"""What stands between a shared link and strangers, beyond Gradio's own login: sign-in throttling, and for
every request a host-name rule (against DNS rebinding) and a same-origin rule (scheme, host and port).

Kept out of the engine (it knows nothing of the web) and out of the tab builders (it is about the server).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

_API_INFO = re.compile(rb"window\.gradio_api_info\s*=.*?;</script>", re.S)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}


MAX_USER_NAME = 256  # characters; app.py refuses longer names in the auth file


def read_secret_file(path: str, flag: str, holds: str, could_add: str) -> list[str]:
    """The lines of a file of secrets (--auth-file, --api-key-file), '#' comments skipped; refused, with the fix,
    when other users of this machine could read it (the secrets are plain text) or change it (add their own)."""
    mode = Path(path).stat().st_mode
    if mode & 0o002:
        raise ValueError(f"{flag} {path} is writable by every user of this machine, who could add {could_add}. "
                         f"Fix it with: chmod 600 {path}")
    if mode & 0o004:
        raise ValueError(f"{flag} {path} is readable by every user of this machine, and it holds {holds} in plain "
                         f"text. Fix it with: chmod 600 {path}")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


class _Failures:
    """One user name's failed sign-ins: recent failure times, the lockouts so far and when the current one ends."""

    __slots__ = ("times", "level", "locked_until")

    def __init__(self):
        self.times: list[float] = []
        self.level = 0
        self.locked_until = 0.0


class LoginThrottle:
    """Gradio's `auth=` callable: checks USER:PASS pairs in constant time, and after `max_failures` wrong
    passwords for one user name within `window_s` refuses that name for `lockout_s` (doubling on each further
    failure, at most `max_lockout_s`), even with the right password. Keyed by user name, not client address:
    behind the share tunnel every client has the tunnel's address.

    Memory is bounded whatever a client sends: names over MAX_USER_NAME characters are refused unread; the
    configured users have a table of their own (as long as the auth file, never evicted), and every other name
    is kept as a 32-byte digest in a table of at most `max_unknown` entries that evicts only among itself, so
    junk names can neither fill the memory nor push out a real user's lockout. Made-up names are locked out
    too, so a lockout does not tell which names are real."""

    def __init__(self, pairs: list[tuple[str, str]], max_failures: int = 5, window_s: float = 300,
                 lockout_s: float = 30, max_lockout_s: float = 600, max_unknown: int = 4096):
        self.pairs = [(u.encode(), p.encode()) for u, p in pairs]
        self.users = {u for u, _ in pairs}
        self.max_failures, self.window_s = max_failures, window_s
        self.lockout_s, self.max_lockout_s, self.max_unknown = lockout_s, max_lockout_s, max_unknown
        self._failures: dict[str, _Failures] = {}
        self._unknown: OrderedDict[bytes, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def _table_key(self, username: str) -> tuple[dict, str | bytes]:
        if username in self.users:
            return self._failures, username
        return self._unknown, hashlib.sha256(username.encode("utf-8", "surrogatepass")).digest()

    def locked_for(self, username: str, now: float | None = None) -> float:
        """Seconds until `username` may try again (0 = now)."""
        now = time.time() if now is None else now
        table, key = self._table_key(username)
        with self._lock:
            state = table.get(key)
        return max(0.0, state.locked_until - now) if state else 0.0

    def check(self, username: str, password: str) -> bool:
        u, p = username.encode(), password.encode()
        ok = False
        for user, pw in self.pairs:  # every pair, every time: the answer's timing says nothing
            ok |= hmac.compare_digest(user, u) & hmac.compare_digest(pw, p)
        return ok

    def __call__(self, username: str, password: str) -> bool:
        if len(username) > MAX_USER_NAME:
            return False  # no user has such a name: refused without keeping anything of it
        wait = self.locked_for(username)
        if wait > 0:
            from fastapi import HTTPException

            log.warning("sign-in refused: too many failures for one user name (%.0f s left)", wait)
            raise HTTPException(status_code=429, detail=f"Too many failed sign-ins for this user name. "
                                f"Try again in {int(wait) + 1} s.", headers={"Retry-After": str(int(wait) + 1)})
        table, key = self._table_key(username)
        if self.check(username, password):
            with self._lock:
                table.pop(key, None)
            return True
        self.failed(username)
        return False

    def failed(self, username: str) -> None:
        """Count one failed attempt for `username` (a user name, or AddressThrottle's client address)."""
        table, key = self._table_key(username)
        now = time.time()
        with self._lock:
            state = table.pop(key, None) or _Failures()
            if state.level and now - state.locked_until >= self.window_s:
                state = _Failures()  # a quiet window after the last lockout ended: the streak is over
            state.times = [t for t in state.times if now - t < self.window_s][-self.max_failures:] + [now]
            # Five failures within the window start a lockout; every failure after one (it can only come once
            # the lockout has ended) doubles it. Counting the streak, not a window ending now, is what lets the
            # lockout reach its cap: the first failures leave any window long before it would.
            if state.level or len(state.times) >= self.max_failures:
                state.level += 1
                state.locked_until = now + min(self.lockout_s * 2 ** (state.level - 1), self.max_lockout_s)
            table[key] = state
            if table is self._unknown:
                while len(self._unknown) > self.max_unknown:
                    self._unknown.popitem(last=False)


class AddressThrottle(LoginThrottle):
    """Failed sign-ins counted per client address, whatever user names they try: after `max_failures` (20 by
    default) within `window_s`, every sign-in from that address is refused for `lockout_s`, doubling on each
    further failure up to `max_lockout_s`. Beside the per-name LoginThrottle: that one cannot stop one client
    guessing across many names, and this one keeps a guesser from locking out name after name at full speed.

    A lockout refuses the right password too: were it let through, "429" would mean "wrong" and the guessing
    would go on unslowed. A successful sign-in does not clear the count either (one known account would
    otherwise reset it between guesses); failures simply age out of the window. Addresses live in the inherited
    table of at most `max_unknown` digests, evicting only among themselves: the users' own lockouts are kept in
    LoginThrottle, apart."""

    def __init__(self, max_failures: int = 20, **kw):
        super().__init__([], max_failures=max_failures, **kw)

    @staticmethod
    def client_key(scope: dict, headers: dict[str, str]) -> str:
        """The address a request counts against. A connection from this machine itself is a proxy on it (Gradio's
        share tunnel, a reverse proxy): the nearest hop it names in X-Forwarded-For (the rightmost: the one it
        added) is the client, where it names one. From any other peer the header is the client's own word, so
        it is ignored. An IPv6 client counts by its /64 (one subscriber's network hands out 2^64 addresses)."""
        peer = (scope.get("client") or ("?", 0))[0] or "?"
        try:
            if ipaddress.ip_address(peer).is_loopback:
                forwarded = headers.get("x-forwarded-for", "").split(",")[-1].strip()
                peer = forwarded or peer
        except ValueError:
            pass
        try:
            ip = ipaddress.ip_address(peer.strip("[]"))
        except ValueError:
            return peer[:64]
        if ip.version == 6 and not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)


class KeyThrottle(LoginThrottle):
    """The /v1 API's keys (qlora_ui/api/): the login's constant-time check and lockout, keyed by client address, as an
    API key comes with no user name. Behind the share tunnel every client has the tunnel's address, so there five
    wrong keys lock out every key for 30 s (doubling), as five wrong passwords lock out a user name."""

    def __init__(self, keys: list[str], **kw):
        super().__init__([], **kw)
        self.keys = [k.encode() for k in keys]

    def check(self, username: str, password: str) -> bool:
        p = password.encode("utf-8", "surrogatepass")
        ok = False
        for key in self.keys:  # every key, every time
            ok |= hmac.compare_digest(key, p)
        return ok


# Where Gradio serves its page, which embeds the API description: the app, and the run-history page.
PAGE_PATHS = {"", "/gradio_api/runs"}
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header ('a.b:7860', '[::1]:7860', 'a.b') -> ('a.b', 7860 or None), or None if malformed."""
    try:
        parts = urlsplit("//" + value.strip())
        return (parts.hostname or "").lower().rstrip("."), parts.port
    except ValueError:
        return None


def _origin_parts(origin: str) -> tuple[str, str, int] | None:
    """'https://a.b' -> ('https', 'a.b', 443); None for 'null' or anything that is not scheme://host[:port]."""
    try:
        parts = urlsplit(origin.strip())
        scheme, name = parts.scheme.lower(), (parts.hostname or "").lower().rstrip(".")
        if scheme not in DEFAULT_PORTS or not name:
            return None
        return scheme, name, parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def host_allowed(host: str, allowed_names: frozenset[str] | set[str]) -> bool:
    """DNS rebinding sends an attacker's own host name (re-pointed at this machine) in the Host header. A name
    is accepted only if it is one this app is served under: the loopback names, an address written as a number
    (no one's name can rebind to it), the --host name, the share link's host, and any --allowed-host."""
    parsed = _split_host(host)
    if parsed is None or not parsed[0]:
        return False
    name = parsed[0]
    return name in LOOPBACK_NAMES or is_ip_literal(name) or name in allowed_names


def same_origin(origin: str, host: str | None, forwarded_host: str | None = None, scheme: str = "http") -> bool:
    """Origin and request agree on scheme, host and port (a page on another port of the same machine is
    another site). Where the Host carries no port, the browser used its scheme's default one: the Origin must
    then carry the default port of its own scheme (behind a TLS tunnel the request itself arrives as http)."""
    o = _origin_parts(origin)
    if o is None:
        return False
    o_scheme, o_name, o_port = o
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    for value in (host, forwarded_host):
        parsed = _split_host(value) if value else None
        if not parsed:
            continue
        name, port = parsed
        if port is None:
            if o_port != DEFAULT_PORTS[o_scheme]:
                continue
        elif o_port != port or o_scheme != scheme:
            continue
        # A page served on localhost talking to 127.0.0.1 (or back), same port: still this app.
        if o_name == name or (o_name in LOOPBACK_NAMES and name in LOOPBACK_NAMES):
            return True
    return False


def _refuse(status: int, text: str):
    body = text.encode()
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body}]


class ServedHosts(set):
    """The host names this app is served under, lower-case without a trailing dot. It can grow after the server
    starts: the share link's host is known only once Gradio's tunnel is up, and the guard is in place before."""

    def __init__(self, names=()):
        super().__init__()
        self.extend(names)

    def extend(self, names) -> None:
        for name in names:
            if name:
                self.add(name.lower().rstrip("."))


def _capped_receive(receive, cap: int):
    """An ASGI receive that reports the client gone once more than `cap` body bytes have come."""
    seen = 0

    async def capped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                log.warning("cut off an upload request past %d bytes", cap)
                return {"type": "http.disconnect"}
        return message

    return capped


class SameOriginGuard:
    """ASGI middleware, outermost. Refuses, before any route:
    - a Host this app is not served under (421): a DNS-rebinding page reaches the app under its own name;
    - an `Origin` other than the app's own scheme, host and port (403), before Gradio's CORS layer can grant it
      (Gradio grants any origin, with credentials, whenever the app is reached by a name other than localhost).
    Also turns Gradio's `SameSite=None` login cookie into `SameSite=Lax`, so other sites' pages do not send it
    at all, and counts failed sign-ins per client address (`login_throttle`, an AddressThrottle): Gradio hands
    its `auth=` callable the name and password only, never the request, so the address is seen here."""

    def __init__(self, app, allowed_hosts: ServedHosts | list[str] | tuple[str, ...] = (),
                 login_throttle: AddressThrottle | None = None, max_upload_request: int | None = None):
        self.app = app
        self.login_throttle = login_throttle
        # Gradio caps each uploaded file (--max-file-size), not a request: one request carried three 150 MB files
        # under a 200 MB cap. The page uploads one dataset at a time, so a request may carry about one file.
        self.max_upload_request = max_upload_request
        # Kept by reference when it is a ServedHosts: the share link's host joins it once the tunnel is up.
        self.allowed_hosts = allowed_hosts if isinstance(allowed_hosts, ServedHosts) else ServedHosts(allowed_hosts)

    async def _refuse(self, scope, send, status: int, text: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        for message in _refuse(status, text):
            await send(message)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # X-Forwarded-Host too: a rebinding page's own same-origin requests may carry any header it likes.
        for name in ("host", "x-forwarded-host"):
            value = headers.get(name)
            if value is not None and not host_allowed(value, self.allowed_hosts):
                log.warning("refused a request for host %r to %s", value[:100], scope.get("path"))
                await self._refuse(scope, send, 421, "This app is not served under that host name. Whoever runs "
                                   "it can add the name with --allowed-host.")
                return
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, headers.get("host"), headers.get("x-forwarded-host"),
                                                  scope.get("scheme", "http")):
            log.warning("refused a cross-origin request from %s to %s", origin[:100], scope.get("path"))
            await self._refuse(scope, send, 403, "Cross-origin requests are not allowed.")
            return

        async def lax_cookies(message):
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, v.replace(b"SameSite=none", b"SameSite=lax").replace(b"samesite=none", b"samesite=lax"))
                    if k.lower() == b"set-cookie" else (k, v) for k, v in message.get("headers", [])]
            await send(message)

        path = scope.get("path") or "/"
        if (self.max_upload_request is not None and scope["type"] == "http" and scope.get("method") == "POST"
                and path.rstrip("/").endswith("/upload")):
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_upload_request:
                log.warning("refused an upload request of %s bytes", length)
                await self._refuse(scope, send, 413, f"One upload request may carry at most "
                                   f"{self.max_upload_request / 2**20:.0f} MB in all (the per-file cap, "
                                   "--max-file-size); upload the files one at a time.")
                return
            if length is None:  # chunked: count what arrives, and end the request where it passes the cap
                receive = _capped_receive(receive, self.max_upload_request)
        if (self.login_throttle is not None and scope["type"] == "http" and scope.get("method") == "POST"
                and path.rstrip("/").endswith("/login")):
            await self._login(scope, receive, lax_cookies, headers)
            return
        if scope["type"] == "http" and scope.get("method") == "GET":
            if path.rstrip("/").endswith("/logout") and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                # Gradio's /logout is a GET that ends every session of the user: another site's link (a top-level
                # navigation, which carries even a SameSite=Lax cookie) must not sign everyone out.
                log.warning("refused a cross-site sign-out")
                await self._refuse(scope, send, 403, "Sign out from the app's own page.")
                return
            if path.rstrip("/") in PAGE_PATHS:
                await self._page_without_api_info(scope, receive, lax_cookies)
                return
        await self.app(scope, receive, lax_cookies)

    async def _login(self, scope, receive, send, headers: dict[str, str]) -> None:
        """Gradio's sign-in, refused while the client's address is locked out, its failures (400) counted."""
        throttle = self.login_throttle
        key = throttle.client_key(scope, headers)
        wait = throttle.locked_for(key)
        if wait > 0:
            log.warning("sign-in refused: too many failures from one address (%.0f s left)", wait)
            # As JSON {"detail": ...}, the shape of Gradio's own sign-in errors and of the per-name lockout.
            body = json.dumps({"detail": f"Too many failed sign-ins from your address. Try again in "
                                         f"{int(wait) + 1} s."}).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(int(wait) + 1).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] == 400:
                throttle.failed(key)  # Gradio's "Incorrect credentials."
            await send(message)

        await self.app(scope, receive, counted)

    async def _page_without_api_info(self, scope, receive, send):
        """Gradio's login page (at / and at /gradio_api/runs) embeds the whole API description (every endpoint, its
        parameters and defaults, with server paths) for anyone who asks. Served to a visitor who has not signed
        in, it is cut out."""

        def cut(body: bytes, headers: dict) -> bytes:
            if b'"auth_required":true' in body.replace(b" ", b""):
                return _API_INFO.sub(b"window.gradio_api_info = null;</script>", body)
            return body

        await edited_response(self.app, scope, receive, send, cut)


async def edited_response(app, scope, receive, send, edit) -> None:
    """Run `app` for one request, asking for an uncompressed answer, and send `edit(body, headers)` in place of
    the body it answered, with a content-length that fits (`headers`: the answer's, names in lower case). The
    page rewrites use it: the login page without the API description (above), the early script (ui/page_script)."""
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
        body = edit(b"".join(chunks), {k.lower(): v for k, v in start.get("headers", [])})
        await send({**start, "headers": [(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                                         for k, v in start.get("headers", [])]})
        await send({"type": "http.response.body", "body": body})

    await app(scope, receive, collect)


def install_same_origin_guard(app, allowed_hosts: ServedHosts | list[str] | tuple[str, ...] = (),
                              login_throttle: AddressThrottle | None = None,
                              max_upload_request: int | None = None) -> None:
    """Put SameOriginGuard outside every middleware Gradio added. Gradio builds its app inside launch(), so this
    runs from the app's lifespan start (app.py): after Gradio's middleware, before the first connection.
    Starlette rebuilds its middleware stack on the next request."""
    app.middleware_stack = None
    app.add_middleware(SameOriginGuard, allowed_hosts=allowed_hosts, login_throttle=login_throttle,
                       max_upload_request=max_upload_request)
