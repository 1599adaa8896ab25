"""`python -m qlora_ui ...` end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.fault_helpers import ROOT, cli


def write_csv(path: Path, n: int = 24) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        for i in range(n):
            w.writerow([f"What is {i} plus one?", f"It is {i + 1}."])
    return path


def test_train_runs_lists_and_resumes(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "mine.csv")
    runs = tmp_path / "runs"
    out = cli("train", "--preset", "cpu-quickstart", "--data", data, "--model", tiny_model_dir, "--max-steps", 3,
              "--lora-r", 4, "--save-steps", 2, "--runs-dir", runs, "--name", "cli", "--batch-size", 2)
    assert out.returncode == 0, out.stderr
    run = next(runs.iterdir())
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "lora_r: 4" in (run / "config.yaml").read_text()
    listed = cli("runs", "--runs-dir", runs)
    assert run.name in listed.stdout and "finished" in listed.stdout

    # A finished run has nothing to resume: refused, its adapter untouched.
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    refused = cli("train", "--resume", run)
    assert refused.returncode == 2 and "nothing to resume" in refused.stderr and "--max-steps" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # Continuing it is explicit: --max-steps 5 trains steps 4 and 5 from checkpoint-3's state.
    again = cli("train", "--resume", run, "--max-steps", 5)
    assert again.returncode == 0, again.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5]
    assert "max_steps: 5" in (run / "config.yaml").read_text()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != adapter


def test_bad_settings_exit_2_with_every_problem_and_no_traceback(tmp_path):
    data = write_csv(tmp_path / "d.csv")
    out = cli("train", "--data", data, "--lora-r", 0, "--learning-rate", -1, "--lora-alpha", 0,
              "--runs-dir", tmp_path / "r")
    assert out.returncode == 2
    assert "lora_r" in out.stderr and "learning_rate" in out.stderr and "lora_alpha" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_and_missing_data_are_clear(tmp_path):
    data = write_csv(tmp_path / "d.csv")
    out = cli("train", "--data", data, "--model", tmp_path / "nope", "--runs-dir", tmp_path / "r")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = cli("train", "--runs-dir", tmp_path / "r")
    assert out.returncode == 2 and "--data" in out.stderr


def test_pickle_only_and_remote_code_folders_are_refused(tmp_path, tiny_model_dir):
    import json
    import shutil

    pick = tmp_path / "pickle-only"
    pick.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pick / "config.json")
    (pick / "pytorch_model.bin").write_bytes(b"not really")
    data = write_csv(tmp_path / "d.csv")
    out = cli("train", "--data", data, "--model", pick, "--runs-dir", tmp_path / "r")
    assert out.returncode == 2 and "pickle" in out.stderr and "allow_pickle" in out.stderr

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    conf = json.loads((remote / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (remote / "config.json").write_text(json.dumps(conf))
    out = cli("train", "--data", data, "--model", remote, "--runs-dir", tmp_path / "r")
    assert out.returncode == 2 and "trust_remote_code" in out.stderr


def test_unwritable_runs_dir_fails_before_training(tmp_path):
    data = write_csv(tmp_path / "d.csv")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = cli("train", "--data", data, "--runs-dir", blocker / "runs")
    assert out.returncode == 2 and "not writable" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random_bytes.jsonl", "missing_columns.csv", "all_empty.jsonl"])
def test_a_bad_file_exits_2_from_check_data_and_train_with_the_same_message(name, tiny_model_dir, tmp_path):
    """What docs/reliability.md says of every bad file: `check-data` and `train` print the message and exit 2
    (train before any run folder exists), with no traceback."""
    bad = ROOT / "tests" / "data" / "bad" / name
    checked = cli("check-data", bad)
    trained = cli("train", "--data", bad, "--model", tiny_model_dir, "--runs-dir", tmp_path / "runs")
    assert checked.returncode == 2 and trained.returncode == 2, (checked.stderr, trained.stderr)
    first = checked.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert first and first in trained.stderr, (checked.stderr, trained.stderr)
    assert "Traceback" not in checked.stderr + trained.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_lora_options_from_the_command_line(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "mine.csv")
    runs = tmp_path / "runs"
    out = cli("train", "--preset", "cpu-quickstart", "--data", data, "--model", tiny_model_dir, "--max-steps", 2,
              "--lora-r", 4, "--runs-dir", runs, "--name", "opts", "--batch-size", 2, "--lora-init", "loftq",
              "--use-rslora", "true")
    assert out.returncode == 0, out.stderr
    run = next(runs.iterdir())
    cfg = (run / "config.yaml").read_text()
    assert "lora_init: loftq" in cfg and "use_rslora: true" in cfg and "use_dora: false" in cfg
    assert "LoftQ: 14 layers initialised" in (run / "train.log").read_text()
    both = cli("train", "--preset", "cpu-quickstart", "--data", data, "--model", tiny_model_dir, "--runs-dir", runs,
               "--lora-init", "loftq", "--use-dora", "true")
    assert both.returncode == 2 and "do not combine" in both.stderr and "Traceback" not in both.stderr
