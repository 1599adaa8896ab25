"""A room chatting through one app: N simulated users at once, against one user alone, optionally while training.

    python bench/load.py                     # 10 users, idle app, then 20 users while a run trains (~6 min)
    python bench/load.py --users 10 --no-train
    python bench/load.py --users 20 --turns 2 --new-tokens 32
    python bench/load.py --api               # the OpenAI-compatible API: 10 clients, vs one, vs in-process, mixed

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
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import QueueClient, app_env, new_session, read_metrics, running_app, table, text_of

QUESTIONS = ["What is your favorite food?", "Tell me about the sea.", "How are you today?", "Do you like music?",
             "What is the capital of France?", "Tell me a joke.", "What do you do for fun?", "Who are you?",
             "Where do you live?", "What is your favorite color?"]
FOLLOW_UP = "Why?"


def pctl(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Room:
    """The app's chat endpoint called the way the page calls it: one session per user, streamed updates."""

    def __init__(self, url: str, new_tokens: int):
        self.url, self.new_tokens = url, new_tokens
        self.client = QueueClient(url)
        self.errors: list[str] = []
        self.first: list[float] = []
        self.reply: list[float] = []
        self.texts: list[str] = []

    def ask(self, session: str, question: str, history: list) -> list:
        data = ["Base model only", None, "", 0.0, 0.9, self.new_tokens, 0, question, history]
        first, total, msg = self.client.stream("chat", data, session)
        if msg is None:
            self.errors.append("stream ended without a result")
            return history
        if not msg.get("success"):
            self.errors.append(str(msg.get("output", {}).get("error"))[:200])
            return history
        out = [{"role": m["role"], "content": text_of(m["content"])}
               for m in msg["output"]["data"][0]]  # the chatbot: the conversation so far
        self.reply.append(total)
        if first is not None:
            self.first.append(first)
        self.texts.append(out[-1]["content"] if out else "")
        return out

    def user(self, i: int, turns: int, start: threading.Barrier, until: float = 0.0) -> None:
        """`turns` questions (a first one, then follow-ups with the history); with `until`, starts conversations
        over until that time, so that a training beside the room has enough steps to measure."""
        session = new_session()
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
    rows = [r for r in read_metrics(run) if "loss" in r and since <= r.get("time", 0) <= until]
    if len(rows) < 3:
        return None
    return statistics.median(r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s"))


def start_training(url: str, runs: Path, steps: int) -> Path:
    from qlora_ui.config import load_preset

    QueueClient(url).start_training(load_preset("cpu-quickstart").updated(max_steps=steps, eval_fraction=0.0))
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
    p.add_argument("--api", action="store_true", help="measure the OpenAI-compatible API (/v1) instead: --users "
                   "API clients vs one, one client vs in-process generation, and half browsers half API clients")
    args = p.parse_args(argv)
    if args.api:
        return api_main(args)
    from transformers import AutoTokenizer

    from qlora_ui.modeling import ensure_bundled_model

    tok = AutoTokenizer.from_pretrained(str(ensure_bundled_model()))
    env = app_env(CUDA_VISIBLE_DEVICES="")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="qlora-load-") as work:
        runs = Path(work) / "runs"
        with running_app(runs, env) as app:
            url = app.url
            warm = Room(url, 8)
            warm.ask(new_session(), "Hi", [])  # load the chat model once, outside the clock
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
    print(table(["measure", "value", "goal", "met"], rows))
    for k in ("alone", "room", "training"):
        if k in out and out[k]["errors"]:
            print(f"{k} errors, e.g.: {out[k]['error_samples']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


# ---- the OpenAI-compatible API (--api) ----

class ApiRoom:
    """Users of /v1 through the `openai` package, streamed, greedy: the same questions and metrics as Room."""

    def __init__(self, url: str, new_tokens: int):
        import openai

        from qlora_ui.config import BUNDLED_MODEL

        self.model, self.new_tokens = BUNDLED_MODEL, new_tokens
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        self.errors: list[str] = []
        self.first: list[float] = []
        self.reply: list[float] = []
        self.texts: list[str] = []

    def ask(self, session: str, question: str, history: list) -> list:
        messages = history + [{"role": "user", "content": question}]
        t0, first, text = time.time(), None, ""
        for chunk in self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                         max_tokens=self.new_tokens, temperature=0, seed=0):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.time() - t0
                text += chunk.choices[0].delta.content
        self.reply.append(time.time() - t0)
        if first is not None:
            self.first.append(first)
        self.texts.append(text)
        return messages + [{"role": "assistant", "content": text.strip()}]

    user = Room.user


def rooms_scenario(rooms: list[tuple[Room | ApiRoom, int]], turns: int, tok) -> dict:
    """Every room's users at once; metrics over all of them, as scenario()."""
    start = threading.Barrier(sum(n for _, n in rooms))
    t0 = time.time()
    threads = [threading.Thread(target=room.user, args=(i, turns, start)) for room, n in rooms for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    first = [x for room, _ in rooms for x in room.first]
    reply = [x for room, _ in rooms for x in room.reply]
    errors = [e for room, _ in rooms for e in room.errors]
    tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for room, _ in rooms for x in room.texts)
    return {"users": sum(n for _, n in rooms), "requests": len(reply), "errors": len(errors),
            "error_samples": errors[:3], "first_p50": pctl(first, 0.5), "first_p95": pctl(first, 0.95),
            "reply_p50": pctl(reply, 0.5), "reply_p95": pctl(reply, 0.95), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall}


def in_process_rate(turns: int, new_tokens: int, tok) -> float:
    """One user's tokens/s through ChatEngine in this process: the same questions, the same batch server."""
    from qlora_ui.chat import ChatEngine, GenerationSettings
    from qlora_ui.config import BUNDLED_MODEL, RunConfig

    engine = ChatEngine()
    engine.load(RunConfig().updated(base_model=BUNDLED_MODEL))
    settings = GenerationSettings(temperature=0.0, max_new_tokens=new_tokens, seed=0)
    engine.reply([{"role": "user", "content": "Hi"}], settings, None)  # warm-up, outside the clock
    t0, tokens = time.time(), 0
    history: list = []
    for t in range(turns):
        history = history + [{"role": "user", "content": QUESTIONS[0] if t == 0 else FOLLOW_UP}]
        text = engine.reply(history, settings, None)
        tokens += len(tok(text, add_special_tokens=False)["input_ids"])
        history.append({"role": "assistant", "content": text})
    engine.server.close()
    return tokens / (time.time() - t0)


def api_main(args) -> int:
    from transformers import AutoTokenizer

    from qlora_ui.modeling import ensure_bundled_model

    tok = AutoTokenizer.from_pretrained(str(ensure_bundled_model()))
    n, half = args.users, max(1, args.users // 2)
    out: dict = {"in_process_tps": in_process_rate(args.turns, args.new_tokens, tok)}
    print(f"in-process, one user: {out['in_process_tps']:.1f} tokens/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="qlora-load-api-") as work:
        with running_app(Path(work) / "runs", app_env(CUDA_VISIBLE_DEVICES="")) as app:
            ApiRoom(app.url, 8).ask("", "Hi", [])  # load the chat model once, outside the clock
            out["alone"] = rooms_scenario([(ApiRoom(app.url, args.new_tokens), 1)], args.turns, tok)
            print(f"1 API client: {out['alone']['tokens_per_s']:.1f} tokens/s", flush=True)
            out["room"] = rooms_scenario([(ApiRoom(app.url, args.new_tokens), n)], args.turns, tok)
            print(f"{n} API clients: {out['room']['tokens_per_s']:.1f} tokens/s", flush=True)
            out["mixed"] = rooms_scenario([(Room(app.url, args.new_tokens), half),
                                           (ApiRoom(app.url, args.new_tokens), half)], args.turns, tok)
            print(f"{half} browsers + {half} API clients: {out['mixed']['tokens_per_s']:.1f} tokens/s", flush=True)
    alone, room, mixed = out["alone"], out["room"], out["mixed"]
    ratio = room["tokens_per_s"] / alone["tokens_per_s"] if alone["tokens_per_s"] else None
    vs = alone["tokens_per_s"] / out["in_process_tps"] if out["in_process_tps"] else None
    rows = [
        (f"{n} API clients, idle app: errors", str(room["errors"]), "0", room["errors"] == 0),
        (f"{n} API clients: first token p50 / p95", f"{fmt(room['first_p50'])} / {fmt(room['first_p95'])}",
         "p95 <= 2 s", room["first_p95"] is not None and room["first_p95"] <= 2),
        (f"{n} API clients: aggregate tokens/s vs one", f"{room['tokens_per_s']:.1f} / {alone['tokens_per_s']:.1f}"
         f" = {ratio:.2f}x" if ratio else "-", ">= 3x", ratio is not None and ratio >= 3),
        ("one API client vs in-process generation, tokens/s", f"{alone['tokens_per_s']:.1f} / "
         f"{out['in_process_tps']:.1f} = {vs:.2f}x" if vs else "-", ">= 0.9x", vs is not None and vs >= 0.9),
        (f"{half} browsers + {half} API clients: errors", str(mixed["errors"]), "0", mixed["errors"] == 0),
        (f"{half} browsers + {half} API clients: first token p50 / p95",
         f"{fmt(mixed['first_p50'])} / {fmt(mixed['first_p95'])}", "p95 <= 2 s",
         mixed["first_p95"] is not None and mixed["first_p95"] <= 2),
    ]
    print(f"\n{args.turns} turns per user, {args.new_tokens} new tokens at most, greedy, bundled model\n")
    print(table(["measure", "value", "goal", "met"], rows))
    for k in ("alone", "room", "mixed"):
        if out[k]["errors"]:
            print(f"{k} errors, e.g.: {out[k]['error_samples']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
