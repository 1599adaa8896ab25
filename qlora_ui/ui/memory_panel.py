"""The "Will it fit?" panel of the Train tab: a stacked-bar chart per method and the verdict.

The Train tab builder places the components (build_memory_panel) and calls update_memory_panel with the
current config whenever a setting or the preset changes. All numbers come from qlora_ui.memory.
"""

from __future__ import annotations

import gradio as gr

from ..config import RunConfig
from ..memory import (
    ShapeError,
    plan_for_config,
    preset_target_gb,
    preset_verdict,
)
from ..plots import plan_figure


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
            return plan_figure(plan), preset_verdict(preset, cfg) + "\n\n" + plan.markdown()
        plan = plan_for_config(cfg)
    except ShapeError as e:
        return None, f"No memory estimate: {e}"
    return plan_figure(plan), plan.markdown()
