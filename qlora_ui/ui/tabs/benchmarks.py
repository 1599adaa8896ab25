"""Evaluate tab, benchmarks section (being built)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def build() -> dict[str, Any]:
    gr.Markdown("### Benchmarks")
    return {}


def wire(studio, c: dict[str, Any]) -> None:
    pass


def page_load(studio, c: dict[str, Any], demo: gr.Blocks) -> None:
    pass
