"""Runs of several processes through accelerate (DDP over gloo on this CPU), followed from the run folder.

Each launch starts 2 Python processes that load torch, transformers and a tiny model: ~8-10 s per run here.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from qlora_ui.launch import failure_from_log, launch_command
from qlora_ui.resume_rules import resumable_runs
from qlora_ui.runs import RunDir
from qlora_ui.studio import Studio
from qlora_ui.training import TrainingJob
from qlora_ui.ui.tabs import train as train_tab
from tests.fault_helpers import (
    FORM,
    ROOT,
    ByName,
    cli,
    cli_start,
    fast_cfg,
    form_input,
    run_dirs,
    terminal_signals,
    wait_for,
    write_rows,
)

pytestmark = pytest.mark.slow

# Same data order in both layouts (no length grouping), no dropout: the only difference is who computes what.
COMMON = ["--eval-fraction", "0", "--lora-dropout", "0", "--group-by-length", "false", "--optimizer", "adamw_torch",
          "--gradient-checkpointing", "false", "--warmup-ratio", "0", "--lora-r", "4", "--lora-alpha", "8",
          "--quiet"]


def train(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return cli("train", *args, timeout=timeout, env=env)


# Loaded by every Python process of a run (the CLI, accelerate's launcher, each rank) through PYTHONPATH: logs
# which loss function each rank's step called, and on what model object. The loss value cannot tell: the DDP
# branch's kept_logits_loss and a fall-back to the model's full-logits loss give the same number.
LOSS_SPY = """
import os, sys
sys.path.insert(1, os.environ["QLORA_SPY_ROOT"])
import qlora_ui.batching as b

def spy(name, real):
    def call(model, *a, **kw):
        with open(os.environ["QLORA_SPY"], "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {name} {type(model).__name__}\\n")
        return real(model, *a, **kw)
    return call

b.labelled_loss = spy("labelled_loss", b.labelled_loss)
b.kept_logits_loss = spy("kept_logits_loss", b.kept_logits_loss)
"""


def spied_env(tmp: Path) -> tuple[dict, Path]:
    (tmp / "spy").mkdir()
    (tmp / "spy" / "sitecustomize.py").write_text(LOSS_SPY)
    log = tmp / "spy" / "calls.txt"
    return {**os.environ, "PYTHONPATH": str(tmp / "spy"), "QLORA_SPY": str(log), "QLORA_SPY_ROOT": str(ROOT)}, log


def start(*args) -> subprocess.Popen:
    # Its own session so that a signal reaches only this CLI (the launcher has its own session too).
    return cli_start("train", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     start_new_session=True, preexec_fn=terminal_signals)


def start_long_run(model: Path, data: Path, runs: Path, save_steps: int) -> subprocess.Popen:
    """A 2-process CLI run long enough to be stopped or killed midway."""
    return start("--base-model", model, "--data", data, "--runs-dir", runs, "--processes", 2, "--batch-size", 2,
                 "--max-steps", 2000, "--save-steps", save_steps, *COMMON)


def metrics(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()


def loss_rows(run: Path) -> list[dict]:
    return [r for r in metrics(run) if r.get("loss") is not None]


def ranks_of(run: Path) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "qlora_ui.launch" in cmd and str(run) in cmd and "accelerate.commands.launch" not in cmd:
            procs.append(p)
    return procs


@pytest.fixture
def data(tmp_path) -> Path:
    return write_rows(tmp_path / "train.jsonl", 40)


def test_two_processes_match_one_process_step_by_step(tiny_model_dir, data, tmp_path):
    base = ["--base-model", tiny_model_dir, "--data", data, "--max-steps", 4, *COMMON]
    env, calls = spied_env(tmp_path)
    two = train(*base, "--runs-dir", tmp_path / "two", "--processes", 2, "--batch-size", 2, env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    # Each rank's 4 steps ran the labelled-positions loss through the DDP wrapper (it syncs the gradients).
    assert sorted(calls.read_text().splitlines() if calls.exists() else []) == sorted(
        f"{rank} kept_logits_loss DistributedDataParallel" for rank in (0, 1) for _ in range(4))
    assert "global batch 4 = batch_size 2 x grad_accum 1 x 2 processes" in two.stderr
    one = train(*base, "--runs-dir", tmp_path / "one", "--batch-size", 4)
    assert one.returncode == 0, one.stderr
    half = train(*base, "--runs-dir", tmp_path / "half", "--batch-size", 2)
    assert half.returncode == 0, half.stderr

    [run2] = run_dirs(tmp_path / "two")  # one run folder for the two processes
    [run1], [run_half] = run_dirs(tmp_path / "one"), run_dirs(tmp_path / "half")
    r2, r1, rh = loss_rows(run2), loss_rows(run1), loss_rows(run_half)
    assert [r["step"] for r in r2] == [1, 2, 3, 4]
    assert {r["world_size"] for r in r2} == {2} and {r["world_size"] for r in r1} == {1}
    # 2 processes x batch 2 = 1 process x batch 4, step by step: gradients are averaged over every labelled
    # token of the global batch, so the losses agree to float rounding (1e-3 relative).
    for a, b in zip(r2, r1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2), (a, b)
    # Each step covers twice the rows of 1 process x batch 2.
    for a, b in zip(r2, rh):
        assert a["epoch"] == pytest.approx(2 * b["epoch"], rel=1e-6)
    # Rank 0 alone wrote the folder: one metrics row per step, one train.log, no stray rank files.
    assert len(metrics(run2)) == 4
    st = json.loads((run2 / "status.json").read_text())
    assert st["state"] == "finished" and st["world_size"] == 2
    assert not (run2 / "stop.request").exists()

    # The adapter loads on the 4-bit base and is not the untrained one.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert not (run2 / "adapter" / "training_args.bin").exists()
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base_model, run2 / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_stop_from_the_command_line_reaches_every_rank_and_resume_continues_on_one(tiny_model_dir, data, tmp_path):
    runs = tmp_path / "runs"
    proc = start_long_run(tiny_model_dir, data, runs, save_steps=1000)
    try:
        run = wait_for(lambda: run_dirs(runs) and run_dirs(runs)[0], 60, "the run folder")
        wait_for(lambda: len(loss_rows(run)) >= 3, 120, "3 steps")
        assert len(ranks_of(run)) == 2
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stop cleanly at the next step
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "stopped" in out
    wait_for(lambda: not ranks_of(run), 30, "both ranks to end")
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "stopped", st
    step = st["step"]
    assert (run / "checkpoints" / f"checkpoint-{step}").is_dir()  # saved at the stop point
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    # Resume the 2-process run with 1 process: the steps go on with no gap and no repeat.
    res = train("--resume", run, "--processes", 1, "--max-steps", step + 3, "--quiet")
    assert res.returncode == 0, res.stderr
    rows = loss_rows(run)
    assert [r["step"] for r in rows] == list(range(1, step + 4))
    assert {r["world_size"] for r in rows[:step]} == {2} and {r["world_size"] for r in rows[step:]} == {1}
    assert "processes: 1" in (run / "config.yaml").read_text()


def test_killing_one_rank_marks_the_run_failed_and_it_resumes(tiny_model_dir, data, tmp_path):
    runs = tmp_path / "runs"
    proc = start_long_run(tiny_model_dir, data, runs, save_steps=2)
    try:
        run = wait_for(lambda: run_dirs(runs) and run_dirs(runs)[0], 60, "the run folder")
        wait_for(lambda: RunDir(run).last_checkpoint() is not None and len(loss_rows(run)) >= 3, 120,
                 "a checkpoint")
        rank1 = next(p for p in ranks_of(run) if p.environ().get("RANK") == "1")
        os.kill(rank1.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    wait_for(lambda: not ranks_of(run), 30, "rank 0 to be ended too")
    st = RunDir(run).read_status()
    assert st["state"] == "failed", st  # not "running" forever
    assert "process 1" in st["message"] and "SIGKILL" in st["message"], st["message"]
    ckpt = RunDir(run).last_checkpoint()
    assert ckpt is not None

    # Offered for Resume in the UI, and resumable (here with 1 process) from its checkpoint.
    studio = Studio(runs, model_roots=[tiny_model_dir])
    assert run.name in resumable_runs(studio)
    done = RunDir.checkpoint_step(ckpt)
    res = train("--resume", run, "--processes", 1, "--max-steps", done + 2, "--quiet")
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in loss_rows(run)] == list(range(1, done + 3))


def test_the_ui_starts_follows_and_stops_a_two_process_run(tiny_model_dir, data, tmp_path):
    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir])
    cfg = fast_cfg(tiny_model_dir, data, processes=2, max_steps=2000, save_steps=1000)
    train_tab.start_training(studio, FORM, form_input(cfg))
    job = studio.job
    assert studio.busy()
    wait_for(lambda: len(job.metrics) >= 3, 120, "the followed run's metrics")
    shown = train_tab.poll_training(studio, ByName(), None)  # what the Train tab draws
    prog, fig, stop = shown["progress"], shown["plot"], shown["stop"]
    assert 'data-state="running"' in prog and fig is not None and stop["interactive"]
    assert job.metrics[-1]["world_size"] == 2
    with pytest.raises(Exception, match="already in progress"):
        train_tab.start_training(studio, FORM, form_input(cfg))  # still one run at a time

    train_tab.stop_training(studio)
    assert job.wait(120) == "stopped", job.error_message
    assert not ranks_of(job.run.path)
    assert job.run.has_adapter() and job.run.last_checkpoint() is not None
    prog = train_tab.poll_training(studio, ByName(), None)["progress"]
    assert 'data-state="stopped"' in prog


def test_out_of_memory_offers_retry_smaller_from_the_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    import torch
    from transformers import TrainerCallback

    import qlora_ui.jobs as jobs_mod

    class OOM(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3 and args.per_device_train_batch_size == 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir])
    monkeypatch.setattr(jobs_mod, "TrainingJob", functools.partial(TrainingJob, extra_callbacks=[OOM()]))
    train_tab.start_training(studio, FORM, form_input(fast_cfg(tiny_model_dir, data, batch_size=4, grad_accum=1,
                                                        max_steps=6, save_steps=2)))
    assert studio.job.wait(120) == "failed"
    run = studio.job.run
    assert train_tab.retry_button(studio, run.name)["visible"] is True
    assert train_tab.retry_button(studio, None)["visible"] is False

    train_tab.retry_smaller(studio, run.name)  # the button beside the OOM message
    assert studio.job.wait(120) == "finished", studio.job.error_message
    tr = run.config().training
    assert (tr.batch_size, tr.grad_accum) == (2, 2)  # same global batch, half the memory per step
    assert [r["step"] for r in loss_rows(run.path)] == list(range(1, 7))


def test_failure_report_names_the_rank_that_died():
    torchrun = """
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_00:38:23
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 25411)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 25411
"""
    assert failure_from_log(torchrun) == (1, "process 1 ended by signal 9 (SIGKILL)")
    ours = "QLORA_RANK_ERROR rank 1: OutOfMemoryError: CUDA out of memory\n" + torchrun.replace("-9", "1")
    assert failure_from_log(ours) == (1, "OutOfMemoryError: CUDA out of memory")
    assert failure_from_log("nothing here") == (None, "")


def test_launch_command_uses_ddp_or_the_named_recipe(tmp_path):
    cmd = launch_command(tmp_path, 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-1] == str(tmp_path)
    cmd = launch_command(tmp_path, 4, "fsdp-qlora", resume=True)
    assert cmd[cmd.index("--config_file") + 1].endswith("presets/accelerate/fsdp-qlora.yaml")
    assert cmd[-1] == "--resume" and "--multi_gpu" not in cmd


def test_a_request_cannot_name_an_accelerate_file_of_its_own(tiny_model_dir, data, tmp_path):
    import gradio as gr

    studio = Studio(tmp_path / "runs", model_roots=[tiny_model_dir])
    evil = tmp_path / "mine.yaml"
    evil.write_text("distributed_type: MULTI_GPU\n")
    cfg = fast_cfg(tiny_model_dir, data, processes=2, accelerate_config=str(evil))
    with pytest.raises(gr.Error, match="pick one of"):
        train_tab.start_training(studio, FORM, form_input(cfg))
    assert not studio.busy() and not run_dirs(tmp_path / "runs")


def test_an_app_started_later_follows_and_stops_a_running_multi_process_run(tiny_model_dir, data, tmp_path):
    runs = tmp_path / "runs"
    proc = start_long_run(tiny_model_dir, data, runs, save_steps=1000)
    try:
        run = wait_for(lambda: run_dirs(runs) and run_dirs(runs)[0], 60, "the run folder")
        wait_for(lambda: len(loss_rows(run)) >= 2, 120, "2 steps")
        studio = Studio(runs, model_roots=[tiny_model_dir])  # e.g. the app restarted on the same folder
        assert studio.busy() and studio.job.run.path == run
        wait_for(lambda: len(studio.job.metrics) >= 2, 30, "the attached job to read the curve")
        assert 'data-state="running"' in train_tab.poll_training(studio, ByName(), None)["progress"]
        train_tab.stop_training(studio)  # Stop works for a run this app did not launch
        assert studio.job.wait(120) == "stopped", studio.job.error_message
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert RunDir(run).read_status()["state"] == "stopped" and RunDir(run).has_adapter()


def test_a_stopped_two_process_dpo_run_resumes_on_the_same_curve(tiny_model_dir, tmp_path):
    """DPO through accelerate (2 ranks, DDP over gloo): stopped midway from the run folder (Stop), resumed with 2
    processes again, it continues an uninterrupted 2-process run's curve step by step (issue 27)."""
    from qlora_ui.jobs import create_job, resume_job
    from tests.test_preference import dpo_cfg, separable_pairs, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs())
    runs = tmp_path / "runs"
    # No length grouping: both runs see the rows in the same order whatever the process count.
    kw = dict(processes=2, batch_size=2, max_steps=6, save_steps=3, group_by_length=False, lora_dropout=0.0)
    full = create_job(dpo_cfg(tiny_model_dir, pairs, runs, name="full", **kw))
    assert full.run_blocking() == "finished", full.error_message

    holder = {}

    def stop_at_3(event, row):
        if event == "metrics" and row.get("step") == 3:
            holder["job"].stop()  # the stop request file: every rank stops at its next step boundary

    part = create_job(dpo_cfg(tiny_model_dir, pairs, runs, name="part", **kw), listener=stop_at_3)
    holder["job"] = part
    assert part.run_blocking() == "stopped", part.error_message
    stopped = part.run.read_status()["step"]
    assert 3 <= stopped < 6 and (part.run.path / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    resumed = resume_job(part.run)
    assert resumed.cfg.training.processes == 2
    assert resumed.run_blocking() == "finished", resumed.error_message

    rows = loss_rows(part.run.path)
    assert [r["step"] for r in rows] == list(range(1, 7))  # no step twice, none missing
    assert {r["world_size"] for r in rows} == {2}
    ref = {r["step"]: r for r in loss_rows(full.run.path)}
    assert sorted(ref) == list(range(1, 7))
    for r in rows:  # the resumed half continues the uninterrupted run's curve, rewards included
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=0.05, abs=0.02), r["step"]
        assert r["reward_margin"] == pytest.approx(ref[r["step"]]["reward_margin"], rel=0.05, abs=0.02), r["step"]
    assert RunDir(part.run.path).has_adapter() and not (part.run.adapter_dir / "ref").exists()
