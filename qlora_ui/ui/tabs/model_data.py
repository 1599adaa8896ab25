"""Model & Data tab: base model, quantization (with the memory it saves), dataset upload and its preview."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path
from typing import Any

import gradio as gr

from ...config import BUNDLED_MODEL, RunConfig
from ...errors import BusyError
from ...studio import Studio
from ..feedback import USER_ERRORS, error_text, md_text, pre_block, user_error
from ..form import Form

log = logging.getLogger(__name__)

UPLOAD_TYPES = [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt"]
NO_FILE = "Upload a dataset file (CSV, JSON, JSONL, Parquet or TXT)."
QUICK_PREVIEW_BYTES = 8 * 2**20  # files bigger than this show a preview from their first rows first
PREVIEW_SAMPLE_ROWS = 2000
# The data panel reads at most this many rows of a file (about 3 s on 2 busy cores): a Parquet file packs 200,000
# rows into 2 KB, and counting them all held the one inspection lane, and every other user's inspection, for
# minutes. The whole file is read when training starts.
INSPECT_MAX_ROWS = 10_000
BOUNDED_NOTE = (f" (the first {INSPECT_MAX_ROWS:,} rows only: the panel reads no more; training reads the whole "
                "file)")
# Inspections running or waiting at once, all users together. Each user holds at most two (one running, one
# waiting: Studio.inspection), so two users always inspect side by side; one lane for everyone let a client
# sending many inspections queue every other user behind them.
INSPECT_LANES = 4
# Settings that change what the preview shows (with the file box and the column map).
PREVIEW_KEYS = ["data_format", "max_length", "train_on_source", "system_prompt", "base_model", "max_rows", "method",
                "load_in_4bit", "quant_type", "double_quant", "compute_dtype"]


def form_widgets(studio: Studio) -> dict[str, Any]:
    """The fields this tab shows with a widget of its own (the rest come from the config's metadata)."""
    # Whoever runs the app decides (--allow-remote-code); a form value alone can never turn these on.
    locked = {} if studio.allow_remote_code else dict(
        interactive=False, info="Off: this app was started without --allow-remote-code.")
    return {
        # A dropdown with free text: bundled first, local folders found under --model-root, or a typed path/id.
        "base_model": lambda **kw: gr.Dropdown(
            choices=[BUNDLED_MODEL] + studio.local_models(), allow_custom_value=True, label="Base model",
            info="The bundled SmolLM2-135M-Instruct runs on any laptop. Or type a local folder path / hub id.", **kw),
        "trust_remote_code": locked,
        "allow_pickle": locked,
        "data_path": lambda **kw: gr.File(label="Dataset file (the preset's example until you upload yours)",
                                          file_types=UPLOAD_TYPES, type="filepath", elem_id="dataset-file", **kw),
        # Filled with the dataset's own splits when a Hub id or folder is entered (typing one stays possible).
        "data_split": lambda value=None, **kw: gr.Dropdown(
            choices=[value] if value else [], value=value, allow_custom_value=True, label="Split",
            info="The split to train on (Hub datasets and dataset folders).", elem_id="dataset-split", **kw),
    }


def quant_summary(cfg: RunConfig) -> str:
    """What the quantization choice saves on this model's weights, from the memory planner."""
    from ...memory import plan_for_config

    try:
        plan = plan_for_config(cfg)
    except Exception as e:  # noqa: BLE001 - an unknown model must not break the tab; say why instead
        return f"Memory estimate unavailable: {e}"
    js = plan.to_json()
    br = js.get("breakdown", {})
    full = br.get("full_finetune", br.get("full_finetune_16bit", {})).get("weights")
    q = cfg.quantization
    key = "qlora" if q.double_quant else "qlora_no_double_quant"
    qb = br.get(key, {})
    qw = (qb.get("weights") or 0) + (qb.get("quant_constants") or 0)
    line = ""
    name = f"**{q.quant_type.upper()}{' + double quant' if q.double_quant else ''}**"
    if full and qw and qw < full:
        line = (f"{name}: base weights **{qw:.3f} GB** instead of {full:.3f} GB in 16-bit — saves "
                f"**{100 * (1 - qw / full):.0f}%**. ")
    elif full and qw:
        line = f"{name}: no saving on a model this small (its embeddings stay 16-bit). "
    if not q.load_in_4bit:
        line = "4-bit is off: this trains 16-bit LoRA on a bf16/fp32 base (no quantization saving). "
    from ...evidence import quantization_evidence
    from ..memory_panel import method_comparison

    # Totals alone read as "QLoRA costs the most" on a small model; the parts show what 4-bit saves and what
    # dominates (issue 24, newcomer item 8).
    return line + "\n\n" + method_comparison(plan) + "\n\n" + quantization_evidence()


def segments_html(segments: list[tuple[str, bool]]) -> str:
    """Trained tokens in green, masked (prompt/template) tokens in grey, at token granularity."""
    parts = []
    for text, trained in segments:
        cls = "qs-trained" if trained else "qs-masked"
        parts.append(f'<span class="{cls}">{html.escape(text)}</span>')
    legend = ('<div class="qs-legend"><span class="qs-trained">trained tokens (loss)</span> '
              '<span class="qs-masked">masked tokens (no loss)</span></div>')
    return legend + '<pre class="qs-example">' + "".join(parts) + "</pre>"


def inspect_upload(studio: Studio, cfg: RunConfig, sample: int = 0) -> tuple[str, Any, Any, str]:
    """(summary markdown, preview dataframe, histogram, example html) for the dataset in `cfg`; with `sample`,
    from the file's first rows only (seconds, whatever the file's size). Without, a file is read up to
    INSPECT_MAX_ROWS rows; a Hub dataset or dataset folder whole (the operator allowed it)."""
    import numpy as np

    from ...data import inspect_file, segments_for_preview, source_for
    from ...plots import length_histogram

    d = cfg.data
    if not d.data_path:
        return NO_FILE, None, None, ""
    studio.check_model(cfg.model)
    studio.check_data(d)  # a Hub id must be allowed, a folder under --data-root, before anything is read
    tok = studio.tokenizer_for(cfg.model.base_model)
    bounded = not sample and source_for(d) is None
    if cfg.training.method != "sft":
        return preference_view(cfg, tok, bounded)
    rep = inspect_file(d.data_path, tokenizer=tok, data_format=d.data_format, column_map=d.column_map,
                       max_length=d.max_length, system_prompt=d.system_prompt, train_on_source=d.train_on_source,
                       max_rows=d.max_rows, sample=INSPECT_MAX_ROWS if bounded else sample, source=source_for(d))
    if bounded:
        rep.sampled_note = BOUNDED_NOTE
    lengths = np.asarray(getattr(rep, "token_lengths", []))
    fig = length_histogram(lengths, d.max_length, over=rep.dropped.get("too_long", 0)) if len(lengths) else None
    example = ""
    conv = getattr(rep, "example", None)
    if conv:
        example = segments_html(segments_for_preview(conv, tok, d.train_on_source))
    # The summary quotes column names and values from the file: escaped, in a block nothing can close early.
    nxt = ("\n\n**Next:** open the **Train** tab and press **Start training** (the settings there are ready to "
           "go), or adjust the column mapping and options above first.")
    return pre_block(rep.summary()) + nxt, getattr(rep, "preview_df", None), fig, example


def preference_view(cfg: RunConfig, tok, bounded: bool = False) -> tuple[str, Any, Any, str]:
    """A DPO / ORPO file: the counts and drops, the pair lengths, and one pair as the model sees it: the prompt, the
    chosen and the rejected answer, each with its token count. `bounded`: its first INSPECT_MAX_ROWS rows only."""
    import dataclasses

    import numpy as np

    from ...data.preference import inspect_preferences
    from ...plots import length_histogram

    d = cfg.data
    if bounded and not 0 < d.max_rows <= INSPECT_MAX_ROWS:
        d = dataclasses.replace(d, max_rows=INSPECT_MAX_ROWS)
    rep = inspect_preferences(d, tok, method=cfg.training.method)
    if bounded and d is not cfg.data and rep.rows_read >= INSPECT_MAX_ROWS:
        rep.sampled, rep.sampled_note = True, BOUNDED_NOTE
    lengths = np.asarray(rep.token_lengths)
    fig = length_histogram(lengths, d.max_length, over=rep.dropped.get("too_long", 0)) if len(lengths) else None
    example = ""
    if rep.pair:
        toks = rep.pair.get("tokens", {})
        blocks = []
        for key, label in (("prompt", "Prompt"), ("chosen", "Chosen (preferred)"), ("rejected", "Rejected")):
            text = "\n".join(f"{m['role']}: {m['content']}" for m in rep.pair[key])
            cls = {"prompt": "qs-masked", "chosen": "qs-trained", "rejected": ""}[key]
            blocks.append(f"<b>{label}</b> · {toks.get(key, '?')} tokens"
                          f'<pre class="qs-example"><span class="{cls}">{html.escape(text)}</span></pre>')
        example = '<div class="qs-pair">' + "".join(blocks) + "</div>"
    nxt = (f"\n\n**Next:** open the **Train** tab (method **{cfg.training.method}**) and press **Start training**.")
    return pre_block(rep.summary()) + nxt, None, fig, example


def config_from(form: Form, values: dict) -> RunConfig:
    try:
        return form.to_config(values)
    except USER_ERRORS as e:
        raise user_error(e) from None


def _shown(c: dict, summary: str, df: Any = None, fig: Any = None, example: str = "", quant: str = "") -> dict:
    return {c["data_summary"]: summary, c["data_preview"]: df, c["data_hist"]: fig, c["data_example"]: example,
            c["quant_info"]: quant}


def inspect_data(studio: Studio, form: Form, c: dict, values: dict) -> dict:
    """The dataset as the model will see it, or in place what is wrong with the file or the model."""
    cfg = config_from(form, values)
    try:
        # Before anything reads the model's config.json (the memory estimate does): a path outside the model
        # roots is refused without saying whether it exists.
        studio.check_model(cfg.model)
    except USER_ERRORS as e:
        return _shown(c, f"**Could not use this model.** {md_text(error_text(e))}")
    quant = quant_summary(cfg)
    try:
        summary, df, fig, example = inspect_upload(studio, cfg)
    except USER_ERRORS as e:
        # A bad file: say what is wrong in place, keep the app and the form as they are.
        return _shown(c, f"**Could not use this file.** {md_text(error_text(e))}", quant=quant)
    return _shown(c, summary, df, fig, example, quant)


def inspect_data_live(studio: Studio, form: Form, c: dict, values: dict, progress=gr.Progress(track_tqdm=True)):
    """`inspect_data` for the page: a big file shows its format, first rows and a histogram from a sample within
    seconds, then the full counts (the reading and preparation bars show as progress; the result is cached)."""
    cfg = config_from(form, values)
    path = Path(cfg.data.data_path or "")
    # A Hub dataset shows its first rows, streamed, before the download (its progress shows meanwhile).
    hub = cfg.data.data_path.startswith("hf://")
    if hub or cfg.data.data_path and path.is_file() and path.stat().st_size > QUICK_PREVIEW_BYTES:
        try:
            studio.check_model(cfg.model)
            quant = quant_summary(cfg)
            summary, df, fig, example = inspect_upload(studio, cfg, sample=PREVIEW_SAMPLE_ROWS)
        except USER_ERRORS:
            pass  # the full inspection below says what is wrong, in place
        else:
            yield _shown(c, summary, df, fig, example, quant)
    yield inspect_data(studio, form, c, values)


def use_server_file(studio: Studio, choice: str | None) -> Any:
    """A file picked from the --data-root list goes into the file box as it is (no copy, no upload)."""
    if not choice:
        return gr.skip()
    try:
        return str(studio.check_data_file(choice))
    except USER_ERRORS as e:
        raise user_error(e) from None


def dataset_splits(studio: Studio, form: Form, values: dict) -> Any:
    """The split picker's choices from the typed Hub id or folder (its own list), keeping a split it has."""
    from ...data import source_for, split_names

    cfg = config_from(form, values)
    d = cfg.data
    if not form.source_value(values.get(form.source_box)):
        return gr.skip()
    try:
        studio.check_data(d)
        splits = split_names(source_for(d))
    except USER_ERRORS as e:
        raise user_error(e) from None
    if not splits:
        return gr.skip()
    return gr.update(choices=splits, value=d.data_split if d.data_split in splits else splits[0])


def name_from_upload(path: Any) -> Any:
    """Runs are named after their dataset (`<time>-my_data`), so they can be told apart in Chat and Runs."""
    if not path:
        return gr.skip()
    stem = Path(getattr(path, "name", None) or str(path)).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:64]
    return name or gr.skip()


def build(studio: Studio, form: Form) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Base model")
            form.render("base_model")
            with gr.Accordion("Model safety", open=False):
                form.render("trust_remote_code", "allow_pickle")
                form.rest("model")
            gr.Markdown("### Quantization")
            form.render("load_in_4bit", "quant_type", "double_quant", "compute_dtype")
            c["quant_info"] = gr.Markdown(elem_id="quant-info")
        with gr.Column(scale=2):
            gr.Markdown("### Dataset")
            with gr.Row():
                # Replacing the preset's example file is one click: no need to find the small x on the file box.
                c["data_upload"] = gr.UploadButton("Upload your own dataset", file_types=UPLOAD_TYPES,
                                                   type="filepath", variant="primary", elem_id="dataset-upload")
                # Big files need no upload: the operator's --data-root folders are listed here, used in place.
                c["data_server"] = gr.Dropdown(choices=studio.data_files(), value=None,
                                               label="Or a file on the server", visible=bool(studio.data_roots),
                                               elem_id="dataset-server",
                                               info="Files in this app's --data-root folders, used where they lie.")
            form.render("data_path")
            # A Hub dataset id or a dataset folder, typed beside the upload; its split picked from its own list.
            with gr.Row():
                form.source_box.render()
                form.render("data_split", "data_config")
            with gr.Row():
                form.render("data_format", "max_length")
            with gr.Accordion("Column mapping and options", open=False):
                form.render("column_map", "eval_fraction", "train_on_source", "system_prompt", "max_rows")
                form.rest("data")
            c["data_summary"] = gr.Markdown(NO_FILE, elem_id="data-summary")
    with gr.Row():
        c["data_hist"] = gr.Plot(label="Token lengths", elem_id="length-hist")
    c["data_example"] = gr.HTML(label="Example as the model sees it", elem_id="data-example")
    c["data_preview"] = gr.Dataframe(label="First rows", interactive=False, wrap=True, max_height=320)
    return c


def outputs(c: dict) -> list:
    return [c["data_summary"], c["data_preview"], c["data_hist"], c["data_example"], c["quant_info"]]


def wire(studio: Studio, form: Form, c: dict) -> None:
    # Every way to pick data starts one inspection: one listener for the settings, the column map and a clear (run
    # one at a time with the latest values), and one chain for each way a file arrives (below). Each user (login,
    # else browser session) has one inspection running and one waiting (Studio.inspection), so a later one shows
    # last; more are refused at once. The lanes are shared by all users: two users' inspections run side by side, and
    # one user's burst waits behind nobody else's file.
    def inspect(values: dict, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        who = getattr(request, "username", None) or getattr(request, "session_hash", None)
        try:
            with studio.inspection(who):
                yield from inspect_data_live(studio, form, c, values, progress)
        except BusyError as e:
            raise user_error(e) from None

    live = dict(fn=inspect, inputs=form.inputs, outputs=outputs(c), show_progress="minimal",
                concurrency_limit=INSPECT_LANES, concurrency_id="inspect", trigger_mode="always_last")
    file_box, column_map = form["data_path"], form["column_map"]
    # (A file dropped on the file box is inspected by its chain below, once the typed source is cleared: listening
    # here too inspected every upload twice.)
    gr.on([file_box.clear, column_map.blur, column_map.submit, *form.changes(*PREVIEW_KEYS)],
          **live, api_name="inspect_data")
    # The upload button and the --data-root list fill the file box, then inspect it, like a dropped file.
    name = dict(fn=name_from_upload, inputs=file_box, outputs=form["name"], api_name=False)
    # An uploaded file replaces a typed Hub id or folder (the typed one would otherwise win).
    c["data_upload"].upload(lambda f: (f, ""), c["data_upload"], [file_box, form.source_box], api_name=False).then(
        **live, api_name=False).then(**name)
    c["data_server"].change(lambda choice: (use_server_file(studio, choice), gr.skip() if not choice else ""),
                            c["data_server"], [file_box, form.source_box], api_name=False).then(
        **live, api_name=False).then(**name)
    file_box.upload(**name)
    # Enter in the source box: its splits, then the same inspection as an upload (first rows, then the whole).
    source_box = form.source_box
    source_box.submit(lambda v: dataset_splits(studio, form, v), form.inputs, form["data_split"],
                      api_name=False).then(**live, api_name=False)
    file_box.upload(lambda: "", None, source_box, api_name=False).then(**live, api_name=False)


def page_load(studio: Studio, form: Form, c: dict, demo: gr.Blocks) -> None:
    demo.load(lambda values: inspect_data(studio, form, c, values), form.inputs, outputs(c), api_name=False)
