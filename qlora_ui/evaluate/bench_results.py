"""Benchmark results on disk and as a table: RUN/eval/<timestamp>.json (written then renamed), the run's past
results, and the table of each model's metrics with stderr and the difference from its base (the CLI prints it, the
Evaluate tab shows it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import RunError
from ..runs import RunDir, atomic_write_text

EVAL_DIR = "eval"


def eval_dir(run: RunDir) -> Path:
    return run.path / EVAL_DIR


def write_result(run: RunDir, record: dict) -> Path:
    """RUN/eval/<timestamp>.json, written then renamed (a reader never sees half a result)."""
    d = eval_dir(run)
    d.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = d / f"{stamp}.json", 1
    while path.exists():  # two evaluations in one second
        n += 1
        path = d / f"{stamp}-{n}.json"
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def list_results(run: RunDir) -> list[Path]:
    """A run's saved evaluations, newest first."""
    d = eval_dir(run)
    return sorted(d.glob("*.json"), key=lambda p: p.name, reverse=True) if d.is_dir() else []


def read_result(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{Path(path).name} is not a readable evaluation result ({e}). Delete it or run the "
                       "evaluation again.") from None
    if not isinstance(record, dict) or not isinstance(record.get("models"), list):
        raise RunError(f"{Path(path).name} is not an evaluation result. Delete it or run the evaluation again.")
    return record


COLUMNS = ("model", "task", "metric", "value", "stderr", "delta")
HEADERS = ("Model", "Task", "Metric", "Value", "± stderr", "Δ vs base")


def result_rows(record: dict) -> list[dict]:
    """One row per model, task and metric: base first, then each adapter with its difference from its base."""
    delta = {(d["model"], d["task"], d["metric"]): d["delta"] for d in record.get("difference", [])}
    rows = []
    for m in record["models"]:
        for task, metrics in m.get("metrics", {}).items():
            for metric, got in metrics.items():
                rows.append({"model": m["label"], "task": task, "metric": metric, "value": got["value"],
                             "stderr": got["stderr"], "delta": delta.get((m["label"], task, metric))})
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def table_lines(record: dict) -> list[list[str]]:
    """The result table as text cells (the CLI prints it, the tab shows it)."""
    return [[r["model"], r["task"], r["metric"], _fmt(r["value"]), _fmt(r["stderr"]), _fmt(r["delta"], True)]
            for r in result_rows(record)]


def format_table(record: dict) -> str:
    lines = [list(HEADERS), *table_lines(record)]
    widths = [max(len(row[i]) for row in lines) for i in range(len(HEADERS))]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)
