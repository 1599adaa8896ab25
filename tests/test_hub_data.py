"""Datasets by Hub id and local dataset folders (issue 30), offline: the real `datasets` / `huggingface_hub` code runs
against a small Hub made by the test (tests/hub_server.py, HF_ENDPOINT pointing at it), in subprocesses so that
HF_ENDPOINT / HF_HUB_OFFLINE are read as a user's shell sets them. Every HF cache is the test's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ui.config import DataConfig
from qlora_ui.errors import DataError, RunError
from tests.fault_helpers import ROOT, cli, fast_cfg, write_rows
from tests.hub_server import FakeHub

REPO = "owner/tiny"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
  - split: test
    path: data/test.jsonl
---
# A tiny alpaca dataset for the tests
"""


def rows(n: int, tag: str) -> str:
    return "".join(json.dumps({"instruction": f"Say {tag} number {i}.", "output": f"Arr, {tag} {i} it be."}) + "\n"
                   for i in range(n))


@pytest.fixture()
def hub():
    with FakeHub() as h:
        h.sha = h.commit(REPO, {"README.md": README, "data/train.jsonl": rows(30, "train"),
                                "data/test.jsonl": rows(6, "test")})
        yield h


def hf_env(tmp: Path, hub: FakeHub | None = None, *, offline: bool = False, data_cache: str = "qd") -> dict:
    """The environment of a user's shell with its own HF caches (never the real ones)."""
    # conftest.py makes the suite offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, which huggingface_hub also reads).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp / "hf"), HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"),
               QLORA_DATA_CACHE=str(tmp / data_cache), HF_HUB_DISABLE_TELEMETRY="1",
               HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9")  # port 9: nothing answers there
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_hub_dataset_downloads_previews_and_then_loads_offline_from_the_cache(tmp_path, hub):
    # Before the download: the split list and the first rows, streamed.
    peek = ("from qlora_ui.data import DataError, preview_rows, source_of, split_names\n"
            f"s = source_of('hf://{REPO}', split='test')\n"
            "print(split_names(s)); print(preview_rows(s, 2)[1]['instruction'])\n"
            "try:\n    preview_rows(source_of('hf://owner/nope'), 2)\n"
            "except DataError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", peek], env=hf_env(tmp_path, hub), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["['train', 'test']", "Say test number 1."]
    assert r.stdout.split("\n")[2].startswith("hf://owner/nope was not found on the Hub")
    assert not (tmp_path / "hf" / "datasets" / "owner___tiny").exists()  # streamed: nothing prepared yet

    r = cli("check-data", f"hf://{REPO}", "--base-model", "none", env=hf_env(tmp_path, hub))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"Dataset: hf://{REPO} [train] @ {hub.sha[:12]}" in r.stdout
    assert "Format: alpaca" in r.stdout and "Rows: 30 read, 30 kept" in r.stdout
    assert any(q.startswith("GET ") and q.endswith("/data/train.jsonl") for q in hub.requests)
    assert (tmp_path / "hf" / "datasets" / "owner___tiny").is_dir()  # in the HF cache, as datasets keeps it

    # Offline, with a fresh prepared-rows cache: the HF cache alone answers, and the Hub is not asked.
    asked = len(hub.requests)
    r = cli("check-data", f"hf://{REPO}", "--base-model", "none", env=hf_env(tmp_path, offline=True, data_cache="qd2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"@ {hub.sha[:12]}" in r.stdout and "Rows: 30 read" in r.stdout
    assert len(hub.requests) == asked

    # A dataset that is not cached: one message saying so and how to get it.
    r = cli("check-data", "hf://owner/other", "--base-model", "none", env=hf_env(tmp_path, offline=True))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "not in this machine's Hugging Face cache" in line
    assert "huggingface-cli download --repo-type dataset owner/other" in line

    # What that message advises: a download into the hub cache alone (no `datasets` cache) is enough offline.
    fresh = tmp_path / "fresh"
    get = f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r}, repo_type='dataset')"
    r = subprocess.run([sys.executable, "-c", get], env=hf_env(fresh, hub), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("check-data", f"hf://{REPO}", "--base-model", "none", env=hf_env(fresh, offline=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"@ {hub.sha[:12]}" in r.stdout and "Rows: 30 read" in r.stdout


def test_missing_split_or_id_is_one_message_and_makes_no_run(tmp_path, hub, tiny_model_dir):
    runs = tmp_path / "runs"
    r = cli("train", "--preset", "cpu-quickstart", "--model", tiny_model_dir, "--data", f"hf://{REPO}",
            "--data-split", "validation", "--runs-dir", runs, env=hf_env(tmp_path, hub))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = error_lines(r.stderr)
    assert "no split 'validation'" in line and "its splits are train, test" in line and "--data-split" in line
    assert not runs.exists() or not any(runs.iterdir())

    r = cli("check-data", "hf://owner/missing", "--base-model", "none", env=hf_env(tmp_path, hub))
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert "hf://owner/missing was not found on the Hub" in line


def test_run_records_the_commit_and_resume_refuses_a_new_one(tmp_path, hub, tiny_model_dir):
    from qlora_ui.cli_flags import cli_command
    from qlora_ui.runs import list_runs

    runs = tmp_path / "runs"
    env = hf_env(tmp_path, hub)
    # The run as `train` makes it (checks, folder, dataset record), without its training steps: a local folder's
    # run trains below, through the same rows stage.
    make = ("from qlora_ui.jobs import create_job; from tests.fault_helpers import fast_cfg; "
            f"create_job(fast_cfg({str(tiny_model_dir)!r}, 'hf://{REPO}', runs_dir={str(runs)!r}, max_length=128))")
    r = subprocess.run([sys.executable, "-c", make], env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list_runs(runs)
    run.write_status("stopped", "stopped by the user")
    record = json.loads((run.path / "dataset.json").read_text())
    assert record["kind"] == "hub" and record["id"] == REPO and record["split"] == "train"
    assert record["revision"] == hub.sha and len(record["fingerprint"]) == 64 and record["rows"] == 30
    # The Runs tab's command pins the commit the run read.
    assert f"--data-revision {hub.sha}" in cli_command(run.reproducing_config())

    hub.commit(REPO, {"README.md": README, "data/train.jsonl": rows(31, "new"), "data/test.jsonl": rows(6, "test")})
    r = cli("train", "--resume", run.path, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = error_lines(r.stderr)
    assert "has changed since the run started" in line and hub.sha[:12] in line and "--data-revision" in line
    assert run.read_status()["state"] == "stopped"


def test_shared_app_downloads_only_allowed_ids_and_reads_folders_only_under_data_root(tmp_path):
    from qlora_ui.studio import Studio

    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    for d in (root / "set", outside):
        d.mkdir(parents=True)
        write_rows(d / "train.jsonl")
    shared = Studio(tmp_path / "runs", allowed_datasets=["timdettmers/*"], data_roots=[root])
    shared.check_data(DataConfig(data_path="hf://timdettmers/openassistant-guanaco"))
    with pytest.raises(DataError, match="not one this app may download.*--allowed-datasets"):
        shared.check_data(DataConfig(data_path="hf://someone/huge-crawl"))
    shared.check_data(DataConfig(data_path=str(root / "set")))
    with pytest.raises(DataError, match="--data-root"):
        shared.check_data(DataConfig(data_path=str(outside)))
    # Shared with no --allowed-datasets (app.py passes []): no id at all; a start is refused before any run folder.
    none = Studio(tmp_path / "runs", allowed_datasets=[])
    with pytest.raises(DataError, match="none on this shared app"):
        none.start(fast_cfg("bundled:SmolLM2-135M-Instruct", "hf://timdettmers/openassistant-guanaco"))
    assert not any((tmp_path / "runs").iterdir())
    Studio(tmp_path / "runs").check_data(DataConfig(data_path="hf://anyone/anything"))  # loopback default: any

    import app

    assert app.parse_args(["--allowed-datasets", "a/*", "--allowed-datasets", "b/c"]).allowed_datasets == ["a/*", "b/c"]


def test_local_dataset_folders_load_and_train(tmp_path, tiny_model_dir, monkeypatch):
    import datasets

    from qlora_ui.data import check_file
    from qlora_ui.jobs import create_job
    from qlora_ui.runs import check_run_dataset

    monkeypatch.setenv("QLORA_DATA_CACHE", str(tmp_path / "qd"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    # A folder of data files with a README naming its splits, as on the Hub.
    files = tmp_path / "files"
    (files / "data").mkdir(parents=True)
    (files / "README.md").write_text(README)
    (files / "data" / "train.jsonl").write_text(rows(12, "train"))
    (files / "data" / "test.jsonl").write_text(rows(4, "test"))
    assert check_file(DataConfig(data_path=str(files), data_split="test")) == "alpaca"
    with pytest.raises(DataError, match="no split 'dev'; its splits are train, test"):
        check_file(DataConfig(data_path=str(files), data_split="dev"))
    # save_to_disk output trains like a file.
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([json.loads(x) for x in rows(24, "saved").splitlines()]),
                          "test": datasets.Dataset.from_list([json.loads(x) for x in rows(3, "held").splitlines()])
                          }).save_to_disk(str(saved))
    cfg = fast_cfg(tiny_model_dir, saved, max_steps=2, max_length=128, runs_dir=str(tmp_path / "runs"))
    # Typed in the Model & Data tab (under --data-root): the split picker lists the folder's own splits.
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import model_data
    from tests.fault_helpers import FORM, form_input

    picked = model_data.dataset_splits(Studio(tmp_path / "app-runs", data_roots=[tmp_path]), FORM,
                                       form_input(cfg) | {FORM.source_box: str(saved)})
    assert picked["choices"] == [("train", "train"), ("test", "test")] or picked["choices"] == ["train", "test"]
    job = create_job(cfg)
    job.run_blocking()
    assert job.run.read_status()["state"] == "finished", job.run.read_status()
    assert job.run.has_adapter()
    record = json.loads((job.run.path / "dataset.json").read_text())
    assert record["kind"] == "folder" and record["rows"] == 24
    check_run_dataset(job.run, cfg.data.data_path)  # unchanged: fine
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"instruction": "x", "output": "y"}] * 24)
                          }).save_to_disk(str(saved))
    with pytest.raises(RunError, match="has changed since the run started"):
        check_run_dataset(job.run, cfg.data.data_path)


def test_the_form_takes_a_hub_id_beside_the_file_box_and_a_shared_app_refuses_it(tmp_path, tiny_model_dir):
    import gradio as gr

    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import model_data
    from tests.fault_helpers import DATA, FORM, ByName, form_input

    vals = form_input(fast_cfg(tiny_model_dir, DATA / "alpaca.json")) | {FORM.source_box: " someone/huge-crawl "}
    cfg = model_data.config_from(FORM, vals)
    assert cfg.data.data_path == "hf://someone/huge-crawl"  # the typed source wins over the file box
    shown = FORM.updates(cfg)
    assert shown[FORM.source_box] == "hf://someone/huge-crawl" and shown[FORM["data_path"]] is None
    # A typed file path would read the server's disk: only Hub ids and folders (confined by the Studio) are taken.
    secret = tmp_path / "secret.csv"
    secret.write_text("instruction,output\nlaunch,codes\n")
    with pytest.raises(gr.Error, match="neither a Hub dataset"):
        model_data.config_from(FORM, vals | {FORM.source_box: str(secret)})
    # Posted to a shared app (no --allowed-datasets): refused in place, before anything is downloaded.
    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir], allowed_datasets=[])
    out = model_data.inspect_data(studio, FORM, ByName(), vals)
    assert out["data_summary"].startswith("**Could not use this file.**")
    assert "someone/huge-crawl" in out["data_summary"] and "allowed" in out["data_summary"]


def test_paper_preset_names_the_seeds_guanaco_dataset():
    from qlora_ui.config import load_preset

    d = load_preset("qlora-paper").data
    assert (d.data_path, d.data_split) == ("hf://timdettmers/openassistant-guanaco", "train")
