"""The tests' one helper module (not a test module): tiny models and their configs, the CLI in a subprocess, the app
and headless Chromium, form values as handlers get them, waiting, bad model folders. Fixtures are in conftest.py.
Test modules import it as `from tests.fault_helpers import ...` (conftest.py puts the repo root on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qlora_ui.config import RunConfig, load_preset
from qlora_ui.ui.form import Form

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
BAD = DATA / "bad"  # files that are wrong in one way each
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Arr! Number {i} it be, matey."} for i in range(40)]


def write_rows(path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:n]))
    return path


def cli(*args: Any, timeout: float = 300, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m qlora_ui ARGS` as a user runs it (output captured as text; `env` None: this process's)."""
    return subprocess.run([sys.executable, "-m", "qlora_ui", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def cli_start(*args: Any, **popen: Any) -> subprocess.Popen:
    """The same CLI started in the background, from the repo root; `popen`: Popen's keywords (stdout, ...)."""
    return subprocess.Popen([sys.executable, "-m", "qlora_ui", *map(str, args)], cwd=ROOT, **popen)


# ---- tiny models and their configs ----

def make_tiny_model(out: Path, tokenizer, seed: int = 0, **llama: Any) -> Path:
    """A random 2-layer Llama (hidden 64) with the bundled tokenizer, saved in bf16 to `out`; `llama` overrides its
    LlamaConfig (e.g. initializer_range)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(LlamaConfig(**(shape | llama))).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_cfg(model: str | Path, data: str | Path | None = None, *, preset: str | None = None,
             defaults: dict[str, Any] | None = None, **kw: Any) -> RunConfig:
    """The tests' one config builder: `preset` (or RunConfig's defaults) with the model, the data (when given),
    then `defaults`, then `kw` set."""
    values = {"base_model": str(model), **({} if data is None else {"data_path": str(data)}), **(defaults or {}), **kw}
    return (load_preset(preset) if preset else RunConfig()).updated(**values)


# The quick-start preset made fast for a tiny model: short rows, small batch, plain AdamW.
FAST = dict(max_steps=16, batch_size=2, eval_fraction=0.0, gradient_checkpointing=False, optimizer="adamw_torch",
            save_steps=4, lora_r=4, lora_alpha=8, warmup_ratio=0.0, name="t")
# A rank-8 adapter without dropout computed in fp32: logits compare exactly.
LORA_FP32 = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0, compute_dtype="fp32")


def fast_cfg(model: str | Path, data: str | Path, **kw: Any) -> RunConfig:
    """The quick-start preset made fast for a tiny model (FAST), then `kw`."""
    return make_cfg(model, data, preset="cpu-quickstart", defaults=FAST, **kw)


def lora_cfg(model: str | Path, **kw: Any) -> RunConfig:
    """RunConfig's defaults with LORA_FP32, then `kw`: for loading the model and an adapter, not for a run."""
    return make_cfg(model, defaults=LORA_FP32, **kw)


def nudge_adapter(model, seed: int, scale: float):
    """Move a fresh adapter off its no-op start: lora_B (and DoRA magnitudes) += N(0, scale²), seeded; returns the
    model."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn_like(p) * scale)
    return model


# ---- the app and headless Chromium ----

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium (a playwright Browser), closed on leaving; fails the test where Chromium is missing."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `apt-get install -y chromium` (make test does this as root).")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminal_signals() -> None:
    """In a child before exec: Ctrl-C handled as a terminal would deliver it. In the full suite (never alone) a CLI
    and an app each ignored a Ctrl-C: a child inherits its parent thread's signal mask and an ignored SIGINT, and
    libraries in the test process change both around their own spawns (multiprocess's resource tracker blocks
    SIGINT per thread), so the child starts from the defaults."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_app(tmp: Path, model_dir: Path | None, *extra: str, env_extra: dict | None = None):
    """`python app.py` on a free port, runs under tmp/runs, `model_dir` copied to tmp/models/tiny; (proc, url)
    once it answers."""
    models = tmp / "models"
    models.mkdir(exist_ok=True)
    if model_dir is not None and not (models / "tiny").exists():
        shutil.copytree(model_dir, models / "tiny")
    return launch_app(tmp, "--runs-dir", str(tmp / "runs"), "--model-root", str(models), *extra, env_extra=env_extra)


def launch_app(log_dir: Path, *flags: str, cwd: Path = ROOT, env_extra: dict | None = None):
    """`python app.py FLAGS` on a free port, started from `cwd`, its output in log_dir/app-PORT.log; (proc, url)
    once it answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           **(env_extra or {})}
    log_path = log_dir / f"app-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *flags], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=terminal_signals)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("app did not start in 120 s")


def shots_dir(tmp: Path) -> Path:
    d = Path(os.environ.get("QLORA_SCREENSHOTS") or tmp / "shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def plot_points(page) -> int:
    """Points of the train-loss trace in the live plotly chart."""
    return page.locator("#train-plot .scatterlayer .trace").first.locator("path.point").count()


VIEWPORT = {"width": 1400, "height": 1000}


def open_app(page, url: str):
    """Go to the app and wait until the form shows the quick start's bundled dataset understood; returns the page."""
    page.goto(url)
    page.wait_for_selector("#data-summary:has-text('Format: messages')", timeout=90_000)
    return page


def start_training(page, max_steps: int) -> None:
    """On the Train tab: set Max steps, press Start training, wait until the progress bar says it runs."""
    steps = page.get_by_label("Max steps")
    steps.fill(str(max_steps))
    steps.press("Tab")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("#train-progress [data-state=running]", timeout=60_000)


def use_tiny_model(page, models_root: Path):
    box = page.get_by_label("Base model")
    box.click()
    box.fill(str(models_root / "tiny"))
    box.press("Enter")


# ---- form values as the handlers get them ----

# The form's components (unrendered): the handlers' inputs are keyed by them, as Gradio passes them.
FORM = Form()


def form_input(cfg: RunConfig, **raw: Any) -> dict[Any, Any]:
    """{component: value} showing `cfg`, as a handler gets it; `raw` sets values as a browser/API client would send
    them (unchecked)."""
    return FORM.updates(cfg) | FORM.values(raw)


def form(cfg: RunConfig, **raw: Any) -> list[Any]:
    """The same values as an API client passes them: positional, in the form's API order."""
    return list(form_input(cfg, **raw).values())


class ByName(dict):
    """Stands in for a tab's components in handler tests: each component is its own name, so the handler's
    `{component: value}` dicts come back keyed by name (and take their inputs by name)."""

    def __missing__(self, key: str) -> str:
        return key


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if (p / "config.yaml").is_file()) if runs.is_dir() else []


def loss_steps(run: Path) -> list[int]:
    from qlora_ui.runs import RunDir

    return [r["step"] for r in RunDir(run).read_metrics() if "loss" in r]


def bad_model_folders(root: Path, tiny: Path) -> dict[str, Path]:
    """Under one model root: a good tiny model and one folder per way a model folder can be wrong."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"tiny": root / "tiny"}
    if not out["tiny"].exists():
        shutil.copytree(tiny, out["tiny"])
    pick = out["pickle_only"] = root / "pickle-only"
    pick.mkdir(exist_ok=True)
    shutil.copy(tiny / "config.json", pick / "config.json")
    (pick / "pytorch_model.bin").write_bytes(b"a pickle would run code here")
    remote = out["remote_code"] = root / "remote-code"
    if not remote.exists():
        shutil.copytree(tiny, remote)
        conf = json.loads((remote / "config.json").read_text())
        conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (remote / "config.json").write_text(json.dumps(conf))
    no_conf = out["no_config"] = root / "no-config"
    no_conf.mkdir(exist_ok=True)
    (no_conf / "model.safetensors").write_bytes(b"")
    no_w = out["no_weights"] = root / "no-weights"
    no_w.mkdir(exist_ok=True)
    shutil.copy(tiny / "config.json", no_w / "config.json")
    out["a_file"] = root / "model.safetensors"
    out["a_file"].write_bytes(b"not a folder")
    out["missing"] = root / "does-not-exist"
    return out


def fake_hub_repo(cache: Path, repo_id: str, model_dir: Path, marker: Path) -> Path:
    """A hub repository already in the offline hub cache (HF_HUB_CACHE layout) whose config asks, via auto_map,
    for Python code that leaves `marker` when it is imported: what a hub id with trust_remote_code would run."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(model_dir, snap, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    conf = json.loads((snap / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                        "AutoModelForCausalLM": "configuration_evil.EvilForCausalLM"}
    (snap / "config.json").write_text(json.dumps(conf))
    (snap / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    pass\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return repo


def chat_input(run: str | None, adapter: str | None, msg: str, history: list | None = None, *, system: str = "",
               temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: int = 32, seed: int = 0) -> dict:
    """What the Chat tab's send and compare handlers get, keyed by component name (see ByName)."""
    return {"run": run, "checkpoint": adapter, "system": system, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": max_new_tokens, "seed": seed, "msg": msg, "history": history or []}
