"""The parent side of the llama.cpp child process (native/worker.py), and the once-per-machine probe.

A fault in llama.cpp (an illegal instruction on a CPU the build does not suit, a bad GGUF) ends the child, never the
app: the reader thread sees the pipe close, and every request in flight ends with `BackendStopped`, whose message
names the signal. The next request starts a new child.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from ..modeling import cache_dir

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
SIGNAL_WORDS = {signal.SIGILL: "illegal instruction", signal.SIGSEGV: "segmentation fault",
                signal.SIGBUS: "bus error", signal.SIGABRT: "aborted", signal.SIGFPE: "arithmetic fault",
                signal.SIGKILL: "killed, often by the out-of-memory killer", signal.SIGTERM: "terminated"}


class BackendStopped(RuntimeError):
    """The llama.cpp child process ended (crashed or was killed); the message says how."""


def describe_exit(returncode: int | None, stderr_tail: str = "") -> str:
    """'signal 4, illegal instruction' / 'exit code 1: <last line of its stderr>'."""
    if returncode is None:
        return "it stopped answering"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            return f"signal {-returncode}, {SIGNAL_WORDS.get(sig, sig.name)}"
        except ValueError:
            return f"signal {-returncode}"
    last = next((ln for ln in reversed(stderr_tail.strip().splitlines()) if ln.strip()), "")
    return f"exit code {returncode}" + (f": {last[-300:]}" if last else "")


class LlamaCppProcess:
    """One GGUF loaded in one child process, kept warm; requests are answered one at a time, in order."""

    def __init__(self, gguf: str | Path, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False):
        self.gguf = str(Path(gguf).resolve())
        self.args = [sys.executable, "-m", "qlora_ui.native.worker", self.gguf, "--n-ctx", str(n_ctx)]
        if threads:
            self.args += ["--threads", str(int(threads))]
        if logits_all:
            self.args.append("--logits-all")
        self.proc: subprocess.Popen | None = None
        self.n_vocab: int | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()  # one request at a time: the child decodes one sequence
        self._write_lock = threading.Lock()
        self._stderr: deque[str] = deque(maxlen=40)
        self._ended = threading.Event()

    # ---- life ----

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the child and wait until it has loaded the GGUF and evaluated its warm-up tokens."""
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1, env=env)
        ready: queue.Queue = queue.Queue()
        self._waiting[0] = ready
        threading.Thread(target=self._read, daemon=True, name="llama-cpp-reader").start()
        threading.Thread(target=self._read_stderr, daemon=True, name="llama-cpp-stderr").start()
        try:
            msg = ready.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise BackendStopped(f"the llama.cpp backend did not load {Path(self.gguf).name} in {timeout:.0f} s"
                                 ) from None
        finally:
            self._waiting.pop(0, None)
        if "stopped" in msg:  # it died loading the GGUF or evaluating the warm-up tokens
            self.close()
            raise BackendStopped(f"the llama.cpp backend stopped ({msg['stopped']}) while loading "
                                 f"{Path(self.gguf).name}")
        self.n_vocab = msg.get("n_vocab")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._ended.is_set()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ---- the pipes ----

    def _read(self) -> None:
        proc = self.proc
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            q = self._waiting.get(0 if msg.get("ready") else msg.get("id"))
            if q is not None:
                q.put(msg)
        # The pipe closed: the child is gone. Everyone still waiting learns how it ended.
        rc = proc.wait()
        self._ended.set()
        why = describe_exit(rc, "".join(self._stderr))
        (log.info if rc == 0 else log.warning)("llama.cpp child %s ended: %s", proc.pid, why)
        for q in list(self._waiting.values()):
            q.put({"stopped": why})

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _send(self, msg: dict) -> None:
        try:
            with self._write_lock:
                self.proc.stdin.write(json.dumps(msg) + "\n")
                self.proc.stdin.flush()
        except (OSError, AttributeError, ValueError):
            pass  # the child is gone; the reader reports how

    # ---- requests ----

    def request(self, op: str, timeout: float = 600.0, **fields) -> Iterator[dict]:
        """The child's answers to one request, up to `done`/`result`. Closing the iterator early cancels it."""
        with self._lock:
            if not self.alive():
                raise BackendStopped("the llama.cpp backend is not running")
            rid = next(self._ids)
            q: queue.Queue = queue.Queue()
            self._waiting[rid] = q
            finished = False
            try:
                self._send({"op": op, "id": rid, **fields})
                while True:
                    try:
                        msg = q.get(timeout=timeout)
                    except queue.Empty:
                        raise BackendStopped(f"the llama.cpp backend gave no answer in {timeout:.0f} s") from None
                    if "stopped" in msg:
                        raise BackendStopped(f"the llama.cpp backend stopped ({msg['stopped']})")
                    if "error" in msg:
                        finished = True
                        raise RuntimeError(msg["error"])
                    # Marked before the yield: a caller that stops at the last answer (`call`) closes this
                    # generator there, and the request must not then count as abandoned (a cancel and a 30 s wait
                    # for a `done` that a `result` never sends: every `call` took 30 s).
                    last = bool(msg.get("done") or "result" in msg)
                    finished = finished or last
                    yield msg
                    if last:
                        return
            finally:
                if not finished and self.alive():
                    # The reader left mid-reply: stop the child generating for nobody, and drain its last lines.
                    self._send({"op": "cancel", "id": rid})
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        try:
                            msg = q.get(timeout=max(0.0, deadline - time.monotonic()))
                        except queue.Empty:
                            break
                        if msg.get("done") or "stopped" in msg or "error" in msg:
                            break
                self._waiting.pop(rid, None)

    def call(self, op: str, **fields):
        """A request with one answer (`tokenize`, `argmax`)."""
        for msg in self.request(op, **fields):
            if "result" in msg:
                return msg["result"]
        raise BackendStopped(f"the llama.cpp backend gave no result for {op}")


# ---- the probe: does llama.cpp run on this machine at all? ----

def _probe_key() -> str | None:
    """This machine's CPU and the installed llama.cpp library: a probe's answer holds while both stay the same."""
    from .build import cpu_libraries

    libs = cpu_libraries()
    if not libs:
        return None
    cpu = ""
    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    parts = [cpu] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in libs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def probe_path() -> Path:
    return cache_dir() / "llama-cpp-probe.json"


def probe(gguf: str | Path | None = None, timeout: float = 180.0, fresh: bool = False) -> tuple[bool, str]:
    """(runs here?, why not): the first time on a machine, a child loads a GGUF (the bundled model's unless one is
    given) and evaluates a few tokens; the answer is kept for this CPU and this build."""
    from .build import cpu_libraries

    key = _probe_key()
    if key is None or not cpu_libraries():
        return False, "llama-cpp-python is not installed (run `make install` to build it, about 10 minutes)"
    path = probe_path()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not fresh and key in known:
        return bool(known[key]["ok"]), known[key]["why"]
    if gguf is None:
        from ..modeling import bundled_gguf_path

        gguf = bundled_gguf_path()
    child = LlamaCppProcess(gguf, n_ctx=256)
    child.args.append("--probe")
    try:
        child.start(timeout=timeout)
        ok, why = True, ""
    except BackendStopped as e:
        ok, why = False, f"{e}; its build does not run on this CPU"
    finally:
        child.close()
    known[key] = {"ok": ok, "why": why, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(path)
    log.info("llama.cpp probe: %s", "runs" if ok else why)
    return ok, why
