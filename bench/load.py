"""A room chatting through one app: N simulated users at once, against one user alone, optionally while training.

    python bench/load.py                     # 10 users, idle app, then 20 users while a run trains (~6 min)
    python bench/load.py --users 10 --no-train
    python bench/load.py --users 20 --turns 2 --new-tokens 32

Starts `app.py` on the bundled model. Each simulated user is its own browser session speaking Gradio's queue
protocol over HTTP (as the page does): it sends a short question, then a follow-up with the history, and records
the time to the first streamed token (a place-in-line notice is not a token), the time to the full reply, and the
reply's tokens. Meanwhile one more client GETs the page every 0.2 s. Prints per scenario: errors, first-token
p50/p95, reply p50/p95, aggregate generated tokens/s and its ratio to one user alone (measured first, same run),
page GET p95, and with training the training tokens/s while the room chats against the same run's tokens/s
before the room arrived. Run it alone on the machine: two CPU-heavy jobs on 2 cores slow each other many times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = ["What is your favorite food?", "Tell me about the sea.", "How are you today?", "Do you like music?",
             "What is the capital of France?", "Tell me a joke.", "What do you do for fun?", "Who are you?",
             "Where do you live?", "What is your favorite color?"]
FOLLOW_UP = "Why?"


def pctl(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def text_of(content) -> str:
    """A chatbot message's text: Gradio 6 sends content as a list of typed parts."""
    if isinstance(content, list):
        return "".join(x.get("text", "") for x in content if isinstance(x, dict))
    return content or ""


class Room:
    """The app's chat endpoint called the way the page calls it: one session per user, streamed updates."""

    def __init__(self, url: str, new_tokens: int):
        import httpx

        self.url, self.new_tokens = url, new_tokens
        deps = httpx.get(f"{url}/config", timeout=30).json()["dependencies"]
        self.fn = next(i for i, d in enumerate(deps) if d.get("api_name") == "chat")
        self.trigger = deps[self.fn].get("id")
        self.errors: list[str] = []
        self.first: list[float] = []
        self.reply: list[float] = []
        self.texts: list[str] = []

    def ask(self, session: str, question: str, history: list) -> list:
        import httpx
        from app_overhead import queue_events, shows_a_token

        data = ["Base model only", None, "", 0.0, 0.9, self.new_tokens, 0, question, history]
        t0 = time.time()
        first, updates = None, 0
        with httpx.Client(base_url=self.url, timeout=600) as c:
            for msg in queue_events(c, self.fn, self.trigger, data, session):
                kind = msg.get("msg")
                if kind == "process_generating":
                    updates += 1
                    if first is None and shows_a_token(msg, updates):
                        first = time.time() - t0
                elif kind == "process_completed":
                    if not msg.get("success"):
                        self.errors.append(str(msg.get("output", {}).get("error"))[:200])
                        return history
                    out = [{"role": m["role"], "content": text_of(m["content"])}
                           for m in msg["output"]["data"][0]]  # the chatbot: the conversation so far
                    self.reply.append(time.time() - t0)
                    if first is not None:
                        self.first.append(first)
                    self.texts.append(out[-1]["content"] if out else "")
                    return out
        self.errors.append("stream ended without a result")
        return history

    def user(self, i: int, turns: int, start: threading.Barrier, until: float = 0.0) -> None:
        """`turns` questions (a first one, then follow-ups with the history); with `until`, starts conversations
        over until that time, so that a training beside the room has enough steps to measure."""
        session = uuid.uuid4().hex[:12]
        start.wait()
        while True:
            history: list = []
            for t in range(turns):
                try:
                    history = self.ask(session, QUESTIONS[i % len(QUESTIONS)] if t == 0 else FOLLOW_UP, history)
                except Exception as e:  # noqa: BLE001 - counted and reported, the bench goes on
                    self.errors.append(f"{type(e).__name__}: {e}")
            if time.time() >= until:
                return


def page_watcher(url: str, stop: threading.Event, times: list[float]) -> None:
    import httpx

    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.time()
            try:
                c.get(url).raise_for_status()
                times.append(time.time() - t0)
            except httpx.HTTPError:
                times.append(float("inf"))
            stop.wait(0.2)


def scenario(url: str, users: int, turns: int, new_tokens: int, tok, min_seconds: float = 0.0) -> dict:
    room = Room(url, new_tokens)
    start = threading.Barrier(users)
    stop, gets = threading.Event(), []
    watcher = threading.Thread(target=page_watcher, args=(url, stop, gets), daemon=True)
    watcher.start()
    t0 = time.time()
    threads = [threading.Thread(target=room.user, args=(i, turns, start, t0 + min_seconds)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    stop.set()
    watcher.join()
    tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in room.texts)
    return {"users": users, "requests": len(room.reply), "errors": len(room.errors), "error_samples": room.errors[:3],
            "first_p50": pctl(room.first, 0.5), "first_p95": pctl(room.first, 0.95),
            "reply_p50": pctl(room.reply, 0.5), "reply_p95": pctl(room.reply, 0.95), "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "get_p95": pctl(gets, 0.95), "gets": len(gets)}


def training_rate(run: Path, since: float, until: float) -> float | None:
    """Trained tokens per second between two wall-clock times, from the run folder's metrics rows."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and since <= r.get("time", 0) <= until]
    if len(rows) < 3:
        return None
    return statistics.median(r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s"))


def start_training(url: str, runs: Path, steps: int) -> Path:
    from app_overhead import queue_stream, upload

    from qlora_ui.config import load_preset
    from qlora_ui.ui.app import FORM_KEYS
    from qlora_ui.ui.form import form_values

    vals = form_values(load_preset("cpu-quickstart").updated(max_steps=steps, eval_fraction=0.0), FORM_KEYS)
    vals[FORM_KEYS.index("data_path")] = upload(url, ROOT / "presets" / "data" / "pirate_chat.jsonl")
    _, _, msg = queue_stream(url, "start_training", vals)
    if not msg.get("success", True):
        raise SystemExit(f"start_training failed: {msg.get('output')}")
    t0 = time.time()
    while time.time() - t0 < 180:
        found = [r for r in runs.iterdir() if (r / "metrics.jsonl").is_file()] if runs.exists() else []
        if found and sum(1 for ln in (found[0] / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln) >= 3:
            return found[0]
        time.sleep(1)
    raise SystemExit("the training started from the app logged no steps in 180 s")


def fmt(x, unit="s", digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f} {unit}".strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=10, help="users in the idle-app scenario (default 10)")
    p.add_argument("--train-users", type=int, default=20, help="users while a run trains (default 20)")
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-train", action="store_true", help="skip the scenario with a training running")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from app_overhead import start_app
    from transformers import AutoTokenizer

    from qlora_ui.modeling import ensure_bundled_model

    tok = AutoTokenizer.from_pretrained(str(ensure_bundled_model()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "CUDA_VISIBLE_DEVICES": ""}
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="qlora-load-") as work:
        runs = Path(work) / "runs"
        proc, url, _ = start_app(runs, env)
        try:
            warm = Room(url, 8)
            warm.ask(uuid.uuid4().hex[:12], "Hi", [])  # load the chat model once, outside the clock
            if warm.errors or not warm.reply:
                raise SystemExit(f"the warm-up chat failed: {warm.errors}")
            out["alone"] = scenario(url, 1, args.turns, args.new_tokens, tok)
            print(f"1 user: {out['alone']['tokens_per_s']:.1f} tokens/s", flush=True)
            out["room"] = scenario(url, args.users, args.turns, args.new_tokens, tok)
            print(f"{args.users} users: {out['room']['tokens_per_s']:.1f} tokens/s", flush=True)
            if not args.no_train:
                run = start_training(url, runs, steps=100_000)
                t_alone = time.time()
                time.sleep(60)  # the training alone, for its baseline rate
                t_room = time.time()
                out["training"] = scenario(url, args.train_users, args.turns, args.new_tokens, tok, min_seconds=60)
                t_end = time.time()
                out["train_alone_tps"] = training_rate(run, t_alone, t_room)
                out["train_room_tps"] = training_rate(run, t_room, t_end)
                print(f"{args.train_users} users while training: {out['training']['tokens_per_s']:.1f} tokens/s",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    alone, room = out["alone"], out["room"]
    ratio = room["tokens_per_s"] / alone["tokens_per_s"] if alone["tokens_per_s"] else None
    rows = [
        (f"{args.users} users, idle app: errors", str(room["errors"]), "0", room["errors"] == 0),
        (f"{args.users} users, idle app: first token p50 / p95", f"{fmt(room['first_p50'])} / "
         f"{fmt(room['first_p95'])}", "p95 <= 2 s", room["first_p95"] is not None and room["first_p95"] <= 2),
        (f"{args.users} users: reply p50 / p95", f"{fmt(room['reply_p50'])} / {fmt(room['reply_p95'])}", "", None),
        (f"{args.users} users: aggregate tokens/s vs one user alone", f"{room['tokens_per_s']:.1f} / "
         f"{alone['tokens_per_s']:.1f} = {ratio:.2f}x" if ratio else "-", ">= 3x", ratio is not None and ratio >= 3),
        (f"{args.users} users: page GET p95", fmt(room["get_p95"]), "", None),
    ]
    if "training" in out:
        tr, a, b = out["training"], out["train_alone_tps"], out["train_room_tps"]
        tratio = b / a if a and b else None
        rows += [
            (f"{args.train_users} users while training: errors", str(tr["errors"]), "0", tr["errors"] == 0),
            (f"{args.train_users} users while training: page GET p95", fmt(tr["get_p95"]), "<= 1 s",
             tr["get_p95"] is not None and tr["get_p95"] <= 1),
            (f"{args.train_users} users while training: first token p50 / p95",
             f"{fmt(tr['first_p50'])} / {fmt(tr['first_p95'])}", "", None),
            (f"{args.train_users} users while training: chat tokens/s", f"{tr['tokens_per_s']:.1f}", "", None),
            ("training tokens/s with the room chatting vs alone", f"{fmt(b, '')} / {fmt(a, '')} = "
             f"{tratio:.2f}x" if tratio else "-", ">= 0.8x", tratio is not None and tratio >= 0.8),
        ]
    print(f"\n{args.turns} turns per user, {args.new_tokens} new tokens at most, greedy, bundled model\n")
    print("| measure | value | goal | met |\n|---|---|---|---|")
    for label, value, goal, met in rows:
        print(f"| {label} | {value} | {goal} | {'' if met is None else 'yes' if met else 'no'} |")
    for k in ("alone", "room", "training"):
        if k in out and out[k]["errors"]:
            print(f"{k} errors, e.g.: {out[k]['error_samples']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
