"""--allowed-datasets bounds the lm-eval tasks the Evaluate tab may run, as it bounds training data: a task reading a
Hub dataset outside the patterns is refused, naming the dataset and the flag, before lm-eval loads (downloads) it;
the command line (no patterns) stays unrestricted."""

from __future__ import annotations

import pytest

from tests.fault_helpers import DATA, ByName, make_cfg, wait_for

C = ByName()


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model_dir):
    """A run on the tiny model with a saved adapter: what the tab lists and a request may name."""
    from qlora_ui.modeling import load_for_training
    from qlora_ui.runs import create_run

    runs = tmp_path_factory.mktemp("allowed") / "runs"
    cfg = make_cfg(tiny_model_dir, DATA / "alpaca.json", runs_dir=str(runs), name="allowed", lora_r=4,
                   lora_alpha=8, lora_dropout=0.0)
    run = create_run(cfg)
    loaded = load_for_training(cfg.model, cfg.quantization, cfg.lora, False)
    loaded.model.save_pretrained(run.adapter_dir)
    run.write_status("finished", "made for the allowed-datasets test")
    return run


@pytest.fixture
def loaded_tasks(monkeypatch):
    """The names lm-eval is asked to build (building one downloads its dataset)."""
    from lm_eval.tasks import TaskManager

    asked: list[str] = []
    real = TaskManager.load

    def load(self, task_list, *a, **kw):
        asked.extend(task_list if isinstance(task_list, list) else [task_list])
        return real(self, task_list, *a, **kw)

    monkeypatch.setattr(TaskManager, "load", load)
    return asked


def test_a_shared_app_refuses_tasks_reading_other_datasets_before_loading_them(eval_run, tiny_model_dir,
                                                                                loaded_tasks):
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import benchmarks

    studio = Studio(eval_run.path.parent, model_roots=[tiny_model_dir], allowed_datasets=["timdettmers/*"])
    values = {"run": eval_run.name, "also": [], "examples": [], "upload": None, "names": "arc_easy, mmlu",
              "limit": 1, "fewshot": None, "chat_template": False}
    benchmarks.start_benchmark(studio, C, values)
    # Building lm-eval's task index (about 14,000 YAML files) takes ~10 s alone and minutes on a loaded machine.
    done = wait_for(lambda: (lambda r: r if "timer" in r else None)(
        benchmarks.poll_benchmark(studio, C, eval_run.name)), 600, "the evaluation to end", every=0.5)
    job = studio.benchmarks.get(eval_run.name)
    assert 'data-state="failed"' in done["progress"] and job.state == "failed", job.message
    # One line per task, each naming the dataset it reads, the patterns and the flag that sets them.
    for task, repo in (("arc_easy", "allenai/ai2_arc"), ("mmlu", "cais/mmlu")):
        line = next(ln for ln in job.message.splitlines() if f"'{task}'" in ln)
        assert repo in line and "timdettmers/*" in line and "--allowed-datasets" in line, line
    assert loaded_tasks == []  # refused before lm-eval built (downloaded) anything
    assert not (eval_run.path / "eval").exists()  # nothing written


def test_an_allowed_dataset_and_the_command_line_pass_the_policy(loaded_tasks):
    """A task whose dataset matches a pattern, and any task with no patterns (the CLI's EvalRequest), go on to
    lm-eval; offline its data is missing here, which is the next check's message, not the policy's."""
    from qlora_ui.errors import ConfigError
    from qlora_ui.evaluate.bench_request import EvalRequest, check_lm_eval_tasks

    assert EvalRequest.__dataclass_fields__["allowed_datasets"].default is None  # the CLI builds it without
    for allowed in (["allenai/*"], None):
        loaded_tasks.clear()
        try:
            check_lm_eval_tasks(["arc_easy"], allowed)
        except ConfigError as e:  # offline without the data in the cache (the test machine)
            assert "needs its dataset" in str(e) and "--allowed-datasets" not in str(e), str(e)
        assert loaded_tasks == ["arc_easy"], allowed
