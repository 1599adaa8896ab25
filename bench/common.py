"""What every bench shares: the app in a child process, Gradio's queue protocol, generated data and models, and the
result table with its goal/met column.

The benches are scripts (`python bench/<name>.py`): Python puts bench/ first on sys.path, so each one imports this
file as `common`; importing it puts the repository root on sys.path, the one place that does, so `qlora_ui` imports
without an install. A bench imports this and qlora_ui, never another bench or anything under tests/.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLI = [sys.executable, "-m", "qlora_ui"]  # the project's own command line, run as a child
PIRATE_DATA = ROOT / "presets" / "data" / "pirate_chat.jsonl"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


# ---------------------------------------------------------------- the app in a child process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(**extra: str) -> dict[str, str]:
    """The environment the benches start the app and the CLI in: offline, no analytics, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **extra}


@dataclass
class App:
    proc: subprocess.Popen
    url: str
    start_s: float  # `python app.py` until `GET /` answered 200


@contextlib.contextmanager
def running_app(runs: Path, env: dict, *flags: str, log: Path | None = None, timeout: float = 180,
                stop_wait: float = 60) -> Iterator[App]:
    """`python app.py` on a free port with its runs in `runs`, until `GET /` answers 200; stopped on the way out."""
    import httpx

    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below, after the app
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs), *flags],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"the app exited with code {proc.returncode} before it answered")
            if time.time() - t0 > timeout:
                raise SystemExit(f"the app did not start in {timeout:.0f} s")
            time.sleep(0.05)
        yield App(proc, url, time.time() - t0)
    finally:
        proc.terminate()
        try:
            proc.wait(stop_wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def launch_chromium(playwright):
    """Headless Chromium as the browser tests start it."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


# ---------------------------------------------------------------- Gradio's queue, as the page speaks it

def new_session() -> str:
    return uuid.uuid4().hex[:12]


def shows_a_token(msg: dict, updates: int) -> bool:
    """Whether a streamed chat update carries generated text: the first update echoes the user's message, and
    place-in-line notices ("⏳ Waiting ...") come before the first token."""
    shown = json.dumps(msg["output"].get("data", [None])[0], ensure_ascii=False)
    return updates > 1 and "⏳" not in shown


def text_of(content) -> str:
    """A chatbot message's text: Gradio 6 sends content as a list of typed parts."""
    if isinstance(content, list):
        return "".join(x.get("text", "") for x in content if isinstance(x, dict))
    return content or ""


class QueueClient:
    """The app's endpoints called the way the page calls them: join the queue, then read the event stream.
    Safe to share between threads: each call opens its own connection."""

    def __init__(self, url: str):
        import httpx

        self.url = url
        self.deps = httpx.get(f"{url}/config", timeout=30).json()["dependencies"]

    def endpoint(self, api_name: str) -> tuple[int, Any]:
        """(fn_index, trigger id) of a named endpoint."""
        fn = next(i for i, d in enumerate(self.deps) if d.get("api_name") == api_name)
        return fn, self.deps[fn].get("id")

    def upload(self, path: Path) -> dict:
        """The file as a browser uploads it: Gradio only accepts files that went through its upload route."""
        import httpx

        with open(path, "rb") as f:
            r = httpx.post(f"{self.url}/gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
        r.raise_for_status()
        return {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def events(self, api_name: str, data: list, session: str | None = None) -> Iterator[dict]:
        """The messages of one call through the queue."""
        import httpx

        fn, trigger = self.endpoint(api_name)
        session = session or new_session()
        with httpx.Client(base_url=self.url, timeout=600) as c:
            r = c.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                       "event_data": None, "trigger_id": trigger})
            r.raise_for_status()
            with c.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as s:
                for line in s.iter_lines():
                    if line.startswith("data:"):
                        yield json.loads(line[5:])

    def stream(self, api_name: str, data: list, session: str | None = None) -> tuple[float | None, float,
                                                                                       dict | None]:
        """(seconds to the first generated token's update, seconds to the end, the final message or None when the
        stream ended without one) of one queued call."""
        t0 = time.time()
        first, updates = None, 0
        for msg in self.events(api_name, data, session):
            if msg.get("msg") == "process_generating":
                updates += 1
                if first is None and shows_a_token(msg, updates):
                    first = time.time() - t0
            elif msg.get("msg") == "process_completed":
                return first, time.time() - t0, msg
        return first, time.time() - t0, None

    def call(self, api_name: str, data: list) -> tuple[float | None, float, dict]:
        """`stream`, where a stream that ends without a result ends the bench."""
        first, total, msg = self.stream(api_name, data)
        if msg is None:
            raise SystemExit(f"{api_name}: the stream ended without a result")
        return first, total, msg

    def start_training(self, cfg, data: Path = PIRATE_DATA) -> None:
        """Press "Start training" with the form filled from `cfg` and `data` uploaded as the dataset."""
        from qlora_ui.ui.form import Form

        form = Form()
        vals = list((form.updates(cfg) | form.values({"data_path": self.upload(data)})).values())  # API order
        _, _, msg = self.call("start_training", vals)
        if not msg.get("success", True):
            raise SystemExit(f"start_training failed: {msg.get('output')}")


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl."""
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------- generated data

WORDS = ("explain describe compare important different because through between mountains villages rivers "
         "quietly carefully remember questions answers example several children garden kitchen library "
         "morning evening weather history science language computer program summary").split()


def write_word_alpaca(path: Path, rows: int, seed: int = 0) -> Path:
    """Alpaca rows of about 420 bytes, a third with an input field: 60-140 tokens rendered with SmolLM2's template,
    so the quick-start preset's max_length 128 keeps most and drops a few as too long, as real data does."""
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            ins = " ".join(rnd.choices(WORDS, k=rnd.randint(5, 18)))
            out = " ".join(rnd.choices(WORDS, k=rnd.randint(10, 50)))
            f.write(json.dumps({"instruction": f"Q{i}: {ins}?", "input": "" if i % 3 else f"Context: {ins}.",
                                "output": out}) + "\n")
    return path


def chatterbot_alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows from chatterbot-corpus Q/A pairs (BSD), several pairs per row so lengths spread from about
    100 to 450 tokens, as real instruction data does."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    pairs = []
    for f in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            if len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                pairs.append((conv[0].strip(), conv[1].strip()))
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.choice([2, 3, 4, 6, 8, 10, 12])
        picked = rng.sample(pairs, k)
        rows.append({"instruction": "Answer each of these questions in turn.\n" +
                     "\n".join(f"{i + 1}. {q}" for i, (q, _) in enumerate(picked)),
                     "input": "", "output": "\n".join(f"{i + 1}. {a}" for i, (_, a) in enumerate(picked))})
    return rows


def write_word_text(path: Path, rows: int = 64, words: int = 480) -> Path:
    """Text rows of `words` words from w3..w999, which `write_word_tokenizer` makes one token each: a row is
    ~`words` tokens for a random model."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(3, 1000)}" for _ in range(words))}) + "\n")
    return path


# ---------------------------------------------------------------- generated models

def write_word_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer with `vocab` entries (w3..w999 at most): load_for_training needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, min(vocab, 1000))}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "</s>"}))


def make_random_model(out: Path, shape: dict, device: str = "cpu") -> Path:
    """Random bf16 Llama weights of a given shape, saved as a local folder (built on `device` for speed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    torch.set_default_dtype(torch.bfloat16)  # never materialize fp32 weights (a 13B model would need 52 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    write_word_tokenizer(out, cfg.vocab_size)
    del model
    if device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # hand the GPU back before the measuring subprocess starts
    return out


def shape_dict(name: str) -> dict:
    """A known model's shape (qlora_ui.memory's table, e.g. "llama-7b") as LlamaConfig arguments."""
    from qlora_ui.memory import resolve_shape

    s = resolve_shape(name)
    return {"hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab,
            "tie_word_embeddings": s.tie_embeddings}


# ---------------------------------------------------------------- the result table

def meets(value: float | None, op: Literal["<=", ">=", "within"], goal: float) -> bool | None:
    """Whether a measured value meets its goal ("within": a ratio within ±goal of 1); None when nothing was
    measured."""
    if value is None:
        return None
    if op == "<=":
        return value <= goal
    if op == ">=":
        return value >= goal
    return abs(value - 1) <= goal


def verdict(ok: bool | None | str, yes: str = "yes", no: str = "no", unmeasured: str = "") -> str:
    """The met column's cell: `yes`/`no` for a goal's verdict (each bench keeps the words its recorded results use),
    `unmeasured` for None, any other value as it is."""
    return (yes if ok else no) if isinstance(ok, bool) else unmeasured if ok is None else str(ok)


def table(head: Sequence[str], body: Sequence[Sequence[Any]], style: Literal["markdown", "grid", "plain"]
          = "markdown", *, yes: str = "yes", no: str = "no", unmeasured: str = "") -> str:
    """Rows as a table, each cell through `verdict`: a bool is a goal met or not, None is `unmeasured`.

    markdown: `| a | b |` rows under a `|---|---|` rule; grid: columns padded and joined by " | ", a "-+-" rule;
    plain: columns padded and joined by two spaces, a dashed rule, trailing spaces cut.
    """
    rows = [[verdict(x, yes, no, unmeasured) for x in r] for r in body]
    if style == "markdown":
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                         + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    if style == "grid":
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows])
    lines = [list(head), ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)
