"""Train tab: preset, the form generated from the config, memory plan, Start/Stop/Resume, live progress."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from ..config import RunConfig, list_presets
from ..studio import Studio
from .form import component_for

LORA_KEYS = ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_init", "use_dora", "use_rslora"]
MAIN_TRAIN_KEYS = ["max_steps", "epochs", "batch_size", "grad_accum", "learning_rate", "processes"]
ADVANCED_TRAIN_KEYS = ["lr_scheduler", "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm",
                       "gradient_checkpointing", "group_by_length", "seed", "logging_steps", "eval_steps",
                       "save_steps", "save_total_limit", "padding_free", "labelled_head", "mixed_precision",
                       "accelerate_config", "quant_storage"]

POLL_EVERY_S = 3.0  # the Train tab's progress/log/chart refresh (see the timer below for why not faster)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(state: str, step: int, total: int, elapsed: float | None, eta: float | None, run: str,
                  message: str = "", age: float | None = None) -> str:
    pct = 100.0 * step / total if total else 0.0
    colour = {"running": "#2563eb", "finished": "#16a34a", "stopped": "#ca8a04", "failed": "#dc2626",
              "interrupted": "#ea580c"}.get(state, "#6b7280")
    msg = f'<div class="qs-msg">{html.escape(message)}</div>' if message else ""
    # How far behind the trainer this view is: seconds since the newest metrics row was written.
    fresh = f" · data {age:.1f} s old" if age is not None and state == "running" else ""
    return (f'<div class="qs-progress" data-state="{state}" data-step="{step}" data-age="{age or 0:.2f}">'
            f'<div class="qs-progress-head"><b style="color:{colour}">{html.escape(state)}</b> · {html.escape(run)}'
            f' · step <b>{step}/{total or "?"}</b> · elapsed {fmt_seconds(elapsed)} · ETA {fmt_seconds(eta)}'
            f'{fresh}</div>'
            f'<div class="qs-bar"><div style="width:{pct:.1f}%;background:{colour}"></div></div>{msg}</div>')


def global_batch_text(batch_size, grad_accum, processes) -> str:
    """What one optimizer step sees, under the batch settings (processes > 1 multiplies it)."""
    try:
        b, a, n = (max(1, int(v)) for v in (batch_size, grad_accum, processes))
    except (TypeError, ValueError):
        return ""
    how = f" × {n} processes (data parallel, through accelerate)" if n > 1 else ""
    return f"Global batch: **{b * a * n}** examples per optimizer step = batch size {b} × grad accum {a}{how}."


def accelerate_dropdown(initial: RunConfig) -> gr.Dropdown:
    """The shipped recipes by name only: a request must not point accelerate at a file of its choosing."""
    from ..accelerate_configs import list_accelerate_configs
    from .form import label_for

    value = initial.training.accelerate_config
    names = list_accelerate_configs()
    return gr.Dropdown(choices=[("plain data parallel (DDP)", "")] + [(n, n) for n in names],
                       value=value if value in names else "", label=label_for("accelerate_config"),
                       info="Recipe for Processes > 1 (presets/accelerate/; docs/scaling.md).")


def build_train_tab(studio: Studio, initial: RunConfig, preset: str | None) -> dict[str, Any]:
    c: dict[str, Any] = {}

    def comp(key, **kw):
        return component_for(key, value=initial.get(key), **kw)

    with gr.Row():
        presets = list_presets(studio.presets_dir)
        c["preset"] = gr.Dropdown(choices=presets, value=preset,
                                  label="Preset", info="Loads a saved recipe into the form.", scale=2)
        c["name"] = comp("name", scale=2, elem_id="run-name")
        c["preset_name"] = gr.Textbox(label="New preset name", placeholder="my-recipe", scale=1)
        c["save_preset"] = gr.Button("Save as preset", scale=1)
    # The actions and what they do come first: on a phone the settings below stack into a long column, and
    # Start must not be 2,000 px down.
    with gr.Row(elem_id="train-actions"):
        c["start"] = gr.Button("Start training", variant="primary", elem_id="start-btn", min_width=120)
        # Grey until a run is going (the poll turns it on): a bright red Stop with nothing to stop misleads.
        c["stop"] = gr.Button("Stop", variant="secondary", elem_id="stop-btn", interactive=False, min_width=80)
        c["resume_run"] = gr.Dropdown(label="Run to resume", choices=[], scale=2, elem_id="resume-run",
                                      info="Stopped, interrupted or failed runs; finished runs are complete.")
        c["resume"] = gr.Button("Resume", elem_id="resume-btn", min_width=80)
        # Shown beside a run that ran out of memory: resume it from its checkpoint at half the per-device batch
        # and twice the accumulation, so the global batch (and the curve) stays the same.
        c["retry_smaller"] = gr.Button("Retry smaller from the last checkpoint", elem_id="retry-smaller-btn",
                                       visible=False, min_width=120)
    c["resume_info"] = gr.Markdown()
    c["progress"] = gr.HTML(progress_html("idle", 0, 0, None, None, "no run yet"), elem_id="train-progress")
    c["plot"] = gr.Plot(label="Training curves", elem_id="train-plot")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### LoRA")
            with gr.Row():
                for k in LORA_KEYS[:2]:
                    c[k] = comp(k)
            with gr.Row():
                for k in LORA_KEYS[2:4]:
                    c[k] = comp(k)
            with gr.Row():
                for k in LORA_KEYS[4:]:
                    c[k] = comp(k)
            gr.Markdown("### Training")
            with gr.Row():
                for k in MAIN_TRAIN_KEYS[:3]:
                    c[k] = comp(k)
            with gr.Row():
                for k in MAIN_TRAIN_KEYS[3:]:
                    c[k] = comp(k)
            c["global_batch"] = gr.Markdown(global_batch_text(initial.training.batch_size,
                                                              initial.training.grad_accum,
                                                              initial.training.processes),
                                            elem_id="global-batch")
            with gr.Accordion("Advanced", open=False):
                for i in range(0, len(ADVANCED_TRAIN_KEYS), 3):
                    with gr.Row():
                        for k in ADVANCED_TRAIN_KEYS[i:i + 3]:
                            c[k] = comp(k) if k != "accelerate_config" else accelerate_dropdown(initial)
        with gr.Column(scale=2):
            gr.Markdown("### Will it fit?")
            from .memory_panel import build_memory_panel

            c["memory"] = build_memory_panel()
    c["log"] = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="train-log")
    # Every tick costs the page ~0.1-0.2 s of browser CPU, taken from training when both share the cores: with a
    # page watching on 2 cores, steps ran at 0.77x the headless rate at a 1.5 s tick and 0.92x at 3 s
    # (bench/app_overhead.py; 0.90x with no timer at all, so the rest is the open page itself).
    c["timer"] = gr.Timer(POLL_EVERY_S)
    c["seen"] = gr.State(None)  # per session: (run, rows, state) last drawn, to skip unchanged redraws
    return c
