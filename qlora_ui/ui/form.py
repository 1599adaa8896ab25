"""Form components generated from the config dataclass: labels, limits and help come from its metadata.

Numbers are sliders or bounded number boxes, never free text; a handler turns the values back into a
RunConfig with `cfg_from_values`, which collects every problem and raises once.
"""

from __future__ import annotations

import html
import re
from typing import Any, get_args, get_origin

import gradio as gr

from ..config import FIELD_INDEX, ConfigError, RunConfig, choices, field_type, validate_fields

# Visible names that tests and external clients rely on: keep them stable.
LABELS = {
    "base_model": "Base model",
    "data_path": "Dataset file",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_init": "LoRA init",
    "use_dora": "DoRA",
    "use_rslora": "rsLoRA",
    "max_steps": "Max steps",
}


def label_for(key: str) -> str:
    return LABELS.get(key, key.replace("_", " ").capitalize())


def component_for(key: str, value: Any = None, **overrides: Any) -> gr.components.Component:
    """The widget for one config field, bounded by its metadata."""
    _, f = FIELD_INDEX[key]
    meta = f.metadata
    value = RunConfig().get(key) if value is None else value
    kw: dict[str, Any] = dict(label=label_for(key), info=meta["help"], value=value)
    kw.update(overrides)
    ch = choices(f)
    t = field_type(f)
    base = t
    if get_origin(t) is not None and type(None) in get_args(t):
        base = next(a for a in get_args(t) if a is not type(None))
    if ch is not None:
        return gr.Dropdown(choices=list(ch), **kw)
    if base is bool:
        return gr.Checkbox(**kw)
    if base in (int, float):
        lo, hi, step = meta.get("min"), meta.get("max"), meta.get("step")
        if meta.get("log") or hi is None or (hi - lo) / (step or 1) > 100_000:
            # No minimum/maximum on the widget: Gradio would refuse a typed -1 with "Value -1 is less than
            # minimum value 1e-07", naming no field; our validation names the field and lists every problem.
            kw["info"] = f"{kw['info']} Range {lo:g}..{hi:g}." if lo is not None and hi is not None else kw["info"]
            return gr.Number(step=step, precision=0 if base is int else None, **kw)
        return gr.Slider(minimum=lo, maximum=hi, step=step or (1 if base is int else 0.01), **kw)
    if get_origin(base) is dict or base is dict:
        kw["value"] = ", ".join(f"{a}={b}" for a, b in (value or {}).items())
        kw.setdefault("placeholder", "question=instruction, answer=output")
        return gr.Textbox(**kw)
    if kw.get("value") is None:
        kw["value"] = ""
    return gr.Textbox(**kw)


def cfg_from_values(keys: list[str], values: list[Any], base: RunConfig | None = None) -> RunConfig:
    """Form values -> validated config. Every bad value is reported in one message."""
    base = base or RunConfig()
    problems = []
    updates = {}
    for k, v in zip(keys, values):
        if k == "data_path" and v is not None and not isinstance(v, str):
            v = getattr(v, "name", None) or getattr(v, "path", None) or str(v)
        if v is None and k != "revision":
            if k == "data_path":
                v = ""
            else:
                problems.append(f"{label_for(k)}: a value is required")
                continue
        updates[k] = v
    try:
        cfg = base.updated(**updates)
        problems += validate_fields(cfg)  # range problems too, so one message lists everything
    except ConfigError as e:
        problems += e.problems
        cfg = None
    if problems:
        raise ConfigError(problems)
    return cfg


def form_values(cfg: RunConfig, keys: list[str]) -> list[Any]:
    out = []
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        if k == "data_path" and not v:
            v = None
        out.append(v)
    return out


# Markdown punctuation that can start a link, image, code span, emphasis or table cell anywhere in a line
# ('_' only acts at word edges, and run names are full of it: left alone).
_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")


def md_text(s: object) -> str:
    """Text from a user's file, a run name or an error, made inert for gr.Markdown: HTML escaped (a CSV header
    holding `<form>` or `<img src=...>` must show as text to every session that opens the run) and Markdown
    punctuation backslash-escaped (no links, images or code fences to break out of)."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(s), quote=False))


def pre_block(s: object) -> str:
    """Preformatted text for gr.Markdown that nothing inside can end early (a ``` fence can be)."""
    return f'<pre class="qs-pre">{html.escape(str(s), quote=False)}</pre>'


def labelled(problem: str) -> str:
    """'column_map: …' -> 'Column map (column_map): …': in the app a problem names the field as the form labels
    it, and keeps the setting's key, which is also its CLI flag and its name in a preset."""
    key, sep, rest = problem.partition(":")
    if sep and key in FIELD_INDEX:
        return f"{label_for(key)} ({key}):{rest}"
    for k in sorted(FIELD_INDEX, key=len, reverse=True):  # "column_map renames …", "name 'x y': use …"
        if problem.startswith(k + " "):
            return f"{label_for(k)} ({k}){problem[len(k):]}"
    return problem


def error_text(e: Exception) -> str:
    if isinstance(e, ConfigError):
        return "Please fix:\n" + "\n".join(f"• {labelled(p)}" for p in e.problems)
    return str(e)
