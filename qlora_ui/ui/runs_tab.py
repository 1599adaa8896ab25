"""Runs tab: every run folder as a table, loss curves overlaid, adapter download, the reproducing command."""

from __future__ import annotations

from typing import Any

import gradio as gr

RUN_COLUMNS = ["name", "model", "status", "step", "final_loss", "eval_loss", "created"]


def build_runs_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["refresh"] = gr.Button("↻ Refresh", scale=1)
        c["selected"] = gr.Dropdown(label="Runs to compare", multiselect=True, choices=[], scale=4,
                                    elem_id="runs-selected")
    c["table"] = gr.Dataframe(headers=RUN_COLUMNS, label="Runs", interactive=False, wrap=True, elem_id="runs-table")
    c["overlay"] = gr.Plot(label="Loss curves")
    with gr.Row():
        c["run"] = gr.Dropdown(label="Run", choices=[], scale=3, elem_id="runs-one")
        c["download"] = gr.DownloadButton("Download adapter (.zip)", scale=1, elem_id="download-btn")
        c["resume"] = gr.Button("Resume this run", scale=1)
        c["delete"] = gr.Button("Delete run", variant="stop", scale=1)
    c["details"] = gr.Markdown()
    c["command"] = gr.Code(label="Reproduce with the CLI (from the app's folder)", language="shell",
                           interactive=False, wrap_lines=True)
    return c
