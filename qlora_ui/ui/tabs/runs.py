"""Runs tab: every run folder as a table, loss curves overlaid, adapter download, the reproducing command.
The Export section below it is its own module (tabs/export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ...errors import StudioBusy
from ...resume_rules import resumable_runs
from ...studio import Studio
from ..feedback import USER_ERRORS, md_text, user_error

# In this order since the first release: scripts read list_runs' rows by position. A phone shows name, status,
# step and final_loss only (ui/app.py's CSS hides the others).
RUN_COLUMNS = ["name", "model", "status", "step", "final_loss", "eval_loss", "created"]
COMPARE_PRESELECT = 4  # newest runs drawn together on page load


def build() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["refresh"] = gr.Button("↻ Refresh", scale=1)
        c["selected"] = gr.Dropdown(label="Runs to compare", multiselect=True, choices=[], scale=4,
                                    elem_id="runs-selected")
    c["empty"] = gr.Markdown("No runs yet. Start one in the **Train** tab (the quick start needs no typing); each run "
                             "appears here with its loss curve, its adapter and the command that reproduces it.",
                             visible=False, elem_id="runs-empty")
    c["table"] = gr.Dataframe(headers=RUN_COLUMNS, label="Runs", interactive=False, wrap=True, elem_id="runs-table")
    c["overlay"] = gr.Plot(label="Loss curves")
    with gr.Row():
        # Custom values: a script (gradio_client) may name a run without listing runs first; the handlers
        # confine the name to the runs folder themselves (studio.open).
        c["run"] = gr.Dropdown(label="Run", choices=[], scale=3, elem_id="runs-one", allow_custom_value=True)
        c["download"] = gr.DownloadButton("Download adapter (.zip)", scale=1, elem_id="download-btn")
        c["resume"] = gr.Button("Resume this run", scale=1)
        c["delete"] = gr.Button("Delete run", variant="stop", scale=1, elem_id="delete-btn")
    # One click used to remove a run folder (adapter, checkpoints, exports): a second, named confirmation.
    with gr.Row(visible=False, elem_id="delete-confirm") as c["confirm_row"]:
        c["confirm_text"] = gr.Markdown()
        c["confirm_yes"] = gr.Button("Yes, delete it", variant="stop", scale=0, elem_id="delete-yes")
        c["confirm_no"] = gr.Button("Cancel", scale=0, elem_id="delete-no")
    c["details"] = gr.Markdown(elem_id="run-details")
    c["command"] = gr.Code(label="Reproduce with the CLI (from the app's folder)", language="shell",
                           interactive=False, wrap_lines=True)
    return c


def runs_table(studio: Studio, c: dict, resume_run: gr.Dropdown, preselect: bool = False) -> dict:
    """The Runs table and the run pickers fed from it (the Train tab's `resume_run` too). With `preselect` (page
    load), the newest run is picked in the Runs tab (its curve shows at once) and the newest interrupted run is
    offered for Resume."""
    import pandas as pd

    rows, runs = [], studio.runs()
    for r in runs:
        s = r.summary()
        s["step"] = f"{s['step']}/{s['max_steps'] or '?'}"
        s["model"] = Path(str(s["model"])).name if str(s["model"]).startswith("/") else s["model"]
        for k in ("final_loss", "eval_loss"):
            s[k] = None if s[k] is None else round(s[k], 4)
        rows.append({k: s[k] for k in RUN_COLUMNS})
    names = [r["name"] for r in rows]
    out = {c["table"]: pd.DataFrame(rows, columns=RUN_COLUMNS), c["empty"]: gr.update(visible=not rows)}
    resumable = resumable_runs(studio)
    if not preselect:
        return out | {c["selected"]: gr.update(choices=names), c["run"]: gr.update(choices=names),
                      resume_run: gr.update(choices=resumable)}
    by_age = sorted(runs, key=lambda r: r.path.stat().st_mtime, reverse=True)
    newest = by_age[0] if by_age else None
    interrupted = [r for r in by_age if r.state == "interrupted" and r.name in resumable]
    # Several runs to compare: the newest alone (often a short try) drew a single dot.
    return out | {c["selected"]: gr.update(choices=names, value=[r.name for r in by_age[:COMPARE_PRESELECT]]),
                  c["run"]: gr.update(choices=names, value=newest.name if newest else None),
                  resume_run: gr.update(choices=resumable, value=interrupted[0].name if interrupted else None)}


def overlay(studio: Studio, selected: list[str] | None) -> Any:
    from ...plots import overlay_figure

    if not selected:
        return None
    data = {}
    for name in selected:
        try:
            data[name] = studio.open(name).read_metrics()
        except USER_ERRORS:
            continue
    return overlay_figure(data)


def run_details(studio: Studio, c: dict, run_name: str | None) -> dict:
    if not run_name:
        return {c["details"]: "", c["command"]: "", c["download"]: gr.update(value=None)}
    from ...config import cli_command

    try:
        run = studio.open(run_name)
        cfg = run.reproducing_config()  # a Hub dataset pinned to the commit the run read: the same rows later
    except USER_ERRORS as e:
        raise user_error(e) from None
    s = run.summary()
    # Model, eval loss and creation time too: a phone's Runs table shows only name, status, step and final loss.
    ev = "-" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
    details = (f"**{md_text(run.name)}** · {md_text(s['status'])} · step {s['step']} · {md_text(s['message'])}  \n"
               f"Model: {md_text(s['model'])} · eval loss {ev} · created {s['created']}  \n"
               f"Folder: {md_text(studio.shown_path(run.path))} · adapter: {'yes' if s['adapter'] else 'not yet'}")
    zip_path = str(run.adapter_zip()) if run.has_adapter() else None
    # Runnable as written from the app's folder: the venv's python, paths relative to it, wrapped.
    command = cli_command(cfg, python=".venv/bin/python", relative_to=Path.cwd(), width=100)
    return {c["details"]: details, c["command"]: command, c["download"]: gr.update(value=zip_path)}


def download_hint(studio: Studio, run_name: str | None) -> None:
    """The download button does nothing without a file; say why instead."""
    if not run_name:
        gr.Warning("Pick a run first (the Run list beside this button): its adapter is what gets downloaded.")
        return
    try:
        run = studio.open(run_name)
    except USER_ERRORS:
        return
    if not run.has_adapter():
        gr.Warning(f"{run.name} has no adapter yet: it is saved when the run finishes or is stopped.")


def ask_delete(studio: Studio, c: dict, run_name: str | None) -> dict:
    """The first click: name what goes, or say at once why it cannot (a run in training)."""
    if not run_name:
        raise gr.Error("Pick a run (the Run list beside this button).")
    try:
        run = studio.open(run_name)
        if studio.in_use(run) or run.state == "running":
            raise StudioBusy(f"{run.name} is training right now; stop it before deleting it.")
    except USER_ERRORS as e:
        raise user_error(e) from None
    exports = " and its exports" if (run.path / "export").exists() else ""
    return {c["confirm_row"]: gr.update(visible=True),
            c["confirm_text"]: f"Delete **{md_text(run.name)}**: its adapter, checkpoints{exports} and logs? "
                               "This cannot be undone."}


def delete_run(studio: Studio, run_name: str | None) -> None:
    if not run_name:
        raise gr.Error("Pick a run.")
    try:
        studio.delete(run_name)
    except USER_ERRORS as e:
        raise user_error(e) from None
    gr.Info(f"Deleted {run_name}")


def wire(studio: Studio, c: dict, train: dict) -> None:
    """`train` is the Train tab: its Resume list is fed from the table, and this tab's Resume reports there."""
    from .train import resume_training

    table = dict(fn=lambda: runs_table(studio, c, train["resume_run"]), inputs=None,
                 outputs=[c["table"], c["empty"], c["selected"], c["run"], train["resume_run"]])
    c["refresh"].click(**table, api_name="list_runs")
    c["selected"].change(lambda sel: overlay(studio, sel), c["selected"], c["overlay"], api_name=False)
    c["run"].change(lambda r: run_details(studio, c, r), c["run"], [c["details"], c["command"], c["download"]],
                    api_name="run_details")
    c["resume"].click(lambda r: resume_training(studio, r), c["run"], train["progress"], api_name=False)
    c["download"].click(lambda r: download_hint(studio, r), c["run"], None, api_name=False)
    c["delete"].click(lambda r: ask_delete(studio, c, r), c["run"], [c["confirm_row"], c["confirm_text"]],
                      api_name=False)
    hide = dict(fn=lambda: gr.update(visible=False), inputs=None, outputs=c["confirm_row"], api_name=False)
    c["confirm_no"].click(**hide)
    # The deleted run's details and command leave the screen with it (the Run list is emptied).
    c["confirm_yes"].click(lambda r: delete_run(studio, r), c["run"], None, api_name="delete_run").success(
        **hide).then(**table, api_name=False).then(lambda: gr.update(value=None), None, c["run"], api_name=False)


def page_load(studio: Studio, c: dict, train: dict, demo: gr.Blocks) -> None:
    demo.load(lambda: runs_table(studio, c, train["resume_run"], preselect=True), None,
              [c["table"], c["empty"], c["selected"], c["run"], train["resume_run"]], api_name=False)
