"""Runs tab, Export section: merged model or GGUF (+ quant type), a progress bar, downloads, the command to run it.

The export runs in a background thread (qlora_ui.export.ExportJob); a timer shows its progress, so the app stays
usable and a page reload finds the export where it is.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from ...export import GGUF_QUANTS, ExportJobs, run_commands, served_download
from ...studio import Studio
from ..feedback import USER_ERRORS, progress_bar, state_colour, user_error

MERGED, GGUF = "Merged 16-bit model (transformers)", "GGUF (llama.cpp, Ollama, LM Studio)"


def build() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("### Export\nUse the trained model outside this app: a standalone 16-bit model folder, or a GGUF "
                "file for llama.cpp / Ollama with its Modelfile.")
    with gr.Row():
        c["format"] = gr.Radio([MERGED, GGUF], value=GGUF, label="Format", scale=3, elem_id="export-format")
        c["quant"] = gr.Dropdown(list(GGUF_QUANTS), value="q8_0", label="GGUF type", scale=1, elem_id="export-quant",
                                 info="f16: exact, largest · q8_0: near-exact · q4_k_m: smallest")
        c["start"] = gr.Button("Export", variant="primary", scale=1, elem_id="export-btn")
    c["progress"] = gr.HTML(elem_id="export-progress")
    c["files"] = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="export-files")
    c["commands"] = gr.Code(label="Run it elsewhere", language="shell", interactive=False, elem_id="export-cmd")
    c["timer"] = gr.Timer(1.0, active=False)
    return c


def progress_html(state: str, fraction: float, message: str) -> str:
    head = f'<b style="color:{state_colour(state)}">export {html.escape(state)}</b> · {100 * fraction:.0f}%'
    return progress_bar(state, fraction, head, message)


def start_export(studio: Studio, jobs: ExportJobs, c: dict, run_name: str | None, fmt: str, quant: str) -> dict:
    if not run_name:
        raise gr.Error("Pick a run to export.")
    try:
        run = studio.open(run_name)
        jobs.start(run, "gguf" if fmt == GGUF else "merged", quant)
    except USER_ERRORS as e:
        raise user_error(e) from None
    return {c["progress"]: progress_html("running", 0.0, "starting"), c["timer"]: gr.Timer(active=True)}


def _downloads(studio: Studio, job) -> tuple[list[str], str]:
    res = job.result
    # Served from the temp folder, one version per export (hard links: no second copy of the model).
    key = f"{job.run.name}-{res.path.name}"
    if job.fmt == "merged":
        (target,) = served_download([res.path], key)  # the folder itself cannot download: a zip
        where = studio.shown_path(res.path)  # relative to the app's folder, runnable from there
        load = f"AutoModelForCausalLM.from_pretrained('{res.path.name if where.startswith('...') else where}')"
        cmd = (f"# the folder: {studio.shown_path(res.path)}\n"
               f"python -c \"from transformers import AutoModelForCausalLM; {load}\"")
        return [str(target)], cmd
    cmds = run_commands(res.path)
    shown = f"{studio.shown_path(res.path.parent)}/"
    text = (f"# in {shown}\n{cmds['ollama'].split(' && ', 1)[1]}\n"
            f"llama-cli -m {res.path.name} -cnv")
    return [str(p) for p in served_download([res.path, res.modelfile], key)], text


def poll_export(studio: Studio, jobs: ExportJobs, c: dict, run_name: str | None) -> dict:
    job = jobs.get(run_name) if run_name else None
    stopped = gr.Timer(active=False)
    if job is None:
        return {c["progress"]: "", c["files"]: None, c["commands"]: "", c["timer"]: stopped}
    if job.alive:
        return {c["progress"]: progress_html("running", job.fraction, job.message)}
    if job.state == "failed":
        return {c["progress"]: progress_html("failed", job.fraction, job.message), c["files"]: None,
                c["commands"]: "", c["timer"]: stopped}
    files, cmd = _downloads(studio, job)
    msg = f"{job.result.path.name} in {job.result.seconds:.0f} s"
    return {c["progress"]: progress_html("finished", 1.0, msg), c["files"]: files, c["commands"]: cmd,
            c["timer"]: stopped}


def wire(studio: Studio, c: dict, run: gr.Dropdown) -> ExportJobs:
    """Connect the panel to the Runs tab's run picker; the returned job list is app-wide (one per app, not per
    session)."""
    jobs = ExportJobs()
    outs = [c["progress"], c["files"], c["commands"], c["timer"]]
    c["start"].click(lambda r, f, q: start_export(studio, jobs, c, r, f, q), [run, c["format"], c["quant"]],
                     [c["progress"], c["timer"]], api_name="export_run")
    poll = dict(fn=lambda r: poll_export(studio, jobs, c, r), inputs=run, outputs=outs, show_progress="hidden",
                api_name=False)
    c["timer"].tick(**poll)
    # Picking another run shows that run's export, if one is running or done in this app.
    run.change(**poll)
    c["format"].change(lambda f: gr.update(visible=f == GGUF), c["format"], c["quant"], api_name=False)
    return jobs
