"""Preference pairs from a Hub dataset (hf://owner/name), read the way the SFT path reads one (sources.py): the
subset, split and revision, the HF cache when offline, one message for a missing split or an uncached id. Against
the small Hub of tests/hub_server.py, in subprocesses with the test's own HF caches (tests/test_hub_data.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fault_helpers import ROOT, cli
from tests.hub_server import FakeHub
from tests.test_hub_data import error_lines, hf_env

REPO = "owner/prefs"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
  - split: test
    path: data/test.jsonl
---
# Tiny preference pairs for the tests
"""


def pairs(n: int, tag: str) -> str:
    return "".join(json.dumps({"prompt": f"Tell me about {tag} {i}.", "chosen": f"Arr! {tag} {i} be grand, matey.",
                               "rejected": f"Sorry, I cannot help with {tag} {i}."}) + "\n" for i in range(n))


@pytest.fixture()
def hub():
    with FakeHub() as h:
        h.sha = h.commit(REPO, {"README.md": README, "data/train.jsonl": pairs(12, "train"),
                                "data/test.jsonl": pairs(4, "test")})
        yield h


# Offline, in one interpreter: the data panel (through the Studio's own checks), the train preflight, a bad split
# and an id that is not cached; then a 2-step DPO run whose dataset.json records the commit it read.
OFFLINE = """
import json, sys
from qlora_ui.config import DataConfig
from qlora_ui.data.preference import check_preference_file
from qlora_ui.errors import DataError
from qlora_ui.jobs import create_job
from qlora_ui.studio import Studio
from qlora_ui.ui.tabs.model_data import inspect_upload
from tests.fault_helpers import fast_cfg

model, runs = sys.argv[1], sys.argv[2]
out = {}
cfg = fast_cfg(model, "hf://owner/prefs", method="dpo", max_length=128, system_prompt="Answer.", max_steps=2,
               save_steps=2, learning_rate=5e-3, runs_dir=runs)
summary, _, fig, example = inspect_upload(Studio(runs, model_roots=[model]), cfg)
out["panel"], out["example"], out["fig"] = summary, example, fig is not None
out["test_split"] = check_preference_file(DataConfig(data_path="hf://owner/prefs", data_split="test"))
for key, data in (("bad_split", DataConfig(data_path="hf://owner/prefs", data_split="dev")),
                  ("uncached", DataConfig(data_path="hf://owner/other"))):
    try:
        check_preference_file(data)
    except DataError as e:
        out[key] = str(e)
job = create_job(cfg)
out["state"] = job.run_blocking()
out["error"] = job.error_message
out["steps"] = [r["step"] for r in job.run.read_metrics() if "reward_accuracy" in r]
out["record"] = json.loads((job.run.path / "dataset.json").read_text())
print("RESULT " + json.dumps(out))
"""


def test_dpo_reads_a_hub_dataset_online_then_offline_from_the_cache(tmp_path, hub, tiny_model_dir):
    # Online (the test's Hub): `check-data` reads the pairs as DPO would, and the download fills the HF cache.
    r = cli("check-data", f"hf://{REPO}", "--base-model", tiny_model_dir, "--max-length", "128",
            env=hf_env(tmp_path, hub))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"Dataset: hf://{REPO} [train] @ {hub.sha[:12]}" in r.stdout
    assert "Format: preference (standard)" in r.stdout and "Rows: 12 read, 12 kept" in r.stdout
    assert "chosen (" in r.stdout and "Arr! train 0 be grand" in r.stdout and "method dpo" in r.stdout

    # Offline, with a fresh prepared-rows cache: the HF cache alone answers; the Hub is not asked.
    asked = len(hub.requests)
    env = hf_env(tmp_path, offline=True, data_cache="qd2")
    p = subprocess.run([sys.executable, "-c", OFFLINE, str(tiny_model_dir), str(tmp_path / "runs")], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert len(hub.requests) == asked
    # The data panel: the pairs with their token counts, and the commit read.
    assert f"hf://{REPO} [train] @ {hub.sha[:12]}" in out["panel"] and "preference (standard)" in out["panel"]
    assert "12 kept" in out["panel"] and out["fig"]
    assert "Chosen (preferred)" in out["example"] and "Arr! train" in out["example"] and "Sorry" in out["example"]
    assert out["test_split"] == "preference (standard)"
    assert "no split 'dev'; its splits are train, test" in out["bad_split"] and "--data-split" in out["bad_split"]
    assert "hf://owner/other is not in this machine's Hugging Face cache" in out["uncached"]
    assert "huggingface-cli download --repo-type dataset owner/other" in out["uncached"]
    # Trained from it, and the run records the commit it read (what a resume checks).
    assert out["state"] == "finished", out["error"]
    assert out["steps"] == [1, 2]
    record = out["record"]
    assert record["kind"] == "hub" and record["id"] == REPO and record["revision"] == hub.sha
    assert record["rows"] == 12


def test_train_refuses_sft_rows_from_the_hub_for_dpo_naming_the_column(tmp_path, tiny_model_dir):
    with FakeHub() as h:
        rows = "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(3))
        h.commit("owner/sft", {"data/train.jsonl": rows})
        runs = tmp_path / "runs"
        r = cli("train", "--model", tiny_model_dir, "--data", "hf://owner/sft", "--method", "dpo", "--runs-dir",
                runs, env=hf_env(tmp_path, h), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = error_lines(r.stderr)
    assert "hf://owner/sft [train]" in line and "'chosen' and 'rejected' are missing" in line
    assert not runs.exists() or not any(runs.iterdir())
