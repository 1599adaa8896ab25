"""Benchmarks through lm-evaluation-harness on a tiny random Llama: the shipped example task with the adapter on vs
off, the result file, a broken task file refused with its lines (CLI exit 2, nothing written), the tab's handlers."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from qlora_ui.config import PRESETS_DIR
from tests.fault_helpers import DATA, ByName, cli, make_cfg, nudge_adapter, wait_for

EXAMPLE = PRESETS_DIR / "data" / "eval" / "pirate-style.jsonl"
C = ByName()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_model_dir):
    """A finished-looking run on the tiny model whose adapter is far from its no-op start (lora_B nudged), so the
    adapter must change every log-likelihood."""
    from qlora_ui.modeling import load_for_training
    from qlora_ui.runs import create_run

    runs = tmp_path_factory.mktemp("bench") / "runs"
    cfg = make_cfg(tiny_model_dir, DATA / "alpaca.json", runs_dir=str(runs), name="pirate", lora_r=4, lora_alpha=8,
                   lora_dropout=0.0)
    run = create_run(cfg)
    loaded = load_for_training(cfg.model, cfg.quantization, cfg.lora, False)
    nudge_adapter(loaded.model, seed=0, scale=0.5)
    loaded.model.save_pretrained(run.adapter_dir)
    run.write_status("finished", "made for the benchmark tests")
    return run


def lls(record: dict, label: str) -> list[list[float]]:
    model = next(m for m in record["models"] if m["label"] == label)
    return [row["lls"] for row in model["samples"]["pirate-style.jsonl"]]


def plain_base_lls(run, limit: int) -> tuple[list[list[float]], dict]:
    """The same task on the base loaded with no adapter at all, straight through lm-eval."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qlora_ui.evaluate.local_tasks import read_task_file, task_config
    from qlora_ui.modeling import load_base_model, load_tokenizer

    cfg = run.config()
    path = cfg.model.base_model
    model = load_base_model(path, cfg.model, cfg.quantization)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(path, cfg.model), batch_size=16, softmax_dtype="float32")
    res = simple_evaluate(lm,
                          tasks=[task_config(read_task_file(EXAMPLE))], limit=limit,
                          task_manager=TaskManager(include_defaults=False), log_samples=True)
    rows = res["samples"]["pirate-style.jsonl"]
    return [[round(float(r[0]), 4) for r in s["filtered_resps"]] for s in rows], res["results"]["pirate-style.jsonl"]


def test_cli_scores_the_example_with_the_adapter_on_and_off(bench_run):
    # Plain prompts, to compare with lm-eval's own run of the base below (the chat template is the default).
    out = cli("eval", "--run", bench_run.path, "--tasks", EXAMPLE, "--limit", 4, "--no-chat-template")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Δ vs base" in out.stdout and "pirate-style.jsonl" in out.stdout and bench_run.name in out.stdout
    files = sorted((bench_run.path / "eval").glob("*.json"))
    assert len(files) == 1 and f"results: {files[0]}" in out.stderr
    record = json.loads(files[0].read_text())

    assert record["run"] == bench_run.name and record["limit"] == 4 and record["num_fewshot"] is None
    assert record["tasks"] == [{"name": "pirate-style.jsonl", "source": "file", "path": str(EXAMPLE.resolve()),
                                "kind": "choice", "rows": 30, "sha256": record["tasks"][0]["sha256"]}]
    assert [(m["label"], m["role"]) for m in record["models"]] == [("base", "base"), (bench_run.name, "adapter")]
    for m in record["models"]:
        metrics = m["metrics"]["pirate-style.jsonl"]
        assert set(metrics) == {"acc", "acc_norm", "brier_score"}
        assert 0.0 <= metrics["acc"]["value"] <= 1.0 and metrics["acc"]["stderr"] is not None
        assert m["quantization"]["load_in_4bit"] and m["quantization"]["quant_type"] == "nf4"
    assert {(d["model"], d["metric"]) for d in record["difference"]} == {
        (bench_run.name, k) for k in ("acc", "acc_norm", "brier_score")}
    assert all(d["delta"] == pytest.approx(d["value"] - d["base_value"]) for d in record["difference"])
    assert record["versions"]["lm_eval"] != "?" and record["timing"]["seconds"] > 0

    # Adapter on vs off: every row's choices scored, and the adapter moved the scores.
    base, adapter = lls(record, "base"), lls(record, bench_run.name)
    assert len(base) == 4 and all(len(r) == 3 for r in base + adapter)
    assert max(abs(a - b) for ra, rb in zip(adapter, base) for a, b in zip(ra, rb)) > 1e-2
    # Adapter off is the base: the same scores as the base loaded with no adapter at all.
    plain, plain_metrics = plain_base_lls(bench_run, 4)
    assert [x for r in base for x in r] == pytest.approx([x for r in plain for x in r], abs=2e-3)
    assert record["models"][0]["metrics"]["pirate-style.jsonl"]["acc"]["value"] == plain_metrics["acc,none"]


def test_a_broken_task_file_is_refused_with_its_lines_and_nothing_written(bench_run, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"question": "Q?", "choices": ["a", "b"], "answer": 0}\n'
                   '{"question": "Q2?", "choices": ["a", "b"], "answer": 5}\n'
                   'not json\n')
    before = sorted((bench_run.path / "eval").glob("*")) if (bench_run.path / "eval").is_dir() else []
    out = cli("eval", "--run", bench_run.path, "--tasks", bad, "--limit", 2)
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip()
    assert err.startswith("error: mine.jsonl") and "Traceback" not in err and len(err.splitlines()) == 1
    assert "line 2: 'answer' is 5" in err and "(0 to 1) or its letter (A, B)" in err
    assert "line 3: not valid JSON" in err
    after = sorted((bench_run.path / "eval").glob("*")) if (bench_run.path / "eval").is_dir() else []
    assert after == before


@pytest.mark.parametrize("text, says", [
    ('{"prompt": "2+2?", "reference": "4"}\n{"question": "Q", "choices": ["a", "b"], "answer": "B"}\n',
     "line 2: a multiple-choice row in a file whose line 1 is prompt/reference"),
    ('{"question": "Q", "choices": ["only one"], "answer": 0}\n', "line 1: 'choices' must be a list of at least two"),
    ('{"q": "Q"}\n', "line 1: no 'question'/'choices'/'answer'"),
    ('\n\n', "has no rows"),
])
def test_task_file_problems_name_the_line_and_the_fix(tmp_path, text, says):
    from qlora_ui.errors import DataError
    from qlora_ui.evaluate.local_tasks import read_task_file

    f = tmp_path / "t.jsonl"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        read_task_file(f)
    assert says in str(e.value)


def test_letters_and_prompt_reference_rows_are_read(tmp_path):
    from qlora_ui.evaluate.local_tasks import read_task_file, score_generation

    f = tmp_path / "t.jsonl"
    f.write_text('{"question": "Q", "choices": ["a", "b", "c"], "answer": "c"}\n')
    assert read_task_file(f).rows[0]["answer"] == 2
    f.write_text('{"prompt": "Capital of France?", "reference": "Paris is the capital."}\n')
    t = read_task_file(f)
    assert t.kind == "generate" and t.metrics == ("exact_match", "rougeL")
    got = score_generation(t.rows[0], ["Paris  is the capital."])
    assert got["exact_match"] == 1.0 and got["rougeL"] == pytest.approx(1.0)
    assert score_generation(t.rows[0], ["Lyon."])["exact_match"] == 0.0


def test_the_tab_starts_a_job_and_shows_the_table(bench_run, tiny_model_dir, tmp_path):
    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import benchmarks

    studio = Studio(bench_run.path.parent, model_roots=[tiny_model_dir])
    assert benchmarks.eval_runs(studio)["run"]["value"] == bench_run.name
    values = {"run": bench_run.name, "also": [], "examples": [benchmarks.EXAMPLE], "upload": None, "names": "",
              "limit": 2, "fewshot": None, "chat_template": False}

    # Refused at the click, with the message: a typed path, a broken upload.
    with pytest.raises(gr.Error, match="looks like a file path"):
        benchmarks.start_benchmark(studio, C, values | {"names": "/etc/passwd.jsonl"})
    broken = tmp_path / "up.jsonl"
    broken.write_text('{"question": "Q", "choices": ["a", "b"]}\n')
    with pytest.raises(gr.Error, match="line 1: 'answer'"):
        benchmarks.start_benchmark(studio, C, values | {"upload": [str(broken)]})
    assert studio.benchmarks.running() is None

    started = benchmarks.start_benchmark(studio, C, values)
    assert 'data-state="running"' in started["progress"] and started["timer"].active
    with pytest.raises(gr.Error, match="is running .* one evaluation at a time"):
        benchmarks.start_benchmark(studio, C, values)
    done = wait_for(lambda: (lambda r: r if "timer" in r else None)(  # the timer stops when the job has ended
        benchmarks.poll_benchmark(studio, C, bench_run.name)), 240, "the evaluation to finish", every=0.5)
    assert 'data-state="finished"' in done["progress"], studio.benchmarks.get(bench_run.name).message
    rows = done["table"]
    assert {r[0] for r in rows} == {"base", bench_run.name} and {r[2] for r in rows} >= {"acc", "acc_norm"}
    assert all(r[5] == "-" for r in rows if r[0] == "base") and all(r[5] != "-" for r in rows if r[0] != "base")
    saved = Path(studio.benchmarks.get(bench_run.name).path).name
    assert saved in done["past"]["choices"] and done["past"]["value"] == saved
    shown = benchmarks.show_result(studio, C, bench_run.name, saved)
    assert shown["table"] == rows


def test_the_chat_template_is_on_by_default_on_the_command_line_as_in_the_tab():
    from qlora_ui.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["eval", "--run", "r", "--tasks", "t"]).chat_template is True
    assert parse(["eval", "--run", "r", "--tasks", "t", "--no-chat-template"]).chat_template is False

