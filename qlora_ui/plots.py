"""Plotly figures from metrics rows and data reports (used by the UI and by bench/ for PNG export)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from .memory import Plan

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"]


def _xy(rows: list[dict[str, Any]], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def is_preference(rows: list[dict[str, Any]]) -> bool:
    """A DPO / ORPO run: its rows carry reward curves (preference_training.METRIC_KEYS)."""
    return any("reward_accuracy" in r or "reward_margin" in r for r in rows)


# (metric key, trace name, subplot row, col, trace style) of a run's curves, in the order training_figure adds them.
# curve_points reads the same list: the Train tab's page script extends the drawn traces by index.
_PREFERENCE_SERIES = (
    ("reward_chosen", "reward chosen", 3, 1, dict(mode="lines", line=dict(color=COLORS[2]))),
    ("reward_rejected", "reward rejected", 3, 1, dict(mode="lines", line=dict(color=COLORS[1]))),
    ("reward_margin", "reward margin", 3, 1, dict(mode="lines", line=dict(color=COLORS[3], dash="dot"))),
    ("reward_accuracy", "reward accuracy", 3, 2, dict(mode="lines", line_color=COLORS[0], showlegend=False)),
    ("eval_reward_accuracy", "eval reward accuracy", 3, 2,
     dict(mode="lines+markers", marker_size=7, line=dict(color=COLORS[1], dash="dash"))),
)
_SERIES = (
    ("loss", "train loss", 1, 1, dict(mode="lines+markers", marker_size=4, line_color=COLORS[0])),
    ("eval_loss", "eval loss", 1, 1,
     dict(mode="lines+markers", marker_size=7, line=dict(color=COLORS[1], dash="dash"))),
    ("lr", "lr", 1, 2, dict(mode="lines", line_color=COLORS[2], showlegend=False)),
    ("grad_norm", "grad norm", 2, 1, dict(mode="lines", line_color=COLORS[3], showlegend=False)),
    ("tokens_per_s", "tokens/s", 2, 2, dict(mode="lines", line_color=COLORS[4], showlegend=False)),
)


def _series(pref: bool) -> tuple:
    return (_PREFERENCE_SERIES if pref else ()) + _SERIES


def training_figure(rows: list[dict[str, Any]], title: str = "") -> go.Figure:
    """Train/eval loss, learning rate, grad norm and tokens/s of one run, 2x2; a DPO / ORPO run gets a third row:
    the rewards of the chosen and rejected answers with their margin, and the reward accuracy.

    `layout.meta` says what is drawn ({"title", "rows"}): the page's script extends the traces from there
    (curve_points) instead of asking for the whole figure again."""
    pref = is_preference(rows)
    titles = ("Loss", "Learning rate", "Grad norm", "Tokens/s")
    fig = make_subplots(rows=3 if pref else 2, cols=2, vertical_spacing=0.11 if pref else 0.16,
                        horizontal_spacing=0.08,
                        subplot_titles=titles + (("Rewards (chosen, rejected, margin)", "Reward accuracy")
                                                 if pref else ()))
    for key, name, r, c, style in _series(pref):
        x, y = _xy(rows, key)
        fig.add_trace(go.Scatter(x=x, y=y, name=name, **style), r, c)
    if pref:
        fig.update_yaxes(range=[-0.05, 1.05], row=3, col=2)
    fig.update_xaxes(title_text="step", row=3 if pref else 2)
    fig.update_layout(height=760 if pref else 520, margin=dict(l=40, r=20, t=60 if title else 40, b=40),
                      title=title or None, meta=dict(title=title, rows=len(rows)),
                      legend=dict(orientation="h", y=1.12, x=0), template="none", plot_bgcolor="white")
    # No template: plotly.js re-applies one on every update, and plotly_white doubled the cost of each of the live
    # chart's updates in Chromium (bench/chart_update.py); plotly.js's own defaults are as light.
    fig.update_xaxes(gridcolor="#eee", zeroline=False)
    fig.update_yaxes(gridcolor="#eee", zeroline=False)
    return fig


def curve_points(rows: list[dict[str, Any]], since: int) -> list[tuple[list, list]] | None:
    """The points rows[since:] add to each trace of training_figure(rows[:since]), in its trace order; None when
    that figure's traces are not this list's (a preference run's first reward row): the page redraws it whole."""
    pref = is_preference(rows)
    if not 0 < since <= len(rows) or is_preference(rows[:since]) != pref:
        return None
    return [_xy(rows[since:], key) for key, *_ in _series(pref)]


def overlay_figure(runs: dict[str, list[dict[str, Any]]], title: str = "Loss by run") -> go.Figure:
    """Train (solid) and eval (dashed) loss of several runs on one chart."""
    fig = go.Figure()
    for i, (name, rows) in enumerate(runs.items()):
        color = COLORS[i % len(COLORS)]
        x, y = _xy(rows, "loss")
        if x:
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{name} train", mode="lines", line_color=color))
        x, y = _xy(rows, "eval_loss")
        if x:
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{name} eval", mode="lines+markers",
                                     line=dict(color=color, dash="dash")))
        x, y = _xy(rows, "reward_accuracy")
        if x:  # DPO / ORPO runs: reward accuracy on a 0..1 axis at the right
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{name} reward accuracy", mode="lines", yaxis="y2",
                                     line=dict(color=color, dash="dot")))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", template="plotly_white", height=460,
                      legend=dict(orientation="h", y=-0.2))
    if any(is_preference(rows) for rows in runs.values()):
        fig.update_layout(yaxis2=dict(title="reward accuracy", overlaying="y", side="right", range=[0, 1.05]))
    return fig


def length_histogram(lengths, max_length: int, over: int | None = None) -> go.Figure:
    """Token lengths with the cutoff line; `over` = rows dropped as too long (their lengths may be absent).

    Binned here (numpy), so a million rows send 60 bars to the browser, not a million numbers."""
    import numpy as np

    xs = np.asarray(lengths, dtype=np.int64)
    over = int((xs > max_length).sum()) if over is None else over
    counts, edges = np.histogram(xs, bins=min(60, max(10, len(np.unique(xs)))))
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), marker_color=COLORS[0],
                           name="examples"))
    fig.add_vline(x=max_length, line_dash="dash", line_color=COLORS[1],
                  annotation_text=f"max_length {max_length}: {over} row(s) dropped", annotation_position="top right")
    fig.update_layout(title="Tokens per example", xaxis_title="tokens", yaxis_title="rows", height=320,
                      margin=dict(l=40, r=20, t=50, b=40), template="plotly_white", bargap=0.05)
    return fig


def plan_figure(plan: Plan) -> go.Figure:
    """The memory planner's answer: stacked bars, one per method, split by part; a dashed line at the device's
    memory; the verdict on top."""
    from .memory import GB, METHODS, PARTS

    colors = {"weights": "#4c72b0", "quant_constants": "#8172b2", "adapter": "#55a868", "gradients": "#dd8452",
              "optimizer": "#c44e52", "activations": "#937860"}
    names = list(METHODS)
    # Short bar labels (the full method name is in the hover and the text beside the chart): long ones ran
    # together on a phone.
    short = {"full_finetune": "Full 16-bit", "lora_16bit": "LoRA 16-bit", "qlora_no_double_quant": "QLoRA",
             "qlora": "QLoRA+DQ"}
    labels = [short.get(m, m) + (" ◀" if m == plan.method else "") for m in names]
    fig = go.Figure()
    for part in PARTS:
        vals = [plan.breakdown[m][part] / GB for m in names]
        fig.add_bar(name=part.replace("_", " "), x=labels, y=vals, marker_color=colors[part],
                    hovertemplate="%{x}<br>" + part.replace("_", " ") + ": %{y:.2f} GB<extra></extra>")
    totals = [plan.total_gb(m) for m in names]
    fig.add_scatter(x=labels, y=totals, mode="text", text=[f"{v:.1f} GB" for v in totals],
                    textposition="top center", showlegend=False, hoverinfo="skip")
    fig.add_hline(y=plan.device_gb, line_dash="dash", line_color="black",
                  annotation_text=f"{plan.device_label}: {plan.device_gb:.1f} GB", annotation_position="top left")
    # Say on the chart what dominates, so the bars and the "NF4 saves X%" sentence beside them agree: on a small
    # model the activations (and the 16-bit embeddings) outweigh the linear weights 4-bit shrinks.
    b, full = plan.breakdown[plan.method], plan.breakdown["lora_16bit"]
    w4 = (b["weights"] + b["quant_constants"]) / GB
    w16 = full["weights"] / GB
    top = max(PARTS, key=lambda part: b[part])
    note = f"4-bit weights: {w4:.2f} GB vs {w16:.2f} GB in 16-bit"
    if top != "weights":
        note += f"<br>{top.replace('_', ' ')} ({b[top] / GB:.2f} GB) dominate this total"
    fig.add_annotation(text=note, xref="paper", yref="paper", x=0, y=-0.13, showarrow=False, xanchor="left",
                       yanchor="top", align="left", font={"size": 11})
    # Linear axis on purpose: a log axis would distort the stacked parts.
    fig.update_layout(barmode="stack", title={"text": f"{plan.shape.name}{plan.scope()}: {plan.total_gb():.1f} GB → "
                                                      f"{plan.verdict}",
                                              "font": {"size": 14}},
                      yaxis_title="GB", height=480, legend={"orientation": "h", "y": -0.3, "x": 0},
                      margin={"l": 50, "r": 10, "t": 50, "b": 130}, xaxis={"tickangle": 0, "automargin": True})
    return fig
