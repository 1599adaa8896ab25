"""Model & Data tab: base model, quantization (with the memory it saves), dataset upload and its preview."""

from __future__ import annotations

import html
import logging
from typing import Any

import gradio as gr

from ..config import BUNDLED_MODEL, RunConfig
from ..studio import Studio
from .form import component_for, pre_block

log = logging.getLogger(__name__)

MODEL_KEYS = ["base_model", "trust_remote_code", "allow_pickle"]
QUANT_KEYS = ["load_in_4bit", "quant_type", "double_quant", "compute_dtype"]
DATA_KEYS = ["data_path", "data_format", "column_map", "max_length", "eval_fraction", "train_on_source",
             "system_prompt", "max_rows"]
UPLOAD_TYPES = [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt"]


def quant_summary(cfg: RunConfig) -> str:
    """What the quantization choice saves on this model's weights, from the memory planner."""
    from ..memory import plan_for_config

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
    from ..evidence import quantization_evidence

    return line + (f"Training total: QLoRA {js['qlora_gb']:.2f} GB vs 16-bit LoRA {js['lora_16bit_gb']:.2f} GB vs "
                   f"full fine-tuning {js['full_finetune_gb']:.2f} GB. {quantization_evidence()}")


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
    from the file's first rows only (seconds, whatever the file's size)."""
    import numpy as np

    from ..data import inspect_file, segments_for_preview
    from ..plots import length_histogram

    d = cfg.data
    if not d.data_path:
        return "Upload a dataset file (CSV, JSON, JSONL, Parquet or TXT).", None, None, ""
    studio.check_model(cfg.model)
    tok = studio.tokenizer_for(cfg.model.base_model)
    rep = inspect_file(d.data_path, tokenizer=tok, data_format=d.data_format, column_map=d.column_map,
                       max_length=d.max_length, system_prompt=d.system_prompt, train_on_source=d.train_on_source,
                       max_rows=d.max_rows, sample=sample)
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


def build_model_data_tab(studio: Studio, initial: RunConfig) -> dict[str, Any]:
    c: dict[str, Any] = {}

    def comp(key, **kw):
        return component_for(key, value=initial.get(key), **kw)

    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Base model")
            choices = [BUNDLED_MODEL] + studio.local_models()
            # A dropdown with free text: bundled first, local folders found under --model-root, or a typed path/id.
            c["base_model"] = gr.Dropdown(
                choices=choices, value=initial.model.base_model, allow_custom_value=True, label="Base model",
                info="The bundled SmolLM2-135M-Instruct runs on any laptop. Or type a local folder path / hub id.")
            with gr.Accordion("Model safety", open=False):
                # Whoever runs the app decides (--allow-remote-code); a form value alone can never turn these on.
                locked = {} if studio.allow_remote_code else dict(
                    interactive=False, info="Off: this app was started without --allow-remote-code.")
                c["trust_remote_code"] = comp("trust_remote_code", **locked)
                c["allow_pickle"] = comp("allow_pickle", **locked)
            gr.Markdown("### Quantization")
            for k in QUANT_KEYS:
                c[k] = comp(k)
            c["quant_info"] = gr.Markdown(elem_id="quant-info")
        with gr.Column(scale=2):
            gr.Markdown("### Dataset")
            with gr.Row():
                # Replacing the preset's example file is one click: no need to find the small x on the file box.
                c["data_upload"] = gr.UploadButton("Upload your own dataset", file_types=UPLOAD_TYPES,
                                                   type="filepath", variant="primary", elem_id="dataset-upload")
                # Big files need no upload: the operator's --data-root folders are listed here, used in place.
                server_files = studio.data_files()
                c["data_server"] = gr.Dropdown(choices=server_files, value=None, label="Or a file on the server",
                                               visible=bool(studio.data_roots), elem_id="dataset-server",
                                               info="Files in this app's --data-root folders, used where they lie.")
            c["data_path"] = gr.File(label="Dataset file (the preset's example until you upload yours)",
                                     file_types=UPLOAD_TYPES, type="filepath",
                                     value=initial.data.data_path or None, elem_id="dataset-file")
            with gr.Row():
                c["data_format"] = comp("data_format")
                c["max_length"] = comp("max_length")
            with gr.Accordion("Column mapping and options", open=False):
                c["column_map"] = comp("column_map")
                c["eval_fraction"] = comp("eval_fraction")
                c["train_on_source"] = comp("train_on_source")
                c["system_prompt"] = comp("system_prompt")
                c["max_rows"] = comp("max_rows")
            c["data_summary"] = gr.Markdown("Upload a dataset file (CSV, JSON, JSONL, Parquet or TXT).",
                                            elem_id="data-summary")
    with gr.Row():
        c["data_hist"] = gr.Plot(label="Token lengths", elem_id="length-hist")
    c["data_example"] = gr.HTML(label="Example as the model sees it", elem_id="data-example")
    c["data_preview"] = gr.Dataframe(label="First rows", interactive=False, wrap=True, max_height=320)
    return c
