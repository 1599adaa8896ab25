"""Event handlers: thin glue from form values to the engine. Testable without a browser.

Every user error is raised as `gr.Error` with a readable message; the app keeps serving.
"""

from __future__ import annotations

import html
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import BUNDLED_MODEL, ConfigError, RunConfig, cli_command, load_preset, save_preset
from ..studio import Studio, StudioBusy
from .chat_tab import BASE_ONLY, LLAMA_CPP, NO_GGUF, TRANSFORMERS
from .form import cfg_from_values, error_text, form_values, md_text
from .train_tab import progress_html

log = logging.getLogger(__name__)


def user_errors() -> tuple[type[BaseException], ...]:
    from ..data import DataError
    from ..export import ExportError
    from ..modeling import ModelError
    from ..serving import ChatBusy

    return (ConfigError, ModelError, DataError, StudioBusy, FileNotFoundError, ExportError, ChatBusy)


def to_gr_error(e: BaseException) -> gr.Error:
    # Toasts render HTML, and error texts quote file contents and names: escape them.
    return gr.Error(html.escape(error_text(e), quote=False), duration=None, title="Cannot do that")


def config_from(keys: list[str], values: tuple) -> RunConfig:
    try:
        return cfg_from_values(keys, list(values)).validate()
    except ConfigError as e:
        raise to_gr_error(e) from None


# ---- Model & Data ----

def inspect_data(studio: Studio, keys: list[str], *values) -> tuple:
    from .model_data_tab import inspect_upload, quant_summary

    cfg = config_from(keys, values)
    try:
        # Before anything reads the model's config.json (the memory estimate does): a path outside the model
        # roots is refused without saying whether it exists.
        studio.check_model(cfg.model)
    except ConfigError as e:
        return f"**Could not use this model.** {md_text(error_text(e))}", None, None, "", ""
    quant = quant_summary(cfg)
    try:
        summary, df, fig, example = inspect_upload(studio, cfg)
    except user_errors() as e:
        # A bad file: say what is wrong in place, keep the app and the form as they are.
        return f"**Could not use this file.** {md_text(error_text(e))}", None, None, "", quant
    return summary, df, fig, example, quant


QUICK_PREVIEW_BYTES = 8 * 2**20  # files bigger than this show a preview from their first rows first
PREVIEW_SAMPLE_ROWS = 2000


def inspect_data_live(studio: Studio, keys: list[str], progress=gr.Progress(track_tqdm=True), *values):
    """`inspect_data` for the page: a big file shows its format, first rows and a histogram from a sample within
    seconds, then the full counts (the reading and preparation bars show as progress; the result is cached)."""
    from .model_data_tab import inspect_upload, quant_summary

    cfg = config_from(keys, values)
    path = Path(cfg.data.data_path or "")
    if cfg.data.data_path and path.is_file() and path.stat().st_size > QUICK_PREVIEW_BYTES:
        try:
            studio.check_model(cfg.model)
            quant = quant_summary(cfg)
            summary, df, fig, example = inspect_upload(studio, cfg, sample=PREVIEW_SAMPLE_ROWS)
        except user_errors():
            pass  # the full inspection below says what is wrong, in place
        else:
            yield summary, df, fig, example, quant
    yield inspect_data(studio, keys, *values)


def use_server_file(studio: Studio, choice: str | None) -> Any:
    """A file picked from the --data-root list goes into the file box as it is (no copy, no upload)."""
    if not choice:
        return gr.skip()
    try:
        return str(studio.check_data_file(choice))
    except ConfigError as e:
        raise to_gr_error(e) from None


# ---- presets ----

def apply_preset(studio: Studio, keys: list[str], name: str | None) -> list[Any]:
    if not name:
        return [gr.skip()] * len(keys)
    try:
        cfg = load_preset(name, studio.presets_dir)
    except ConfigError as e:
        raise to_gr_error(e) from None
    vals = form_values(cfg, keys)
    # Keep the user's uploaded dataset when the preset names none of its own.
    return [gr.skip() if (k == "data_path" and v is None) else v for k, v in zip(keys, vals)]


def save_as_preset(studio: Studio, keys: list[str], name: str, *values) -> Any:
    from ..config import list_presets

    cfg = config_from(keys, values)
    try:
        path = save_preset(cfg, (name or "").strip(), studio.presets_dir)
    except ConfigError as e:
        raise to_gr_error(e) from None
    gr.Info(f"Saved preset {path.stem}")
    return gr.update(choices=list_presets(studio.presets_dir), value=path.stem)


# ---- training ----

def start_training(studio: Studio, keys: list[str], *values) -> str:
    cfg = config_from(keys, values)
    try:
        cfg.validate(need_data=True)
        job = studio.start(cfg)  # checks the model against what the operator allowed first
    except user_errors() as e:
        raise to_gr_error(e) from None
    if cfg.model.trust_remote_code:
        gr.Warning("trust_remote_code is on: the model folder's own Python code will run. Only for models you trust.")
    gr.Info(f"Started {job.run.name}")
    return progress_html("running", 0, cfg.training.max_steps, None, None, job.run.name, "starting…")


def stop_training(studio: Studio) -> None:
    if studio.stop():
        gr.Info("Stopping: the adapter is saved from the current weights at the end of this step.")
    else:
        gr.Warning("No training is running.")


RESUMABLE = ("stopped", "interrupted", "failed")


def resumable_runs(studio: Studio) -> list[str]:
    """Runs that ended before their last step. A finished run is complete: resuming it trained past its
    limit. A run with no checkpoint is offered too; resuming it starts over, and says so."""
    return [r.name for r in studio.runs() if r.state in RESUMABLE and not studio.in_use(r)]


def resume_info(studio: Studio, run_name: str | None) -> str:
    if not run_name:
        return ""
    try:
        run = studio.open(run_name)
    except ConfigError as e:
        return error_text(e)
    cps = [c.name for c in run.checkpoints()]
    st = run.read_status()
    then = (f"Resume continues from **{cps[-1]}**." if cps else
            "No checkpoint was saved, so Resume **starts over at step 1** in the same run folder.")
    return (f"**{md_text(run.name)}** — {md_text(st['state'])}: {md_text(st.get('message', ''))}  \n"
            f"Checkpoints: {', '.join(cps) or 'none'}. {then}")


def ran_out_of_memory(run) -> bool:
    st = run.read_status()
    return st.get("state") == "failed" and "out of memory" in (st.get("message") or "").lower()


def retry_button(studio: Studio, run_name: str | None) -> Any:
    """The "Retry smaller" button shows only beside a run that failed for want of memory."""
    try:
        show = bool(run_name) and ran_out_of_memory(studio.open(run_name))
    except ConfigError:
        show = False
    return gr.update(visible=show)


def smaller_batch(tr) -> dict[str, int]:
    """Half the per-device batch, twice the accumulation: the same global batch in less memory."""
    if tr.batch_size <= 1:
        raise gr.Error("This run already trains with batch_size 1. To use less memory, turn on "
                       "gradient_checkpointing or lower max_length in a new run.")
    half = tr.batch_size // 2
    return {"batch_size": half, "grad_accum": tr.grad_accum * tr.batch_size // half}


def retry_smaller(studio: Studio, run_name: str | None) -> str:
    if not run_name:
        raise gr.Error("Pick the run that ran out of memory.")
    try:
        overrides = smaller_batch(studio.open(run_name).config().training)
    except (ConfigError, OSError) as e:
        raise to_gr_error(e) from None
    return resume_training(studio, run_name, overrides)


def resume_training(studio: Studio, run_name: str | None, overrides: dict | None = None) -> str:
    if not run_name:
        raise gr.Error("Pick a run to resume.")
    try:
        job = studio.resume(run_name, overrides)
    except user_errors() as e:
        raise to_gr_error(e) from None
    if overrides:
        gr.Info("Resuming with " + ", ".join(f"{k} {v}" for k, v in overrides.items()))
    ckpt = job.run.last_checkpoint()
    gr.Info(f"Resuming {job.run.name} from {ckpt.name}" if ckpt else
            f"{job.run.name} has no checkpoint: training starts over at step 1 in the same run folder.")
    return progress_html("running", job.step, job.max_steps, None, None, job.run.name, "resuming…")


def tail(path: Path, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# While a run trains, the charts are redrawn at most this often (the progress bar and log keep the 3 s tick):
# on a 2-core machine the browser re-rendering four plotly charts every tick took CPU from the training itself
# (steps ran at 0.66x the headless rate with one page watching; bench/app_overhead.py).
CHART_EVERY_S = 10.0


def poll_training(studio: Studio, seen: tuple | None) -> tuple:
    """Timer tick: progress, curves and log of the app's current (or last) job; skip redraws when unchanged.

    `seen` is this session's (run, metrics rows, state, phase, rows drawn in the chart, when it was drawn)."""
    import time

    from ..plots import training_figure

    job = studio.job
    if job is None:
        return gr.skip(), gr.skip(), gr.skip(), seen, gr.skip()
    run = job.run
    rows = run.read_metrics()  # the run folder is the truth: a reload or a second browser sees the whole curve
    st = run.read_status()
    state = job.state if job.state in ("failed", "stopped", "finished") else st.get("state", job.state)
    key = (run.name, len(rows), state, job.phase)
    if seen is not None and tuple(seen[:4]) == key:
        return gr.skip(), gr.skip(), gr.skip(), seen, gr.skip()
    last = next((r for r in reversed(rows) if "loss" in r), {})
    total = job.max_steps or st.get("max_steps") or 0
    msg = job.error_message if state == "failed" else (job.phase if state == "running" else st.get("message", ""))
    now = time.time()
    age = now - rows[-1]["time"] if rows and rows[-1].get("time") else None
    prog = progress_html(state, max(job.step, last.get("step", 0)), total, last.get("elapsed_s"), last.get("eta_s"),
                         run.name, msg, age)
    drawn_rows, drawn_at = (seen[4], seen[5]) if seen is not None and len(seen) == 6 and seen[0] == run.name \
        else (-1, 0.0)
    # Redraw on a new session, a new run, a state change, or every CHART_EVERY_S while rows arrive.
    changed = len(rows) != drawn_rows
    if rows and (drawn_rows < 0 or changed and (state != "running" or now - drawn_at >= CHART_EVERY_S)):
        fig, drawn_rows, drawn_at = training_figure(rows, title=run.name), len(rows), now
    else:
        fig = gr.skip()
    stop = gr.update(interactive=state == "running", variant="stop" if state == "running" else "secondary")
    return prog, fig, tail(run.log_path), (*key, drawn_rows, drawn_at), stop


# ---- chat ----

def chat_runs(studio: Studio) -> Any:
    names = [r.name for r in studio.runs() if r.has_adapter() or r.checkpoints()]
    return gr.update(choices=[BASE_ONLY] + names)


def newest_adapter_run(studio: Studio) -> str | None:
    return next((r.name for r in studio.runs() if r.has_adapter()), None)


def follow_run(studio: Studio, current: str | None, picked: bool) -> Any:
    """Opening the Chat tab, or a run finishing, selects the newest run with an adapter, unless the user chose."""
    newest = None if picked else newest_adapter_run(studio)
    if newest is None or newest == current:
        return gr.skip()
    return chat_runs(studio) | {"value": newest}


def adapter_options(studio: Studio, run_name: str | None, backend: str = TRANSFORMERS) -> Any:
    from ..chat import adapter_choices
    from ..export import ggufs

    if not run_name or run_name == BASE_ONLY:
        return gr.update(choices=[], value=None)
    try:
        run = studio.open(run_name)
    except ConfigError as e:
        raise to_gr_error(e) from None
    if backend == LLAMA_CPP:
        opts = [p.name for p in ggufs(run)] or [NO_GGUF]
    else:
        opts = [p.name if p.name != "adapter" else "final adapter" for p in adapter_choices(run.path)]
    return gr.update(choices=opts, value=opts[0] if opts else None)


def _chat_target(studio: Studio, run_name: str | None, adapter: str | None) -> tuple[RunConfig, Path | None]:
    if not run_name or run_name == BASE_ONLY:
        return RunConfig().updated(base_model=BUNDLED_MODEL), None
    run = studio.open(run_name)
    cfg = run.config()
    studio.check_model(cfg.model)
    if not adapter:
        # No choice made (yet): the newest adapter the run has, final or checkpoint.
        from ..chat import adapter_choices

        found = adapter_choices(run.path)
        path = found[0] if found else run.adapter_dir
    elif adapter == "final adapter":
        path = run.adapter_dir
    else:
        path = run.checkpoints_dir / Path(adapter).name
    if not (path / "adapter_config.json").is_file():
        raise ConfigError([f"{run.name} has no adapter at {path.name} yet. Pick a checkpoint or wait for the run."])
    return cfg, path


def _settings(system, temperature, top_p, max_new_tokens, seed):
    from ..chat import MAX_MESSAGE_CHARS, GenerationSettings

    if len(system or "") > MAX_MESSAGE_CHARS:
        raise gr.Error(f"The system prompt is {len(system):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
    return GenerationSettings(system_prompt=system or "", temperature=float(temperature or 0), top_p=float(top_p),
                              max_new_tokens=int(max_new_tokens), seed=int(seed or 0))


def _checked_message(msg) -> str:
    """The stripped chat message, or a gr.Error when it is empty or over the server's size limit."""
    from ..chat import MAX_MESSAGE_CHARS

    msg = (msg or "").strip()
    if not msg:
        raise gr.Error("Type a message first.")
    if len(msg) > MAX_MESSAGE_CHARS:
        raise gr.Error(f"Your message is {len(msg):,} characters; this chat takes at most {MAX_MESSAGE_CHARS:,}. "
                       "Send a shorter message.")
    return msg


def _load_for_chat(studio: Studio, run_name, adapter, msg) -> tuple[str, str | None]:
    """(the stripped message, the loaded adapter's name or None for the base), or a gr.Error saying why not."""
    msg = _checked_message(msg)
    try:
        cfg, path = _chat_target(studio, run_name, adapter)
        return msg, studio.chat.load(cfg, path)
    except user_errors() as e:
        raise to_gr_error(e) from None


def _guarded(replies: Iterator[str]) -> Iterator[str]:
    """A reply stream whose user errors (a prompt over the token limit) become readable gr.Errors; closing this
    closes the engine's stream too, which stops its generation."""
    try:
        yield from replies
    except user_errors() as e:
        raise to_gr_error(e) from None
    finally:
        replies.close()


def _load_gguf_for_chat(studio: Studio, run_name, gguf, msg) -> str:
    """llama.cpp backend: the stripped message once the run's exported GGUF is loaded, or a gr.Error saying why not."""
    from ..export import ggufs

    msg = _checked_message(msg)
    if not run_name or run_name == BASE_ONLY:
        raise gr.Error("The llama.cpp backend answers from a run's exported GGUF: pick a run.")
    try:
        run = studio.open(run_name)
        found = {p.name: p for p in ggufs(run)}
        if not found or gguf == NO_GGUF:
            raise ConfigError([f"{run.name} has no GGUF export yet. Export it in the Runs tab (Export, GGUF), or use "
                               "the transformers backend."])
        studio.gguf_chat.load(found.get(Path(gguf or "").name) or next(iter(found.values())))
    except user_errors() as e:
        raise to_gr_error(e) from None
    return msg


def is_gguf_choice(adapter: str | None) -> bool:
    """The llama.cpp backend shows GGUF files in the Adapter list: the choice itself says which backend answers."""
    return bool(adapter) and (adapter == NO_GGUF or adapter.endswith(".gguf"))


def send_message(studio: Studio, run_name, adapter, system, temperature, top_p, max_new_tokens, seed, msg,
                 history, session: str | None = None) -> Iterator[tuple]:
    backend = LLAMA_CPP if is_gguf_choice(adapter) else TRANSFORMERS
    if backend == LLAMA_CPP:
        msg = _load_gguf_for_chat(studio, run_name, adapter, msg)
    else:
        msg, name = _load_for_chat(studio, run_name, adapter, msg)
    history = list(history or []) + [{"role": "user", "content": msg}]
    settings = _settings(system, temperature, top_p, studio.cap_new_tokens(max_new_tokens), seed)
    shown = history + [{"role": "assistant", "content": ""}]
    yield shown, "", history
    reply = ""
    replies = (studio.gguf_chat.stream(history, settings, threads=studio.chat_threads()) if backend == LLAMA_CPP
               else studio.chat.stream(history, settings, name, threads=studio.chat_threads(), session=session))
    for reply in _guarded(replies):
        shown[-1] = {"role": "assistant", "content": reply}
        yield shown, "", history
    history = history + [{"role": "assistant", "content": reply.strip()}]
    yield history, "", history


def compare_with_base(studio: Studio, run_name, adapter, system, temperature, top_p, max_new_tokens, seed,
                      msg, session: str | None = None) -> Iterator[tuple[str, str]]:
    """The same prompt and seed through one loaded base, adapter off and on (always the transformers path): both
    requests are queued at once, so they are answered in one batch (peft's mixed-adapter forward)."""
    if is_gguf_choice(adapter):
        adapter = None  # the list shows GGUF files: compare the run's newest adapter
    if (msg or "").strip() and (not run_name or run_name == BASE_ONLY):
        raise gr.Error("Pick a run with an adapter to compare against the base model.")
    msg, name = _load_for_chat(studio, run_name, adapter, msg)
    settings = _settings(system, temperature, top_p, studio.cap_new_tokens(max_new_tokens), seed)
    messages = [{"role": "user", "content": msg}]
    threads = studio.chat_threads()
    # The session counts once: the pair is one request from this browser.
    streams = [_guarded(studio.chat.stream(messages, settings, None, threads=threads, session=session)),
               _guarded(studio.chat.stream(messages, settings, name, threads=threads))]
    texts, live = ["", ""], [True, True]
    try:
        for i in (0, 1):  # start both, so both are queued before either is served
            texts[i] = next(streams[i], texts[i])
        yield texts[0], texts[1]
        while any(live):
            for i in (0, 1):
                if live[i]:
                    try:
                        texts[i] = next(streams[i])
                    except StopIteration:
                        live[i] = False
            yield texts[0], texts[1]
    finally:
        for s in streams:
            s.close()


# ---- runs ----

def runs_table(studio: Studio, preselect: bool = False) -> tuple:
    """The Runs table and the run pickers fed from it. With `preselect` (page load), the newest run is
    picked in the Runs tab (its curve shows at once) and the newest interrupted run is offered for Resume."""
    import pandas as pd

    from .runs_tab import RUN_COLUMNS

    rows, runs = [], studio.runs()
    for r in runs:
        s = r.summary()
        s["step"] = f"{s['step']}/{s['max_steps'] or '?'}"
        s["model"] = Path(str(s["model"])).name if str(s["model"]).startswith("/") else s["model"]
        for k in ("final_loss", "eval_loss"):
            s[k] = None if s[k] is None else round(s[k], 4)
        rows.append({k: s[k] for k in RUN_COLUMNS})
    names = [r["name"] for r in rows]
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    resumable = resumable_runs(studio)
    if not preselect:
        return df, gr.update(choices=names), gr.update(choices=names), gr.update(choices=resumable)
    newest = max(runs, key=lambda r: r.path.stat().st_mtime, default=None)
    interrupted = [r for r in sorted(runs, key=lambda r: r.path.stat().st_mtime, reverse=True)
                   if r.state == "interrupted" and r.name in resumable]
    return (df, gr.update(choices=names, value=[newest.name] if newest else []),
            gr.update(choices=names, value=newest.name if newest else None),
            gr.update(choices=resumable, value=interrupted[0].name if interrupted else None))


def restore_page(studio: Studio, keys: list[str]) -> list[Any]:
    """On page load or reload: while a run trains, the form shows that run's settings and the Train tab opens
    (a reload used to reset the form to the preset, so Start would have trained other settings); after a
    restart, an interrupted run is announced beside its Resume button."""
    job = studio.job
    if job is not None and job.alive:
        vals = form_values(job.cfg, keys)
        data = Path(job.cfg.data.data_path or ".").resolve()
        if not any(p == data or p in data.parents for p in (Path.cwd(), Path(tempfile.gettempdir()).resolve())):
            # Gradio only hands out files from the app's folder or the temp folder: keep the shown file as is.
            vals[keys.index("data_path")] = gr.skip()
        return [gr.Tabs(selected="train")] + vals + [gr.skip()]
    skip = [gr.skip()] * (1 + len(keys))
    runs = sorted(studio.runs(), key=lambda r: r.path.stat().st_mtime, reverse=True)
    cut = next((r for r in runs if r.state == "interrupted"), None)
    if cut is None:
        return skip + [gr.skip()]
    from .train_tab import progress_html

    ckpt = cut.last_checkpoint()
    st = cut.read_status()
    step = int(ckpt.name.split("-")[-1]) if ckpt else 0
    msg = (f"The app stopped while this run was training. Press Resume to continue from {ckpt.name}." if ckpt else
           "The app stopped while this run was training, before its first checkpoint. Press Resume to start it "
           "over.")
    return skip + [progress_html("interrupted", step, st.get("max_steps") or 0, None, None, cut.name, msg)]


def name_from_upload(path: Any) -> Any:
    """Runs are named after their dataset (`<time>-my_data`), so they can be told apart in Chat and Runs."""
    import re

    if not path:
        return gr.skip()
    stem = Path(getattr(path, "name", None) or str(path)).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:64]
    return name or gr.skip()


def download_hint(studio: Studio, run_name: str | None) -> None:
    """The download button does nothing without a file; say why instead."""
    if not run_name:
        gr.Warning("Pick a run first (the Run list beside this button): its adapter is what gets downloaded.")
        return
    try:
        run = studio.open(run_name)
    except ConfigError:
        return
    if not run.has_adapter():
        gr.Warning(f"{run.name} has no adapter yet: it is saved when the run finishes or is stopped.")


def overlay(studio: Studio, selected: list[str] | None) -> Any:
    from ..plots import overlay_figure

    if not selected:
        return None
    data = {}
    for name in selected:
        try:
            data[name] = studio.open(name).read_metrics()
        except ConfigError:
            continue
    return overlay_figure(data)


def run_details(studio: Studio, run_name: str | None) -> tuple:
    if not run_name:
        return "", "", gr.update(value=None)
    try:
        run = studio.open(run_name)
        cfg = run.config()
    except ConfigError as e:
        raise to_gr_error(e) from None
    s = run.summary()
    details = (f"**{md_text(run.name)}** · {md_text(s['status'])} · step {s['step']} · {md_text(s['message'])}  \n"
               f"Folder: {md_text(studio.shown_path(run.path))} · adapter: {'yes' if s['adapter'] else 'not yet'}")
    zip_path = zip_adapter(run) if run.has_adapter() else None
    # Runnable as written from the app's folder: the venv's python, paths relative to it, wrapped.
    command = cli_command(cfg, python=".venv/bin/python", relative_to=Path.cwd(), width=100)
    return details, command, gr.update(value=zip_path)


def zip_adapter(run) -> str:
    """One zip per adapter version, reused by every later call: a zip per click filled the temp folder
    (20 clicks, 313 MB). Older versions of the same run's zip are removed when a new one is written."""
    import hashlib
    import os

    files = sorted(p for p in run.adapter_dir.rglob("*") if p.is_file())
    stamp = hashlib.sha1(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    version = stamp.hexdigest()[:12]
    out_dir = Path(tempfile.gettempdir()) / f"qlora-studio-zips-{os.getuid()}"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    target = out_dir / f"{run.name}-adapter-{version}.zip"
    if not target.is_file():
        for old in out_dir.glob(f"{run.name}-adapter-*.zip"):
            old.unlink(missing_ok=True)
        tmp = Path(shutil.make_archive(str(out_dir / f".{run.name}-{version}-{os.getpid()}"), "zip",
                                       root_dir=run.adapter_dir))
        tmp.replace(target)  # write, then rename: a download never gets a half-written zip
    return str(target)


def delete_run(studio: Studio, run_name: str | None) -> None:
    if not run_name:
        raise gr.Error("Pick a run.")
    try:
        studio.delete(run_name)
    except user_errors() as e:
        raise to_gr_error(e) from None
    gr.Info(f"Deleted {run_name}")
