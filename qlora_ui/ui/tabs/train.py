"""Train tab: preset, the form's LoRA and training fields, memory plan, Start/Stop/Resume, live progress."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ...config import ConfigError
from ...resume_rules import ran_out_of_memory, smaller_batch
from ...runs import RunDir
from ...studio import Studio
from ..feedback import USER_ERRORS, error_text, md_text, progress_bar, state_colour, user_error
from ..form import Form, label_for
from ..memory_panel import build_memory_panel, update_memory_panel

LORA_ROWS = [["lora_r", "lora_alpha"], ["lora_dropout", "target_modules"], ["lora_init", "use_dora", "use_rslora"]]
MAIN_ROWS = [["method", "beta"], ["max_steps", "epochs", "batch_size"],
             ["grad_accum", "learning_rate", "processes"]]
ADVANCED = ["lr_scheduler", "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm", "gradient_checkpointing",
            "group_by_length", "seed", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
            "padding_free", "labelled_head", "mixed_precision", "fused_lora", "checkpoint_cache_mb",
            "accelerate_config", "quant_storage"]
# Settings that change the memory plan.
MEMORY_KEYS = ["base_model", "lora_r", "batch_size", "processes", "max_length", "optimizer", "gradient_checkpointing",
               "quant_type", "double_quant", "load_in_4bit", "compute_dtype", "accelerate_config", "quant_storage",
               "method"]
BATCH_KEYS = ["batch_size", "grad_accum", "processes"]

POLL_EVERY_S = 3.0  # how often the page's script reads the progress line and the log (JS in ui/app.py)
# While a run trains, the charts take new points at most this often: on a 2-core machine the browser re-rendering
# four plotly charts every tick took CPU from the training itself (steps ran at 0.66x the headless rate with one
# page watching; bench/app_overhead.py).
CHART_EVERY_S = 10.0


def form_widgets(studio: Studio) -> dict[str, Any]:
    """The fields this tab shows with a widget of its own."""
    from ...accelerate_configs import list_accelerate_configs

    def accelerate(value: str = "", **kw) -> gr.Dropdown:
        # The shipped recipes by name only: a request must not point accelerate at a file of its choosing.
        names = list_accelerate_configs()
        return gr.Dropdown(choices=[("plain data parallel (DDP)", "")] + [(n, n) for n in names],
                           value=value if value in names else "", label=label_for("accelerate_config"),
                           info="Recipe for Processes > 1 (presets/accelerate/; docs/scaling.md).", **kw)

    return {"accelerate_config": accelerate, "name": dict(scale=2, elem_id="run-name")}


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(state: str, step: int, total: int, elapsed: float | None, eta: float | None, run: str,
                  message: str = "", age: float | None = None, loss: float | None = None) -> str:
    # How far behind the trainer this view is: seconds since the newest metrics row was written.
    fresh = f" · data {age:.1f} s old" if age is not None and state == "running" else ""
    # The newest loss moves with every step here; the curves are redrawn less often (CHART_EVERY_S).
    shown = f" · loss <b>{loss:.4g}</b>" if isinstance(loss, (int, float)) else ""
    head = (f'<div class="qs-progress-head"><b style="color:{state_colour(state)}">{html.escape(state)}</b> · '
            f'{html.escape(run)} · step <b>{step}/{total or "?"}</b>{shown} · elapsed {fmt_seconds(elapsed)} · '
            f'ETA {fmt_seconds(eta)}{fresh}</div>')
    return progress_bar(state, step / total if total else 0.0, head, message,
                        f' data-step="{step}" data-age="{age or 0:.2f}"')


def global_batch_text(batch_size, grad_accum, processes) -> str:
    """What one optimizer step sees, under the batch settings (processes > 1 multiplies it)."""
    try:
        b, a, n = (max(1, int(v)) for v in (batch_size, grad_accum, processes))
    except (TypeError, ValueError):
        return ""
    how = f" × {n} processes (data parallel, through accelerate)" if n > 1 else ""
    return f"Global batch: **{b * a * n}** examples per optimizer step = batch size {b} × grad accum {a}{how}."


# ---- presets ----

def preset_owner(request: gr.Request | None) -> str | None:
    """Whose saved presets a request sees: the signed-in user's behind a login (nobody else lists, loads or
    replaces them), the one shared folder without a login (one person's app)."""
    return getattr(request, "username", None) or None


def apply_preset(studio: Studio, form: Form, name: str | None, owner: str | None = None) -> dict:
    from ...config import load_preset

    if not name:
        return gr.skip()
    try:
        cfg = load_preset(name, studio.presets_dir, owner)
    except USER_ERRORS as e:
        raise user_error(e) from None
    return form.updates(cfg, keep_file=True)  # the user's uploaded dataset stays when the preset names none


def save_as_preset(studio: Studio, form: Form, name: str | None, values: dict, owner: str | None = None) -> Any:
    from ...config import list_presets, save_preset

    try:
        path = save_preset(form.to_config(values), (name or "").strip(), studio.presets_dir, owner)
    except USER_ERRORS as e:
        raise user_error(e) from None
    gr.Info(f"Saved preset {path.stem}")
    return gr.update(choices=list_presets(studio.presets_dir, owner), value=path.stem)


def preset_choices(studio: Studio, owner: str | None) -> Any:
    """On page load: the bundled presets and the ones this user saved (the page is built once, for everyone,
    before anyone signs in)."""
    from ...config import list_presets

    return gr.update(choices=list_presets(studio.presets_dir, owner))


# ---- training ----

def start_training(studio: Studio, form: Form, values: dict) -> str:
    try:
        cfg = form.to_config(values).validate(need_data=True)
        job = studio.start(cfg)  # checks the model against what the operator allowed first
    except USER_ERRORS as e:
        raise user_error(e) from None
    if cfg.model.trust_remote_code:
        gr.Warning("trust_remote_code is on: the model folder's own Python code will run. Only for models you trust.")
    gr.Info(f"Started {job.run.name}")
    return progress_html("running", 0, cfg.training.max_steps, None, None, job.run.name, "starting…")


def stop_training(studio: Studio) -> None:
    if studio.stop():
        gr.Info("Stopping: the adapter is saved from the current weights at the end of this step.")
    else:
        gr.Warning("No training is running.")


def resume_info(studio: Studio, run_name: str | None) -> str:
    if not run_name:
        return ""
    try:
        run = studio.open(run_name)
    except USER_ERRORS as e:
        return md_text(error_text(e))
    cps = [c.name for c in run.checkpoints()]
    st = run.read_status()
    then = (f"Resume continues from **{cps[-1]}**." if cps else
            "No checkpoint was saved, so Resume **starts over at step 1** in the same run folder.")
    return (f"**{md_text(run.name)}** — {md_text(st['state'])}: {md_text(st.get('message', ''))}  \n"
            f"Checkpoints: {', '.join(cps) or 'none'}. {then}")


def retry_button(studio: Studio, run_name: str | None) -> Any:
    """The "Retry smaller" button shows only beside a run that failed for want of memory."""
    try:
        show = bool(run_name) and ran_out_of_memory(studio.open(run_name))
    except USER_ERRORS:
        show = False
    return gr.update(visible=show)


def retry_smaller(studio: Studio, run_name: str | None) -> str:
    if not run_name:
        raise gr.Error("Pick the run that ran out of memory.")
    try:
        overrides = smaller_batch(studio.open(run_name).config().training)
    except (*USER_ERRORS, OSError) as e:
        raise user_error(e) from None
    return resume_training(studio, run_name, overrides)


def resume_training(studio: Studio, run_name: str | None, overrides: dict | None = None) -> str:
    if not run_name:
        raise gr.Error("Pick a run to resume.")
    try:
        job = studio.resume(run_name, overrides)
    except USER_ERRORS as e:
        raise user_error(e) from None
    if overrides:
        gr.Info("Resuming with " + ", ".join(f"{k} {v}" for k, v in overrides.items()))
    ckpt = job.run.last_checkpoint()
    gr.Info(f"Resuming {job.run.name} from {ckpt.name}" if ckpt else
            f"{job.run.name} has no checkpoint: training starts over at step 1 in the same run folder.")
    return progress_html("running", job.step, job.max_steps, None, None, job.run.name, "resuming…")


@dataclass
class JobView:
    """What the Train tab shows of the app's current (or last) job, read from its run folder."""

    key: tuple  # (run, metrics rows, state, phase): a view with the same key shows the same thing
    rows: list[dict]
    progress: str  # the progress line's HTML
    log: str
    running: bool


def job_view(studio: Studio) -> JobView | None:
    job = studio.job
    if job is None:
        return None
    run = job.run
    rows = run.read_metrics()  # the run folder is the truth: a reload or a second browser sees the whole curve
    st = run.read_status()
    state = job.state if job.state in ("failed", "stopped", "finished") else st.get("state", job.state)
    last = next((r for r in reversed(rows) if "loss" in r), {})
    # The Trainer states max_steps only once it starts; a run with Max steps set knows it from the start ("step
    # 0/60" while the model loads, not "0/?"). With epochs, N waits for the Trainer (it depends on the data).
    cfg = getattr(job, "cfg", None)
    planned = cfg.training.max_steps if cfg is not None and cfg.training.max_steps > 0 else 0
    total = job.max_steps or st.get("max_steps") or planned
    msg = job.error_message if state == "failed" else (job.phase if state == "running" else st.get("message", ""))
    age = time.time() - rows[-1]["time"] if rows and rows[-1].get("time") else None
    progress = progress_html(state, max(job.step, last.get("step", 0)), total, last.get("elapsed_s"),
                             last.get("eta_s"), run.name, msg, age, last.get("loss"))
    return JobView((run.name, len(rows), state, job.phase), rows, progress, run.log_tail(), state == "running")


def progress_json(studio: Studio, drawn: str | None = None, since: int | None = None) -> dict:
    """The light progress channel (progress_route.py): what the page's script writes into the Train tab every
    POLL_EVERY_S, without a Gradio event. When the page's chart shows `since` rows of the run titled `drawn`
    (training_figure's layout.meta), `curves` holds the points the newer rows add to each trace, and the script
    extends the chart with them (an event and a whole-figure redraw cost the page 6-10x the CPU;
    bench/chart_update.py)."""
    from ...plots import curve_points

    view = job_view(studio)
    if view is None:
        return {"key": None}
    out = {"key": list(view.key), "progress": view.progress, "log": view.log}
    points = curve_points(view.rows, since) if drawn == view.key[0] and since is not None else None
    if points is not None:
        out["curves"] = {"rows": len(view.rows), "points": points}
    return out


def poll_training(studio: Studio, c: dict, seen: tuple | None) -> dict:
    """The curves' refresh (the page's script presses it when the run changed; JS in ui/app.py): progress, curves,
    log and Stop of the app's current (or last) job; unchanged parts are left out.

    `seen` is this session's (run, metrics rows, state, phase, rows drawn in the chart, when it was drawn)."""
    from ...plots import training_figure

    view = job_view(studio)
    if view is None:
        return gr.skip()
    run_name, rows, state = view.key[0], view.rows, view.key[2]
    if seen is not None and tuple(seen[:4]) == view.key:
        return gr.skip()
    now = time.time()
    out = {c["progress"]: view.progress, c["log"]: view.log,
           c["stop"]: gr.update(interactive=view.running, variant="stop" if view.running else "secondary")}
    drawn_rows, drawn_at = (seen[4], seen[5]) if seen is not None and len(seen) == 6 and seen[0] == run_name \
        else (-1, 0.0)
    # Redraw on a new session, a new run, a state change, or every CHART_EVERY_S while rows arrive and the page's
    # script cannot extend the drawn traces itself (the margin keeps its request from landing just short of the
    # limit).
    changed = len(rows) != drawn_rows
    if rows and (drawn_rows < 0 or changed and (state != "running" or now - drawn_at >= 0.7 * CHART_EVERY_S)):
        out[c["plot"]], drawn_rows, drawn_at = training_figure(rows, title=run_name), len(rows), now
    elif not rows and drawn_rows < 0:
        # A new run still loading: the previous run's curves, under its name, must not stand in for it.
        out[c["plot"]], drawn_rows = None, 0
    out[c["seen"]] = (*view.key, drawn_rows, drawn_at)
    return out


def refresh_memory(studio: Studio, form: Form, c: dict, values: dict) -> dict:
    mem = c["memory"]
    try:
        cfg = form.to_config(values, check=False)
        studio.check_model(cfg.model)  # the planner reads config.json: only from allowed places
    except ConfigError:
        return gr.skip()
    fig, md = update_memory_panel(cfg, values.get(c["preset"]))
    return {mem["plot"]: fig, mem["verdict"]: md}


def restore_page(studio: Studio, form: Form, c: dict, tabs: gr.Tabs) -> dict:
    """On page load or reload: while a run trains, the form shows that run's settings and the Train tab opens
    (a reload used to reset the form to the preset, so Start would have trained other settings); after a
    restart, an interrupted run is announced beside its Resume button."""
    job = studio.job
    if job is not None and job.alive:
        return {tabs: gr.Tabs(selected="train"), **form.updates(job.cfg, keep_file=True)}
    runs = sorted(studio.runs(), key=lambda r: r.path.stat().st_mtime, reverse=True)
    cut = next((r for r in runs if r.state == "interrupted"), None)
    if cut is None:
        return gr.skip()
    try:  # the form shows what Resume continues (its max steps, not the preset's)
        settings = form.updates(cut.config(), keep_file=True)
    except USER_ERRORS:
        settings = {}
    ckpt = cut.last_checkpoint()
    msg = (f"The app stopped while this run was training. Press Resume to continue from {ckpt.name}." if ckpt else
           "The app stopped while this run was training, before its first checkpoint. Press Resume to start it "
           "over.")
    return {**settings, c["progress"]: progress_html("interrupted", RunDir.checkpoint_step(ckpt),
                                                     cut.read_status().get("max_steps") or 0, None, None, cut.name,
                                                     msg)}


# ---- layout and wiring ----

def build(studio: Studio, form: Form, preset: str | None) -> dict[str, Any]:
    from ...config import list_presets

    c: dict[str, Any] = {}
    initial = form.initial
    with gr.Row():
        # The shared list; behind a login, each page load adds that user's own (preset_choices).
        c["preset"] = gr.Dropdown(choices=list_presets(studio.presets_dir), value=preset,
                                  label="Preset", info="Loads a saved recipe into the form.", scale=2)
        form.render("name")
        c["preset_name"] = gr.Textbox(label="New preset name", placeholder="my-recipe", scale=1)
        c["save_preset"] = gr.Button("Save as preset", scale=1)
    # The actions and what they do come first: on a phone the settings below stack into a long column, and
    # Start must not be 2,000 px down.
    with gr.Row(elem_id="train-actions"):
        c["start"] = gr.Button("Start training", variant="primary", elem_id="start-btn", min_width=120)
        # Grey until a run is going (the poll turns it on): a bright red Stop with nothing to stop misleads.
        c["stop"] = gr.Button("Stop", variant="secondary", elem_id="stop-btn", interactive=False, min_width=80)
        # Typed names too (a script may resume without listing runs first); studio.resume confines them.
        c["resume_run"] = gr.Dropdown(label="Run to resume", choices=[], scale=2, elem_id="resume-run",
                                      info="Stopped, interrupted or failed runs; finished runs are complete.",
                                      allow_custom_value=True)
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
            for row in LORA_ROWS:
                with gr.Row():
                    form.render(*row)
            form.rest("lora")
            gr.Markdown("### Training")
            for row in MAIN_ROWS:
                with gr.Row():
                    form.render(*row)
            t = initial.training
            c["global_batch"] = gr.Markdown(global_batch_text(t.batch_size, t.grad_accum, t.processes),
                                            elem_id="global-batch")
            with gr.Accordion("Advanced", open=False):
                for i in range(0, len(ADVANCED), 3):
                    with gr.Row():
                        form.render(*ADVANCED[i:i + 3])
                form.rest("training", "quantization", None)  # a new setting lands here until it gets a place
        with gr.Column(scale=2):
            gr.Markdown("### Will it fit?")
            c["memory"] = build_memory_panel()
    c["log"] = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="train-log")
    # Pressed by the page's script (ui/app.py JS), never by a person: a Gradio event costs the page 0.1-0.2 s of CPU
    # (Gradio 6.31 copies the state of every component that ever showed a loading status, twice an event), so
    # the progress line, the log and the curves' new points come from a small JSON route every POLL_EVERY_S and
    # only a state change (or a chart the script cannot extend) takes an event. A gr.Timer ticking every 3 s cost
    # a watching page 8% of the headless step rate on 2 cores (bench/app_overhead.py).
    c["refresh"] = gr.Button("Refresh curves", elem_id="train-refresh", elem_classes=["qs-hidden"])
    c["seen"] = gr.State(None)  # per session: (run, rows, state) last drawn, to skip unchanged redraws
    return c


def wire(studio: Studio, form: Form, c: dict) -> None:
    mem = [c["memory"]["plot"], c["memory"]["verdict"]]
    # One serialized listener (like the data inspection): the newest settings always win.
    gr.on([c["preset"].change, *form.changes(*MEMORY_KEYS)], lambda v: refresh_memory(studio, form, c, v),
          {c["preset"], *form.inputs}, mem, show_progress="hidden", concurrency_limit=1, trigger_mode="always_last",
          api_name=False)

    # Presets. Stable API names: scripts drive the app with gradio_client (see README).
    def load(name: str | None, request: gr.Request):
        return apply_preset(studio, form, name, preset_owner(request))

    def save(request: gr.Request, name: str | None, *vals):  # Gradio passes the request to positional ones only
        return save_as_preset(studio, form, name, dict(zip(form.outputs, vals)), preset_owner(request))

    c["preset"].change(load, c["preset"], form.outputs, api_name="load_preset")
    # A list, not a set, of inputs: API clients pass the preset's name first, then the form in its API order.
    c["save_preset"].click(save, [c["preset_name"], *form.outputs], c["preset"], api_name="save_preset")

    # Training
    c["start"].click(lambda v: start_training(studio, form, v), form.inputs, c["progress"],
                     api_name="start_training")
    c["stop"].click(lambda: stop_training(studio), None, None, api_name="stop_training")
    c["resume_run"].change(lambda r: resume_info(studio, r), c["resume_run"], c["resume_info"], api_name=False)
    c["resume_run"].change(lambda r: retry_button(studio, r), c["resume_run"], c["retry_smaller"], api_name=False)
    # Once a resume has started, the progress line is the truth: the note beside Resume ("interrupted … continues
    # from checkpoint-20") stayed after the resumed run had finished.
    c["retry_smaller"].click(lambda r: retry_smaller(studio, r), c["resume_run"], c["progress"],
                             api_name="retry_smaller").success(lambda: "", None, c["resume_info"], api_name=False)
    c["resume"].click(lambda r: resume_training(studio, r), c["resume_run"], c["progress"],
                      api_name="resume_training").success(lambda: "", None, c["resume_info"], api_name=False)
    batch = [form[k] for k in BATCH_KEYS]
    gr.on([b.change for b in batch], global_batch_text, batch, c["global_batch"], show_progress="hidden",
          api_name=False)
    c["refresh"].click(lambda seen: poll_training(studio, c, seen), c["seen"],
                       [c["progress"], c["plot"], c["log"], c["seen"], c["stop"]], show_progress="hidden",
                       api_name=False)


def page_load(studio: Studio, form: Form, c: dict, demo: gr.Blocks, tabs: gr.Tabs) -> None:
    """On page load (and reload): the memory plan, and reattaching to a running job."""
    demo.load(lambda: restore_page(studio, form, c, tabs), None, [tabs, *form.outputs, c["progress"]],
              api_name=False)

    def choices(request: gr.Request):
        return preset_choices(studio, preset_owner(request))

    demo.load(choices, None, c["preset"], api_name=False)
    demo.load(lambda v: refresh_memory(studio, form, c, v), {c["preset"], *form.inputs},
              [c["memory"]["plot"], c["memory"]["verdict"]], api_name=False)
