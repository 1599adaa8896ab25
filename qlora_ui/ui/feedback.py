"""What the page says back: a user error as a `gr.Error` toast, text made inert for Markdown, the progress bar.

Every handler turns the engine's `UserError` family into a toast here, once; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import html
import re

import gradio as gr

from ..config import FIELD_INDEX
from ..errors import ConfigError, UserError
from .form import label_for

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


def error_text(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return "Please fix:\n" + "\n".join(f"• {labelled(p)}" for p in e.problems)
    return str(e)


# What the UI catches: the engine's user-fixable errors, and a file that vanished (a run deleted meanwhile).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def user_error(e: BaseException) -> gr.Error:
    """The toast for a user-fixable error. Toasts render HTML, and error texts quote file contents and names:
    escaped."""
    return gr.Error(html.escape(error_text(e), quote=False), duration=None, title="Cannot do that")


def warn(message: str) -> None:
    gr.Warning(html.escape(message))


COLOURS = {"running": "#2563eb", "finished": "#16a34a", "stopped": "#ca8a04", "failed": "#dc2626",
           "interrupted": "#ea580c"}


def progress_bar(state: str, fraction: float, head: str, message: str = "", attrs: str = "") -> str:
    """The one progress bar (training and export): `head` is trusted HTML made by the caller, `message` is
    escaped here; `data-state` lets tests and scripts read the state."""
    colour = COLOURS.get(state, "#6b7280")
    msg = f'<div class="qs-msg">{html.escape(message)}</div>' if message else ""
    pct = 100.0 * max(0.0, min(1.0, fraction))
    return (f'<div class="qs-progress" data-state="{html.escape(state)}"{attrs}>{head}'
            f'<div class="qs-bar"><div style="width:{pct:.1f}%;background:{colour}"></div></div>{msg}</div>')


def state_colour(state: str) -> str:
    return COLOURS.get(state, "#6b7280")
