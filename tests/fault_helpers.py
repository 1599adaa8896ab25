"""Helpers shared by the bad-settings, fault, security and two-session tests (not a test module)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_ui.config import RunConfig, load_preset
from qlora_ui.ui.form import Form

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Arr! Number {i} it be, matey."} for i in range(40)]


def write_rows(path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:n]))
    return path


def cli(*args: Any, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_ui", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def fast_cfg(model: str | Path, data: str | Path, **kw: Any) -> RunConfig:
    """The quick-start preset made fast for a tiny model: short rows, small batch, plain AdamW."""
    base = dict(base_model=str(model), data_path=str(data), max_steps=16, batch_size=2, eval_fraction=0.0,
                gradient_checkpointing=False, optimizer="adamw_torch", save_steps=4, lora_r=4, lora_alpha=8,
                warmup_ratio=0.0, name="t")
    base.update(kw)
    return load_preset("cpu-quickstart").updated(**base)


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
