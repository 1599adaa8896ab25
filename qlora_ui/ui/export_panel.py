"""Runs tab, Export section: merged model or GGUF (+ quant type), a progress bar, downloads, the command to run it.

The export runs in a background thread (qlora_ui.export.ExportJob); a timer shows its progress, so the app stays
usable and a page reload finds the export where it is.
"""

from __future__ import annotations

import html
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ..export import GGUF_QUANTS, ExportError, ExportJobs, run_commands, zip_folder
from ..studio import Studio

MERGED, GGUF = "Merged 16-bit model (transformers)", "GGUF (llama.cpp, Ollama, LM Studio)"


def build_export_panel() -> dict[str, Any]:
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
    colour = {"running": "#2563eb", "finished": "#16a34a", "failed": "#dc2626"}.get(state, "#6b7280")
    return (f'<div class="qs-progress" data-state="{state}"><b style="color:{colour}">export {html.escape(state)}'
            f'</b> · {100 * fraction:.0f}%<div class="qs-bar"><div style="width:{100 * fraction:.0f}%;'
            f'background:{colour}"></div></div><div class="qs-msg">{html.escape(message)}</div></div>')


def start_export(studio: Studio, jobs: ExportJobs, run_name: str | None, fmt: str, quant: str) -> tuple:
    from .handlers import to_gr_error, user_errors

    if not run_name:
        raise gr.Error("Pick a run to export.")
    try:
        run = studio.open(run_name)
        jobs.start(run, "gguf" if fmt == GGUF else "merged", quant)
    except (*user_errors(), ExportError) as e:
        raise to_gr_error(e) from None
    return progress_html("running", 0.0, "starting"), gr.Timer(active=True)


def _downloads(studio: Studio, job) -> tuple[list[str], str]:
    res = job.result
    if job.fmt == "merged":
        # One zip per merged export, in the temp folder like the adapter zips (the folder itself cannot download).
        out_dir = Path(tempfile.gettempdir()) / f"qlora-studio-zips-{os.getuid()}"
        out_dir.mkdir(mode=0o700, exist_ok=True)
        target = out_dir / f"{res.path.name}-{int(res.path.stat().st_mtime)}.zip"
        if not target.is_file():
            zip_folder(res.path, target)
        load = f"AutoModelForCausalLM.from_pretrained('{res.path.name}')"
        cmd = (f"# the folder: {studio.shown_path(res.path)}\n"
               f"python -c \"from transformers import AutoModelForCausalLM; {load}\"")
        return [str(target)], cmd
    cmds = run_commands(res.path)
    shown = f"{studio.shown_path(res.path.parent)}/"
    text = (f"# in {shown}\n{cmds['ollama'].split(' && ', 1)[1]}\n"
            f"llama-cli -m {res.path.name} -cnv")
    return [str(res.path), str(res.modelfile)], text


def poll_export(studio: Studio, jobs: ExportJobs, run_name: str | None) -> tuple:
    job = jobs.get(run_name) if run_name else None
    if job is None:
        return "", None, "", gr.Timer(active=False)
    if job.alive:
        return progress_html("running", job.fraction, job.message), gr.skip(), gr.skip(), gr.skip()
    if job.state == "failed":
        return progress_html("failed", job.fraction, job.message), None, "", gr.Timer(active=False)
    files, cmd = _downloads(studio, job)
    msg = f"{job.result.path.name} in {job.result.seconds:.0f} s"
    return progress_html("finished", 1.0, msg), files, cmd, gr.Timer(active=False)


def wire_export_panel(studio: Studio, c: dict[str, Any], run: gr.Dropdown) -> ExportJobs:
    """Connect the panel to the run picker; the returned job list is app-wide (one per app, not per session)."""
    jobs = ExportJobs()
    outs = [c["progress"], c["files"], c["commands"], c["timer"]]
    c["start"].click(partial(start_export, studio, jobs), [run, c["format"], c["quant"]],
                     [c["progress"], c["timer"]], api_name="export_run")
    c["timer"].tick(partial(poll_export, studio, jobs), run, outs, show_progress="hidden", api_name=False)
    # Picking another run shows that run's export, if one is running or done in this app.
    run.change(partial(poll_export, studio, jobs), run, outs, show_progress="hidden", api_name=False)
    c["format"].change(lambda f: gr.update(visible=f == GGUF), c["format"], c["quant"], api_name=False)
    return jobs
