"""The "Will it fit?" panel of the Train tab: a stacked-bar chart per method and the verdict.

The Train tab builder places the components (build_memory_panel) and calls update_memory_panel with the
current config whenever a setting or the preset changes. All numbers come from qlora_ui.memory.
"""

from __future__ import annotations

import gradio as gr

from ..config import RunConfig
from ..memory import (
    GB,
    METHODS,
    ShapeError,
    plan_for_config,
    preset_target_gb,
    preset_verdict,
)
from ..plan import Plan
from ..plots import plan_figure

# The table's columns: what 4-bit shrinks (weights, with their quantization constants), what it leaves alone
# (activations) and what LoRA shrinks (trainable state). Summing all six parts per method hid which one moved.
_COLUMNS = {"weights": ("weights", "quant_constants"), "activations": ("activations",),
            "trainable": ("adapter", "gradients", "optimizer")}


def build_memory_panel(cfg: RunConfig | None = None) -> dict:
    """Create the components (inside the caller's gr.Blocks); filled for `cfg` (default settings if None)."""
    fig, md = update_memory_panel(cfg if cfg is not None else RunConfig())
    return {
        "plot": gr.Plot(value=fig, label="Will it fit? Memory per method", elem_id="memory-plot"),
        "verdict": gr.Markdown(value=md, elem_id="memory-verdict"),
    }


def update_memory_panel(cfg: RunConfig, preset: str | None = None):
    """(figure, markdown) for this config. With a preset named for a GPU size (gpu-65b-48gb), the verdict on
    that GPU comes first. An unknown model gives no chart and a one-line reason, never an exception: this
    runs on every keystroke of the model box."""
    try:
        if preset and preset_target_gb(preset) is not None:
            # Chart for the GPU the preset is made for; the text also says how it does on this machine.
            plan = plan_for_config(cfg, preset_target_gb(preset))
            return (plan_figure(plan),
                    preset_verdict(preset, cfg) + "\n\n" + plan.markdown() + "\n\n" + method_comparison(plan))
        plan = plan_for_config(cfg)
    except ShapeError as e:
        return None, f"No memory estimate: {e}"
    return plan_figure(plan), plan.markdown() + "\n\n" + method_comparison(plan)


def _part_gb(plan: Plan, method: str, column: str) -> float:
    return sum(plan.breakdown[method][p] for p in _COLUMNS[column]) / GB


def method_comparison(plan: Plan) -> str:
    """Markdown: each method's total split into weights / activations / trainable state, then what 4-bit saves
    and what dominates. Totals alone read as "QLoRA costs the most" on a small model, where activations (which
    4-bit does not touch) outweigh the weights it shrinks; the parts show why."""
    dq = plan.method != "qlora_no_double_quant"
    q = "qlora" if dq else "qlora_no_double_quant"
    rows = [q, "lora_16bit", "full_finetune"]
    lines = ["| method | weights | activations | adapter + gradients + optimizer | total |", "|---|--:|--:|--:|--:|"]
    for m in rows:
        lines.append(f"| {METHODS[m]} | " + " | ".join(f"{_part_gb(plan, m, c):.2f} GB" for c in _COLUMNS)
                     + f" | **{plan.total_gb(m):.2f} GB** |")
    w4, w16 = _part_gb(plan, q, "weights"), _part_gb(plan, "lora_16bit", "weights")
    act = _part_gb(plan, q, "activations")
    total = plan.total_gb(q)
    sentences = []
    if w4 < w16:
        sentences.append(f"4-bit saves **{w16 - w4:.2f} GB on the base weights** ({100 * (1 - w4 / w16):.0f}% of "
                         "them); it does not shrink activations or the trainable state.")
    else:
        sentences.append("4-bit saves nothing on a model this small: its embeddings stay 16-bit.")
    if act > total / 2:
        sentences.append(f"Here activations dominate ({act:.2f} of {total:.2f} GB, set by batch size x max length).")
    q_act16 = _part_gb(plan, "lora_16bit", "activations")
    if act > q_act16:
        # memory.layer_saved_tensors: peft's k-bit preparation makes the norms fp32, so QLoRA's residual stream
        # and projection outputs are 4-byte where 16-bit LoRA's are 2-byte.
        why = f"QLoRA's activations are larger ({act:.2f} vs {q_act16:.2f} GB) because its norms run in fp32"
        if total > plan.total_gb("lora_16bit"):
            why += (", which outweighs the weight saving on this model; on a model whose weights dominate the "
                    "total, 4-bit wins")
        sentences.append(why + ".")
    return "\n".join(lines) + "\n\n" + " ".join(sentences)
