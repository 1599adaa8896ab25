"""The llama.cpp child process: loads one GGUF and answers requests as JSON lines over its stdin/stdout.

Started by `native.client.LlamaCppProcess`, never imported by the app. Requests (one line each, `id` chosen by the
parent): `chat` (streams `delta` lines, then `done`), `tokenize`, `argmax` (the greedy next token at every position),
`cancel` (stops a running `chat` at its next token). Before answering anything it evaluates a few tokens and says
`ready`: a build whose instructions this CPU cannot execute dies there, at start-up, not in a user's reply.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading

WARM_UP_TEXT = b"Hello, how are you?"


def _channel():
    """The protocol goes to a private copy of stdout; fd 1 itself then points at stderr, so whatever the native
    code prints can never be read as a reply."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    lock = threading.Lock()

    def send(**msg):
        with lock:
            out.write(json.dumps(msg) + "\n")

    return send


def _set_threads(llm, n: int) -> None:
    """Fewer threads while a training shares the CPU (the parent says how many), all of them otherwise."""
    if hasattr(llm, "set_n_threads"):
        llm.set_n_threads(n, n)
    else:
        import llama_cpp

        llama_cpp.llama_set_n_threads(llm._ctx.ctx, n, n)


def _chat(llm, req: dict, send, cancelled: threading.Event) -> None:
    _set_threads(llm, int(req.get("threads") or 0) or (os.cpu_count() or 1))
    greedy = float(req.get("temperature") or 0) <= 0
    chunks = llm.create_chat_completion(
        messages=req["messages"], stream=True, max_tokens=int(req.get("max_tokens") or 128),
        temperature=0.0 if greedy else float(req["temperature"]), top_p=1.0 if greedy else float(req.get("top_p", 1)),
        top_k=1 if greedy else int(req.get("top_k") or 40), seed=int(req.get("seed") or 0),
        stop=req.get("stop") or None)
    finish, n = None, 0
    for chunk in chunks:
        if cancelled.is_set():
            finish = "cancelled"
            break
        choice = chunk["choices"][0]
        delta = (choice.get("delta") or {}).get("content")
        if delta:
            n += 1
            send(id=req["id"], delta=delta)
        finish = choice.get("finish_reason") or finish
    send(id=req["id"], done=True, finish_reason=finish or "stop", chunks=n)


def _serve(llm, send) -> None:
    jobs: queue.Queue = queue.Queue()
    cancels: dict[int, threading.Event] = {}

    def work():
        while (req := jobs.get()) is not None:
            try:
                if req["op"] == "chat":
                    _chat(llm, req, send, cancels.setdefault(req["id"], threading.Event()))
                elif req["op"] == "tokenize":
                    send(id=req["id"], result=llm.tokenize(req["text"].encode(), add_bos=bool(req.get("add_bos")),
                                                           special=bool(req.get("special", True))))
                elif req["op"] == "argmax":
                    llm.reset()
                    llm.eval(req["tokens"])
                    send(id=req["id"], result=llm.scores[: len(req["tokens"])].argmax(-1).tolist())
                else:
                    send(id=req["id"], error=f"unknown request {req['op']!r}")
            except Exception as e:  # noqa: BLE001 - a Python error is one request's answer, not the process's end
                send(id=req["id"], error=f"{type(e).__name__}: {e}")
            finally:
                cancels.pop(req["id"], None)

    t = threading.Thread(target=work, daemon=True, name="llama-cpp-work")
    t.start()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "cancel":
            cancels.setdefault(req["id"], threading.Event()).set()
        else:
            cancels.setdefault(req["id"], threading.Event())
            jobs.put(req)
    jobs.put(None)  # the parent closed the pipe: finish and leave
    t.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_ui.native.worker")
    ap.add_argument("gguf")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--logits-all", action="store_true", help="keep every position's logits (for `argmax`)")
    ap.add_argument("--probe", action="store_true", help="load, evaluate a few tokens, say ready and exit")
    args = ap.parse_args(argv)
    send = _channel()
    from llama_cpp import Llama

    kw = {"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}
    llm = Llama(model_path=args.gguf, n_ctx=args.n_ctx, logits_all=args.logits_all, verbose=False, seed=0, **kw)
    # The warm-up: the CPU kernels run here once (prompt and one decode step), before any request is taken.
    llm.eval(llm.tokenize(WARM_UP_TEXT, add_bos=True))
    llm.eval([llm.token_eos()])
    llm.reset()
    send(ready=True, n_vocab=llm.n_vocab(), pid=os.getpid())
    if not args.probe:
        _serve(llm, send)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
