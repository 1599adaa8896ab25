"""Evaluate tab, benchmarks section: a run's adapter on vs off through lm-evaluation-harness, in the background.

Pick a run (and other runs to compare), tasks (the shipped example, your own JSONL, lm-eval task names), rows per
task and few-shot examples; Start runs qlora_ui.evaluate.bench_job in a thread whose progress a timer shows. The
result table (base vs adapter, stderr, difference) comes from the run's eval/<timestamp>.json, like every past
result listed below it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from ...config import PRESETS_DIR
from ...evaluate.bench_request import EvalRequest, split_tasks
from ...evaluate.bench_results import HEADERS, list_results, read_result, table_lines
from ...evaluate.local_tasks import looks_like_file
from ...studio import Studio
from ..feedback import USER_ERRORS, progress_bar, state_colour, user_error

EXAMPLE_DIR = PRESETS_DIR / "data" / "eval"
EXAMPLE = "pirate-style.jsonl"
START_INPUTS = ("run", "also", "examples", "upload", "names", "limit", "fewshot", "chat_template")


def example_tasks() -> list[str]:
    return sorted(p.name for p in EXAMPLE_DIR.glob("*.jsonl")) if EXAMPLE_DIR.is_dir() else []


def build() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("### Benchmarks\nScore the run's own 4-bit base with its adapter **off** and **on** through "
                "[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness): did the fine-tune "
                "get better, and did it break anything? Results are kept in the run's `eval/` folder.")
    with gr.Row():
        c["run"] = gr.Dropdown(label="Run", choices=[], scale=2, elem_id="bench-run",
                               info="Its adapter is scored on and off, on the base as the run quantized it.")
        c["also"] = gr.Dropdown(label="Compare with other runs", choices=[], multiselect=True, scale=2,
                                elem_id="bench-also", info="Their adapters are scored on the same tasks.")
        c["refresh"] = gr.Button("↻ Refresh runs", scale=1)
    with gr.Row():
        examples = example_tasks()
        c["examples"] = gr.CheckboxGroup(examples, value=[EXAMPLE] if EXAMPLE in examples else [],
                                         label="Example tasks", elem_id="bench-examples", scale=2,
                                         info="pirate-style: which of three replies answers in the pirate voice.")
        c["upload"] = gr.File(label="Your own tasks (JSONL)", file_types=[".jsonl"], file_count="multiple",
                              elem_id="bench-upload", scale=2)
    c["names"] = gr.Textbox(label="lm-eval tasks", placeholder="e.g. mmlu, arc_easy, hellaswag", elem_id="bench-names",
                            info="Names of lm-evaluation-harness tasks whose data is in this machine's Hugging Face "
                                 "cache (offline); comma-separated.")
    with gr.Row():
        # 0 is "every row": Gradio shows an empty number box as 0, which a minimum of 1 painted as an error.
        c["limit"] = gr.Number(label="Rows per task", value=0, precision=0, minimum=0, elem_id="bench-limit",
                               info="0: every row. A few dozen give a quick first look.")
        c["fewshot"] = gr.Number(label="Few-shot examples", value=None, precision=0, minimum=0,
                                 elem_id="bench-fewshot", info="Empty: the task's default (MMLU: 5 in the paper).")
        # On by default: a run learns its replies inside the chat template, so that is where the example task
        # shows what it learned (pirate-style: acc 0.83 with it, 0.00 without, on the bundled model).
        c["chat_template"] = gr.Checkbox(label="Use the chat template", value=True, elem_id="bench-chat",
                                         info="Prompts as a chat, as the run was trained (lm-eval's "
                                              "apply_chat_template). Off: plain 'Question: … Answer:' text, as "
                                              "published lm-eval numbers are usually made.")
    with gr.Row():
        c["start"] = gr.Button("Start evaluation", variant="primary", elem_id="bench-start")
        c["stop"] = gr.Button("Stop", elem_id="bench-stop")
    c["progress"] = gr.HTML(elem_id="bench-progress")
    c["table"] = gr.Dataframe(headers=list(HEADERS), value=[], interactive=False, label="Result",
                              elem_id="bench-table", wrap=True)
    c["saved"] = gr.Markdown(elem_id="bench-saved")
    c["past"] = gr.Dropdown(label="Past results of this run", choices=[], elem_id="bench-past",
                            info="Pick one to show its table.")
    c["timer"] = gr.Timer(1.0, active=False)
    return c


# ---- handlers (dict in, dict out) ----

def progress_html(state: str, fraction: float, message: str) -> str:
    head = f'<b style="color:{state_colour(state)}">evaluation {html.escape(state)}</b> · {100 * fraction:.0f}%'
    return progress_bar(state, fraction, head, message)


def eval_runs(studio: Studio, current: str | None = None) -> dict[str, Any]:
    """Runs with an adapter (newest first); the current pick stays when it still exists."""
    names = [r.name for r in studio.runs() if r.has_adapter()]
    value = current if current in names else (names[0] if names else None)
    return {"run": gr.update(choices=names, value=value), "also": gr.update(choices=names)}


def _task_list(values: dict[str, Any]) -> list[str]:
    tasks = [str(EXAMPLE_DIR / n) for n in values.get("examples") or [] if n in example_tasks()]
    uploads = values.get("upload") or []
    for f in uploads if isinstance(uploads, list) else [uploads]:
        tasks.append(str(getattr(f, "name", f)))
    names = split_tasks(values.get("names") or "")
    typed_files = [n for n in names if looks_like_file(n)]
    if typed_files:
        # A typed path would read any file on the server (the app may be shared): files come as uploads.
        raise gr.Error(f"'{html.escape(typed_files[0])}' looks like a file path. Upload your own task file with "
                       "'Your own tasks (JSONL)'; the box takes lm-eval task names only.", title="Cannot do that")
    return tasks + names


def start_benchmark(studio: Studio, c: dict, values: dict) -> dict:
    v = {k: values.get(c[k]) for k in START_INPUTS}
    if not v["run"]:
        raise gr.Error("Pick a run with an adapter (train one first in the Train tab).", title="Cannot do that")
    tasks = _task_list(v)
    try:
        run = studio.open(v["run"])
        also = [studio.open(n) for n in v["also"] or [] if n != run.name]
        for r in [run, *also]:
            studio.check_model(r.config().model)
        limit = int(v["limit"] or 0) or None  # 0 or empty: every row
        # The app's --allowed-datasets bounds the lm-eval tasks a visitor may name, as it bounds training data.
        studio.benchmarks.start(EvalRequest(run, tasks, limit=limit, num_fewshot=v["fewshot"], also=also,
                                            chat_template=bool(v["chat_template"]),
                                            allowed_datasets=studio.allowed_datasets))
    except USER_ERRORS as e:
        raise user_error(e) from None
    return {c["progress"]: progress_html("running", 0.0, "starting"), c["timer"]: gr.Timer(active=True),
            c["table"]: [], c["saved"]: ""}


def stop_benchmark(studio: Studio, c: dict) -> dict:
    job = studio.benchmarks.running()
    if job is None:
        return {c["saved"]: "No evaluation is running."}
    job.stop()
    return {c["progress"]: progress_html("running", job.fraction, "stopping at the next request")}


def _shown(studio: Studio, path: Path) -> str:
    return f"Saved as `{studio.shown_path(path)}`"


def past_results(studio: Studio, run_name: str | None, value: str | None = None) -> Any:
    try:
        names = [p.name for p in list_results(studio.open(run_name))] if run_name else []
    except USER_ERRORS:
        names = []
    return gr.update(choices=names, value=value if value in names else None)


def show_result(studio: Studio, c: dict, run_name: str | None, file: str | None) -> dict:
    if not run_name or not file:
        return {c["table"]: [], c["saved"]: ""}
    try:
        run = studio.open(run_name)
        path = run.path / "eval" / Path(file).name  # a name from the list, never a path
        record = read_result(path)
    except USER_ERRORS as e:
        raise user_error(e) from None
    return {c["table"]: table_lines(record), c["saved"]: _shown(studio, path)}


def poll_benchmark(studio: Studio, c: dict, run_name: str | None) -> dict:
    """The running (or last) evaluation of the picked run; the timer stops when it has ended."""
    job = studio.benchmarks.running() or studio.benchmarks.get(run_name)
    stopped = gr.Timer(active=False)
    if job is None:
        return {c["progress"]: "", c["timer"]: stopped}
    if job.alive:
        return {c["progress"]: progress_html("running", job.fraction, f"{job.run.name}: {job.message}")}
    if job.state != "finished":
        return {c["progress"]: progress_html(job.state, job.fraction, job.message), c["timer"]: stopped}
    secs = job.record["timing"]["seconds"]
    return {c["progress"]: progress_html("finished", 1.0, f"{job.run.name}: done in {secs:.0f} s"),
            c["table"]: table_lines(job.record), c["saved"]: _shown(studio, job.path),
            c["past"]: past_results(studio, job.run.name, job.path.name), c["timer"]: stopped}


def wire(studio: Studio, c: dict[str, Any]) -> None:
    def runs_update(current):
        u = eval_runs(studio, current)
        return {c["run"]: u["run"], c["also"]: u["also"]}

    c["refresh"].click(runs_update, c["run"], [c["run"], c["also"]], api_name=False)
    c["start"].click(lambda values: start_benchmark(studio, c, values), {c[k] for k in START_INPUTS},
                     [c["progress"], c["timer"], c["table"], c["saved"]], api_name="start_benchmark")
    c["stop"].click(lambda: stop_benchmark(studio, c), None, [c["progress"], c["saved"]], api_name=False)
    outs = [c["progress"], c["table"], c["saved"], c["past"], c["timer"]]
    c["timer"].tick(lambda r: poll_benchmark(studio, c, r), c["run"], outs, show_progress="hidden", api_name=False)
    c["run"].change(lambda r: past_results(studio, r), c["run"], c["past"], api_name=False)
    c["past"].change(lambda r, f: show_result(studio, c, r, f), [c["run"], c["past"]], [c["table"], c["saved"]],
                     api_name=False)


def page_load(studio: Studio, c: dict[str, Any], demo: gr.Blocks) -> None:
    def on_load():
        u = eval_runs(studio)
        out = {c["run"]: u["run"], c["also"]: u["also"]}
        if studio.benchmarks.running() is not None:  # a reload finds the evaluation where it is
            out[c["timer"]] = gr.Timer(active=True)
        return out

    demo.load(on_load, None, [c["run"], c["also"], c["timer"]], api_name=False)
