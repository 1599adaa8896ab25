"""Faults: kill -9 of the CLI and of the app mid-run, an exception inside training, a full or unwritable disk,
and a crash in the middle of writing the run folder's files. Nothing is lost beyond one checkpoint interval."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from qlora_ui import runs as runs_mod
from qlora_ui.config import RunConfig
from qlora_ui.errors import UserError
from qlora_ui.jobs import create_job
from qlora_ui.runs import RunDir, create_run
from qlora_ui.studio import Studio
from qlora_ui.training import TrainingJob
from qlora_ui.ui.tabs import runs as runs_tab
from qlora_ui.ui.tabs import train as train_tab
from tests.fault_helpers import (
    FORM,
    ROOT,
    ByName,
    cli,
    cli_start,
    fast_cfg,
    form,
    form_input,
    loss_steps,
    run_dirs,
    wait_for,
    write_rows,
)

SAVE_STEPS = 4
MAX_STEPS = 16


def checkpointed_and_past_it(run_parent: Path):
    """The run once it has a checkpoint and has logged at least one step after it (work that a kill loses)."""
    runs = run_dirs(run_parent)
    if not runs:
        return None
    run = RunDir(runs[0])
    ckpt = run.read_status(raw=True).get("last_checkpoint") or 0
    steps = loss_steps(run.path)
    return run if ckpt >= SAVE_STEPS and steps and steps[-1] > ckpt else None


def assert_resumed_cleanly(run: RunDir, killed_at: int, ckpt: int) -> None:
    assert killed_at - ckpt <= SAVE_STEPS  # at most one checkpoint interval of work lost
    assert run.read_status()["state"] == "finished"
    assert loss_steps(run.path) == list(range(1, MAX_STEPS + 1))  # no duplicate, no missing step
    assert run.has_adapter()


@pytest.mark.slow
def test_kill_9_of_the_cli_mid_run_then_resume(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "train.jsonl")
    runs = tmp_path / "runs"
    args = ["train", "--preset", "cpu-quickstart", "--model", tiny_model_dir, "--data", data, "--runs-dir", runs,
            "--max-steps", MAX_STEPS, "--save-steps", SAVE_STEPS, "--batch-size", 2, "--lora-r", 4,
            "--eval-fraction", 0.1, "--eval-steps", SAVE_STEPS, "--optimizer", "adamw_torch",
            "--gradient-checkpointing", "false", "--warmup-ratio", 0, "--name", "killed", "--quiet"]
    proc = cli_start(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = wait_for(lambda: checkpointed_and_past_it(runs), 120, "a checkpoint and a step after it", 0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    killed_at = loss_steps(run.path)[-1]
    ckpt = RunDir.checkpoint_step(run.last_checkpoint())
    assert run.read_status()["state"] == "interrupted"
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 99, "lo')  # as if the kill landed mid-append: a torn last line
    assert loss_steps(run.path)[-1] == killed_at

    listed = cli("runs", "--runs-dir", runs, timeout=60)
    assert run.name in listed.stdout and "interrupted" in listed.stdout

    out = cli("train", "--resume", run.path, "--quiet", timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert_resumed_cleanly(run, killed_at, ckpt)
    evals = [r["step"] for r in run.read_metrics() if "eval_loss" in r]
    assert evals == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))  # eval rows not duplicated either


@pytest.mark.slow
def test_kill_9_of_the_app_mid_run_restart_and_resume_through_the_api(tiny_model_dir, tmp_path):
    from gradio_client import Client, handle_file

    from tests.fault_helpers import start_app

    upload = write_rows(tmp_path / "upload.jsonl")
    proc, url = start_app(tmp_path, tiny_model_dir)
    runs = tmp_path / "runs"
    try:
        vals = form(fast_cfg(tmp_path / "models" / "tiny", upload, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                             name="app-killed"), data_path=handle_file(str(upload)))
        Client(url, verbose=False).predict(*vals, api_name="/start_training")
        run = wait_for(lambda: checkpointed_and_past_it(runs), 120, "a checkpoint and a step after it", 0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs, status.json still says running
        proc.wait(30)
    killed_at = loss_steps(run.path)[-1]
    ckpt = RunDir.checkpoint_step(run.last_checkpoint())

    # The upload lives in the run folder, not only in Gradio's temp dir.
    kept = Path(run.config().data.data_path)
    assert kept.parent == run.data_dir and kept.read_bytes() == upload.read_bytes()

    proc, url = start_app(tmp_path, tiny_model_dir)
    try:
        client = Client(url, verbose=False)
        table, *_, resumable = client.predict(api_name="/list_runs")
        assert [r[0] for r in table["data"]] == [run.name]
        assert table["data"][0][2] == "interrupted"
        choices = [c[0] if isinstance(c, (list, tuple)) else c for c in resumable["choices"]]
        assert choices == [run.name]  # the Train tab's "Run to resume" offers it
        details = client.predict(run.name, api_name="/run_details")[0]
        assert "interrupted" in details
        client.predict(run.name, api_name="/resume_training")
        wait_for(lambda: RunDir(run.path).read_status()["state"] == "finished", 120, "the resumed run to finish")
        assert_resumed_cleanly(RunDir(run.path), killed_at, ckpt)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def low_disk(monkeypatch, free_mb: int = 50) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(runs_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=free_mb * 2**20))


def test_disk_full_is_refused_before_a_run_folder_exists(tiny_model_dir, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "train.jsonl")
    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir])
    low_disk(monkeypatch)
    with pytest.raises(gr.Error) as e:
        train_tab.start_training(studio, FORM, form_input(fast_cfg(tiny_model_dir, data)))
    msg = str(e.value.message)
    # Refused by whichever check meets the full disk first: the prepared-data cache (a data file not cached yet)
    # or the run folder's (data already cached by an earlier test). Both name what is free and the fix.
    assert re.search(r"[MG]B free", msg) and "Free some space" in msg
    assert run_dirs(studio.runs_dir) == [] and not studio.busy()
    with pytest.raises(UserError, match=r"[MG]B free"):
        create_job(fast_cfg(tiny_model_dir, data, runs_dir=str(tmp_path / "cli-runs")))
    assert run_dirs(tmp_path / "cli-runs") == []


def test_disk_full_on_the_cli_exits_2_before_a_run_folder_exists(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "train.jsonl")
    runs = tmp_path / "runs"
    code = ("import shutil, sys; real = shutil.disk_usage; "
            "shutil.disk_usage = lambda p: real(p)._replace(free=10 * 2**20); "
            "from qlora_ui.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "train", "--model", str(tiny_model_dir), "--data", str(data),
                          "--runs-dir", str(runs)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and re.search(r"[MG]B free", out.stderr) and "Traceback" not in out.stderr, out.stderr
    assert run_dirs(runs) == []


def test_unwritable_runs_dir_is_refused_in_the_ui(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "train.jsonl")
    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir])
    shutil.rmtree(studio.runs_dir)
    studio.runs_dir.write_text("a file where the runs folder should be")  # works as root too, unlike chmod
    with pytest.raises(gr.Error, match="not writable"):
        train_tab.start_training(studio, FORM, form_input(fast_cfg(tiny_model_dir, data)))
    assert not studio.busy()


def test_exception_in_training_shows_failed_with_a_hint_in_the_ui(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from transformers import TrainerCallback

    import qlora_ui.jobs as jobs_mod

    class OOM(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == SAVE_STEPS + 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = write_rows(tmp_path / "train.jsonl")
    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir])
    monkeypatch.setattr(jobs_mod, "TrainingJob", functools.partial(TrainingJob, extra_callbacks=[OOM()]))
    train_tab.start_training(studio, FORM, form_input(fast_cfg(tiny_model_dir, data, max_steps=8,
                                                               save_steps=SAVE_STEPS)))
    assert studio.job.wait(120) == "failed"
    monkeypatch.undo()
    run = studio.job.run

    prog = train_tab.poll_training(studio, ByName(), None)["progress"]  # what the Train tab shows
    assert 'data-state="failed"' in prog and "out of memory" in prog.lower()
    assert "batch_size" in prog and "gradient_checkpointing" in prog  # the hint
    shown = runs_tab.runs_table(studio, ByName(), "resume_run")  # the Runs tab
    table, resumable = shown["table"], shown["resume_run"]
    assert list(table["status"]) == ["failed"] and resumable["choices"] == [run.name]
    details = runs_tab.run_details(studio, ByName(), run.name)["details"]
    assert "failed" in details and "out of memory" in details.lower()
    assert run.last_checkpoint().name == f"checkpoint-{SAVE_STEPS}"  # the last checkpoint is kept
    assert f"checkpoint-{SAVE_STEPS}" in train_tab.resume_info(studio, run.name)

    # The UI stays usable: resume from the kept checkpoint and finish.
    train_tab.resume_training(studio, run.name)
    assert studio.job.wait(120) == "finished", studio.job.error_message
    assert loss_steps(run.path) == list(range(1, 9))


def test_a_crash_mid_write_leaves_status_and_metrics_readable(tmp_path, monkeypatch):
    run = create_run(RunConfig().updated(runs_dir=str(tmp_path / "runs"), name="atomic"))
    run.write_status("running", "training", step=3)
    for step in (1, 2, 3):  # a metrics file with rows the truncation would drop, so "stays whole" is observable
        run.append_metrics({"step": step, "loss": 2.0 / step})
    metrics_before = run.metrics_path.read_bytes()

    def crash(*a, **k):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(runs_mod.os, "replace", crash)
    with pytest.raises(OSError):
        run.truncate_metrics(1)
    with pytest.raises(OSError):
        run.write_status("finished", "done", step=4)
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == metrics_before  # all three rows: the previous file, whole
    st = json.loads(run.status_path.read_text())  # still the whole previous status, never half a file
    assert st["state"] == "running" and st["step"] == 3

    run.metrics_path.unlink()
    run.append_metrics({"step": 1, "loss": 2.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 2, "lo')  # torn last line
    assert [r["step"] for r in run.read_metrics()] == [1]
    run.truncate_metrics(1)  # what a resume does: the torn line goes, the good rows stay
    assert run.metrics_path.read_text() == json.dumps({"step": 1, "loss": 2.0}) + "\n"


def test_a_reused_pid_does_not_make_a_dead_run_look_alive(tmp_path):
    run = create_run(RunConfig().updated(runs_dir=str(tmp_path / "runs"), name="pid"))
    run.write_status("running", "training")
    assert run.read_status()["state"] == "running"  # this process is alive
    st = json.loads(run.status_path.read_text())
    st["pid_started"] = 1.0  # same pid, different process start time: the pid was reused
    run.status_path.write_text(json.dumps(st))
    assert run.read_status()["state"] == "interrupted"
