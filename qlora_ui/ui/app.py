"""Builds the Gradio app: the form from the config, one module per tab (its components, handlers and wiring),
and the page-load hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..studio import Studio
from .form import Form
from .tabs import arena, benchmarks, chat, export, model_data, runs, train

CSS = """
.qs-trained { background: #bbf7d0; color: #14532d; border-radius: 3px; }
.qs-masked { background: #e5e7eb; color: #4b5563; border-radius: 3px; }
.qs-example { white-space: pre-wrap; font-size: 13px; line-height: 1.5; padding: 8px; max-height: 300px;
              overflow: auto; }
.qs-legend span { padding: 2px 6px; margin-right: 8px; font-size: 12px; }
.qs-progress { padding: 8px 4px; }
.qs-bar { height: 12px; background: #e5e7eb; border-radius: 6px; overflow: hidden; margin-top: 6px; }
.qs-bar > div { height: 100%; transition: width .5s; }
.qs-pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; max-width: 100%; }
.qs-badge { display: inline-block; padding: 1px 8px; border-radius: 4px; font-weight: 600; font-size: 12px;
            color: #fff; letter-spacing: .03em; }
.qs-ok { background: #16a34a; } .qs-warn { background: #b45309; } .qs-bad { background: #dc2626; }
#runs-table th, #runs-table th * { word-break: normal !important; overflow-wrap: normal !important; }
/* Phones: nothing may be wider than the screen; plot toolbars hide (they covered axis labels). */
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  .qs-pre, .qs-example { font-size: 12px; }
  .modebar-container { display: none !important; }
  #train-actions > * { min-width: 45% !important; }
  /* Five tabs fit a 390 px screen with narrower padding; otherwise Gradio hides Runs and Evaluate in a menu. */
  .tab-container > button { padding: 0 8px !important; }
  .qs-progress-head { font-size: 13px; }
  /* Runs table: only name, status, step and final_loss (columns 1, 3, 4, 5), in fixed shares of the screen.
     Gradio sizes every column to its content inline, so the name alone filled a phone and the rest sat off to
     the right. Model, eval loss and creation time are in the picked run's details. */
  #runs-table th:nth-child(2), #runs-table td:nth-child(2), #runs-table .virtual-row > :nth-child(2),
  #runs-table th:nth-child(n+6), #runs-table td:nth-child(n+6),
  #runs-table .virtual-row > :nth-child(n+6) { display: none !important; }
  #runs-table table { width: 100% !important; table-layout: fixed !important; }
  #runs-table th, #runs-table td { min-width: 0 !important; max-width: none !important; }
  #runs-table th:nth-child(1), #runs-table td:nth-child(1) { width: 35% !important; }
  #runs-table th:nth-child(3), #runs-table td:nth-child(3) { width: 26% !important; }
  #runs-table th:nth-child(4), #runs-table td:nth-child(4) { width: 13% !important; }
  #runs-table th:nth-child(5), #runs-table td:nth-child(5) { width: 26% !important; }
  #runs-table table *, #runs-table .virtual-row * { font-size: 12px !important; }
  #runs-table .cell-wrap { padding-left: 4px !important; padding-right: 4px !important; }
  /* Run names break anywhere (they are long and have few spaces); words like "finished" stay whole. */
  #runs-table td:nth-child(1) *, #runs-table .virtual-row > :nth-child(1) * { overflow-wrap: anywhere !important; }
}
.qs-msg { white-space: pre-wrap; margin-top: 6px; font-size: 13px; }
/* Buttons the page's script presses (the Train tab's curves refresh), not a person. */
.qs-hidden { display: none !important; }
"""

# Runs once per page load (launch(js=...)).
JS = """
() => {
  // Error toasts stay until read (a run's failure must not vanish unseen), but a new action makes them stale:
  // an old "file is empty" beside a healthy new run made that run look failed. The next upload or primary button
  // closes them first; its own errors arrive after.
  const stale = () => document.querySelectorAll('.toast-close').forEach(b => b.click());
  document.addEventListener('click', e => {
    if (e.target.closest('button.primary, button.lg.primary')) stale();
  }, true);
  document.addEventListener('change', e => { if (e.target.matches('input[type=file]')) stale(); }, true);
  document.addEventListener('drop', stale, true);
  // The training log follows its newest line (Gradio's autoscroll left a finished run's log at "loading model"),
  // except while the pointer is on it: someone is reading older lines.
  let last = null;
  setInterval(() => {
    const log = document.querySelector('#train-log textarea');
    if (!log || log.value === last || log.matches(':hover')) return;
    last = log.value;
    log.scrollTop = log.scrollHeight;
  }, 500);
  // The Train tab's progress (train.py): while the tab is shown, the progress line, the log and the chart's new
  // points come from a small JSON route, and the script extends the drawn traces in place (plots.curve_points)
  // every CHART_EVERY_S while rows arrive. The curves and Stop are refreshed by a Gradio event only when the run's
  // state changes or the chart cannot be extended (none drawn yet, another run's). A Gradio event cost the page
  // about 0.2 s of CPU and a whole-figure redraw 0.07 s; extending the traces costs 0.03 s.
  let key = null, state = null, dirty = false, asked = 0, busy = false;
  const chart = () => {
    const gd = document.querySelector('#train-plot .js-plotly-plot');
    const meta = gd && gd.layout && gd.layout.meta;
    return meta && typeof meta.rows === 'number' && window.Plotly ? {gd, meta} : null;
  };
  setInterval(async () => {
    const box = document.querySelector('#train-progress');
    if (busy || document.hidden || !box || box.offsetParent === null) return;
    busy = true;
    try {
      const c = chart();
      const q = c ? '?' + new URLSearchParams({run: c.meta.title, since: c.meta.rows}) : '';
      const r = await fetch('qs/train-progress' + q, {credentials: 'same-origin', cache: 'no-store'});
      if (!r.ok) return;
      const v = await r.json();
      if (!v.key) return;
      const k = JSON.stringify(v.key), now = Date.now();
      const first = key === null, turned = v.key[0] + '/' + v.key[2] !== state;
      if (k !== key) {
        const bar = box.querySelector('.qs-progress');
        if (bar) bar.outerHTML = v.progress;
        const log = document.querySelector('#train-log textarea');
        if (log) log.value = v.log;
        key = k; state = v.key[0] + '/' + v.key[2]; dirty = true;
      }
      if (!dirty || !(first || turned || now - asked >= CHART_MS)) return;
      asked = now;
      const p = v.curves && v.curves.points;
      if (!first && !turned && c && p && p.length === c.gd.data.length) {
        try {
          if (v.curves.rows > c.meta.rows) {
            await window.Plotly.extendTraces(c.gd, {x: p.map(t => t[0]), y: p.map(t => t[1])}, p.map((t, i) => i));
            c.meta.rows = v.curves.rows;
          }
          dirty = false;
          return;
        } catch (e) { /* a chart plotly cannot extend: Gradio redraws it whole, below */ }
      }
      const b = document.querySelector('#train-refresh');
      if (b) { b.click(); dirty = false; }
    } catch (e) { /* the server restarting: the next tick asks again */ } finally { busy = false; }
  }, POLL_MS);
}
""".replace("CHART_MS", str(int(train.CHART_EVERY_S * 1000))).replace("POLL_MS", str(int(train.POLL_EVERY_S * 1000)))


@dataclass
class Page:
    """The built app and its parts (tests call the tabs' handlers with these components)."""

    demo: gr.Blocks
    form: Form
    model_data: dict[str, Any]
    train: dict[str, Any]
    chat: dict[str, Any]
    runs: dict[str, Any]
    export: dict[str, Any]
    benchmarks: dict[str, Any]
    arena: dict[str, Any]


def build_page(studio: Studio, preset: str | None = "cpu-quickstart") -> Page:
    from ..config import RunConfig, list_presets, load_preset

    # The form opens on a preset (the quick start by default), so Start works with no typing at all.
    preset = preset if preset in list_presets(studio.presets_dir) else None
    initial = load_preset(preset, studio.presets_dir) if preset else RunConfig()
    with gr.Blocks(title="QLoRA Studio") as demo:
        gr.Markdown("# QLoRA Studio\nFine-tune a 4-bit base model with LoRA adapters — on this machine.")
        form = Form(initial, widgets={**model_data.form_widgets(studio), **train.form_widgets(studio)})
        with gr.Tabs() as tabs:
            with gr.Tab("Model & Data", id="model-data"):
                md = model_data.build(studio, form)
            with gr.Tab("Train", id="train"):
                tr = train.build(studio, form, preset)
            with gr.Tab("Chat", id="chat") as chat_tab:
                ch = chat.build()
            with gr.Tab("Runs", id="runs"):
                rn = runs.build()
                ex = export.build()
            with gr.Tab("Evaluate", id="evaluate"):
                bm = benchmarks.build()
                ar = arena.build()
        model_data.wire(studio, form, md)
        train.wire(studio, form, tr)
        chat.wire(studio, ch, chat_tab)
        runs.wire(studio, rn, tr)
        export.wire(studio, ex, rn["run"])
        benchmarks.wire(studio, bm)
        arena.wire(studio, ar)

        # On page load (and reload): fill the lists and the memory plan, reattach to a running job.
        runs.page_load(studio, rn, tr, demo)
        train.page_load(studio, form, tr, demo, tabs)
        chat.page_load(studio, ch, demo)
        model_data.page_load(studio, form, md, demo)
        benchmarks.page_load(studio, bm, demo)
        arena.page_load(studio, ar, demo)
    return Page(demo, form, md, tr, ch, rn, ex, bm, ar)


def build_app(studio: Studio, preset: str | None = "cpu-quickstart") -> gr.Blocks:
    return build_page(studio, preset).demo
