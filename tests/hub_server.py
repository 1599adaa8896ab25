"""A small stand-in for the Hugging Face Hub's file API, enough for `datasets.load_dataset("owner/name")`,
streaming and `huggingface_hub.dataset_info` to run their real code against it (HF_ENDPOINT=server.url).

Serves dataset repositories held in memory as {commit sha: {path: bytes}} with a `main` ref that `commit()`
moves: /api/datasets/{repo}[/revision/{rev}], /api/datasets/{repo}/tree/{rev}[/{path}],
/api/datasets/{repo}/paths-info/{rev}, /datasets/{repo}/resolve/{rev}/{path} (HEAD, GET, Range). Every request
is logged in `requests`, so a test can tell that an offline load asked nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo -> {"main": sha, "commits": {sha: {path: bytes}}}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str, files: dict[str, str | bytes]) -> str:
        """A new commit of `repo` holding `files`; `main` points at it. Returns its sha."""
        data = {p: v.encode() if isinstance(v, str) else v for p, v in files.items()}
        r = self.repos.setdefault(repo, {"commits": {}})
        sha = hashlib.sha1(repr(sorted(data.items())).encode() + str(len(r["commits"])).encode()).hexdigest()
        r["commits"][sha] = data
        r["main"] = sha
        return sha

    # ---- lookups ----
    def resolve(self, repo: str, rev: str) -> tuple[str, dict] | None:
        r = self.repos.get(repo)
        if r is None:
            return None
        sha = r["main"] if rev in ("main", "") else rev
        return (sha, r["commits"][sha]) if sha in r["commits"] else None


def _oid(b: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


def _entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    prefix = prefix.strip("/")
    out, dirs = [], set()
    for path, data in sorted(files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1:] if prefix else path
        parts = rest.split("/")
        for i in range(1, len(parts)):
            d = "/".join(([prefix] if prefix else []) + parts[:i])
            if d not in dirs and (recursive or i == 1):
                dirs.add(d)
                out.append({"type": "directory", "oid": _oid(d.encode()), "size": 0, "path": d})
        if recursive or len(parts) == 1:
            out.append({"type": "file", "oid": _oid(data), "size": len(data), "path": path})
    return out


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:  # quiet: the tests read hub.requests instead
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, code: int = 200, headers: dict | None = None) -> None:
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _missing(self, code: str, head: bool = False, extra: dict | None = None) -> None:
            self._send(404, json.dumps({"error": code}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json",
                        **(extra or {})}, head)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def _route(self, head: bool = False) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if self.command == "POST":
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n).decode()
                query.update(parse_qs(body))
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._file(m.group(1), m.group(2), m.group(3), head)
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m:
                return self._info(m.group(1), m.group(2) or "main")
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path)
            if m:
                got = hub.resolve(m.group(1), m.group(2))
                if got is None:
                    return self._missing("RepoNotFound" if m.group(1) not in hub.repos else "RevisionNotFound")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(_entries(got[1], m.group(3), recursive))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
            if m:
                got = hub.resolve(m.group(1), m.group(2))
                if got is None:
                    return self._missing("RepoNotFound" if m.group(1) not in hub.repos else "RevisionNotFound")
                wanted = set(query.get("paths", []))
                everything = _entries(got[1], "", True)
                return self._json([e for e in everything if e["path"] in wanted])
            return self._missing("EntryNotFound", head)

        def _info(self, repo: str, rev: str) -> None:
            got = hub.resolve(repo, rev)
            if got is None:
                return self._missing("RepoNotFound" if repo not in hub.repos else "RevisionNotFound")
            sha, files = got
            self._json({"_id": sha[:24], "id": repo, "author": repo.split("/")[0], "sha": sha, "private": False,
                        "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                        "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                        "cardData": {}, "siblings": [{"rfilename": p, "size": len(b), "blobId": _oid(b)}
                                                     for p, b in sorted(files.items())]})

        def _file(self, repo: str, rev: str, name: str, head: bool) -> None:
            got = hub.resolve(repo, rev)
            if got is None:
                return self._missing("RepoNotFound" if repo not in hub.repos else "RevisionNotFound", head)
            sha, files = got
            if name not in files:
                return self._missing("EntryNotFound", head, {"X-Repo-Commit": sha})
            data = files[name]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_oid(data)}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if rng:
                start = int(rng.group(1))
                end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
                part = data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, part, headers, head)
            self._send(200, data, headers, head)

    return Handler
