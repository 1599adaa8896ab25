"""What the app costs on top of the engine: start time, training step time with a browser watching, chat latency.

    python bench/app_overhead.py            # ~6 minutes on 2 CPU cores; run it alone on the machine
    python bench/app_overhead.py --steps 12 --no-browser

Three measurements, each against a baseline taken in the same invocation:
1. app start: `python app.py` until `GET /` answers 200 (goal <= 5 s; the bundled model is already converted);
2. training: median s/step of the cpu-quickstart preset run headless by the CLI, against the same run started from
   the app with a Chromium page open on the Train tab (its 1.5 s poll redrawing the charts) — goal >= 0.97;
3. chat: time to the first streamed update and generated tokens/s of a `chat` request over HTTP, against a bare
   `model.generate` on the same 4-bit model in this process — goals <= 1 s and >= 0.95x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PROMPT = "Tell me about the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_times(run: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    t = [r["time"] for r in rows if "loss" in r and "time" in r]
    return [b - a for a, b in zip(t, t[1:])]


def start_app(runs: Path, env: dict) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = free_port()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while time.time() - t0 < 180:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url, time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the app did not start in 180 s")


def upload(url: str, path: Path) -> dict:
    """The file as a browser uploads it: Gradio only accepts files that went through its upload route."""
    import httpx

    with open(path, "rb") as f:
        r = httpx.post(f"{url}/gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
    r.raise_for_status()
    return {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def queue_events(client, fn: int, trigger_id, data: list, session: str):
    """The messages of one call through Gradio's queue, as the page makes it: join, then read the event stream."""
    r = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                    "event_data": None, "trigger_id": trigger_id})
    r.raise_for_status()
    with client.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def shows_a_token(msg: dict, updates: int) -> bool:
    """Whether a streamed chat update carries generated text: the first update echoes the user's message, and
    place-in-line notices ("⏳ Waiting ...") come before the first token."""
    shown = json.dumps(msg["output"].get("data", [None])[0], ensure_ascii=False)
    return updates > 1 and "⏳" not in shown


def queue_stream(url: str, api_name: str, data: list):
    """(seconds to the first generated token's update, seconds to completion, final message) of a queued call."""
    import httpx

    c = httpx.Client(base_url=url, timeout=600)
    deps = c.get("/config").json()["dependencies"]
    fn = next(i for i, d in enumerate(deps) if d.get("api_name") == api_name)
    t0 = time.time()
    first, updates = None, 0
    for msg in queue_events(c, fn, deps[fn].get("id"), data, uuid.uuid4().hex[:12]):
        if msg.get("msg") == "process_generating":
            updates += 1
            if first is None and shows_a_token(msg, updates):
                first = time.time() - t0
        if msg.get("msg") == "process_completed":
            return first, time.time() - t0, msg
    raise SystemExit(f"{api_name}: the stream ended without a result")


def bare_generate(new_tokens: int) -> tuple[float, float]:
    """(seconds to the first new token, tokens/s) of model.generate on the chat engine's 4-bit base."""
    from transformers import TextIteratorStreamer

    from qlora_ui.chat import ChatEngine, GenerationSettings
    from qlora_ui.config import BUNDLED_MODEL, RunConfig

    eng = ChatEngine()
    eng.load(RunConfig().updated(base_model=BUNDLED_MODEL))
    ids = eng._prompt_ids([{"role": "user", "content": PROMPT}], GenerationSettings(max_new_tokens=new_tokens))
    eng.model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm
    import threading

    streamer = TextIteratorStreamer(eng.tokenizer, skip_prompt=True)
    kw = dict(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
              pad_token_id=eng.tokenizer.pad_token_id)
    t0 = time.time()
    th = threading.Thread(target=lambda: eng.model.generate(**kw))
    th.start()
    first = None
    for _ in streamer:
        if first is None:
            first = time.time() - t0
    th.join()
    return first, new_tokens / (time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-browser", action="store_true", help="train from the app without a page watching")
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "CUDA_VISIBLE_DEVICES": ""}
    from qlora_ui.modeling import ensure_bundled_model

    ensure_bundled_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qlora-overhead-") as work:
        work = Path(work)
        # 2. headless CLI baseline
        cli_runs = work / "cli-runs"
        subprocess.run([sys.executable, "-m", "qlora_ui", "train", "--preset", "cpu-quickstart", "--max-steps",
                        str(args.steps), "--runs-dir", str(cli_runs),
                        "--quiet"], cwd=ROOT, env=env, check=True, capture_output=True)
        cli_steps = step_times(next(cli_runs.iterdir()))
        # 1. app start
        app_runs = work / "app-runs"
        proc, url, started = start_app(app_runs, env)
        try:
            from qlora_ui.config import load_preset
            from qlora_ui.ui.app import FORM_KEYS
            from qlora_ui.ui.form import form_values

            cfg = load_preset("cpu-quickstart").updated(max_steps=args.steps)
            vals = form_values(cfg, FORM_KEYS)
            vals[FORM_KEYS.index("data_path")] = upload(url, ROOT / "presets" / "data" / "pirate_chat.jsonl")
            browser = page = pw = None
            if not args.no_browser:
                from playwright.sync_api import sync_playwright

                pw = sync_playwright().start()
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(url)
                page.get_by_role("tab", name="Train").click()
                page.get_by_label("Max steps").first.fill(str(args.steps))
                page.get_by_label("Max steps").first.press("Tab")
                page.get_by_role("button", name="Start training").click()
            else:
                _, _, msg = queue_stream(url, "start_training", vals)
                if not msg.get("success", True):
                    raise SystemExit(f"start_training failed: {msg.get('output')}")
            deadline = time.time() + 1800
            started_at = time.time()
            run = None
            while time.time() < deadline:
                runs = [r for r in app_runs.iterdir() if (r / "status.json").is_file()] if app_runs.exists() else []
                if not runs and time.time() - started_at > 120:
                    raise SystemExit("the app started no run in 120 s")
                if runs:
                    run = runs[0]
                    if json.loads((run / "status.json").read_text()).get("state") in ("finished", "failed",
                                                                                        "stopped"):
                        break
                time.sleep(1)
            app_steps = step_times(run)
            if browser is not None:
                browser.close()
                pw.stop()
            # 3. chat over HTTP (base model, greedy)
            data = ["Base model only", None, "", 0.0, 0.9, args.new_tokens, 0, PROMPT, []]
            queue_stream(url, "chat", ["Base model only", None, "", 0.0, 0.9, 8, 0, "Hi", []])  # load, warm
            first, total, msg = queue_stream(url, "chat", data)
        finally:
            proc.terminate()
            proc.wait(30)
    from transformers import AutoTokenizer

    reply = msg["output"]["data"][0][-1]["content"]
    reply = "".join(x.get("text", "") for x in reply) if isinstance(reply, list) else reply
    tok = AutoTokenizer.from_pretrained(str(ensure_bundled_model()))
    n = len(tok(reply, add_special_tokens=False)["input_ids"])
    app_tps = n / total
    bare_first, bare_tps = bare_generate(max(n, 1))
    cli_med, app_med = statistics.median(cli_steps[2:]), statistics.median(app_steps[2:])
    watch = "with a browser on the Train tab" if not args.no_browser else "from the app, no browser"
    rows = [("app start to first HTTP 200", f"{started:.1f} s", "", "<= 5 s", started <= 5),
            (f"s/step headless CLI vs {watch}", f"{cli_med:.2f} / {app_med:.2f}", f"{cli_med / app_med:.2f}x",
             ">= 0.97", cli_med / app_med >= 0.97),
            ("chat: first streamed update (HTTP) vs bare generate's first token", f"{first:.2f} / {bare_first:.2f} s",
             "", "<= 1 s", first <= 1),
            ("chat: tokens/s over HTTP vs bare generate", f"{app_tps:.1f} / {bare_tps:.1f}",
             f"{app_tps / bare_tps:.2f}x", ">= 0.95x", app_tps / bare_tps >= 0.95)]
    print("| measure | value | ratio | goal | met |\n|---|---|---|---|---|")
    for name, val, ratio, goal, ok in rows:
        print(f"| {name} | {val} | {ratio} | {goal} | {'yes' if ok else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
