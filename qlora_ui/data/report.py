"""What the upload panel and `check-data` show about a dataset: counts, drops with their lines, token lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import DataError, DroppedRow


def _no_lengths() -> np.ndarray:
    return np.zeros(0, dtype=np.int32)


@dataclass
class DataReport:
    path: str = ""
    format: str = ""
    detected: bool = True  # the format came from detection (data_format "auto")
    columns: list[str] = field(default_factory=list)
    rows_read: int = 0  # rows in the file (valid or not), up to max_rows
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    token_lengths: Any = field(default_factory=_no_lengths)  # of kept rows: an int array (a million rows fit)
    trained_tokens: int = 0  # label tokens over kept rows
    max_length: int | None = None
    shortest_too_long: int | None = None
    n_train: int = 0
    n_eval: int = 0
    dropped_examples: list[DroppedRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    example: list[dict] | None = None  # first kept conversation
    example_segments: list[tuple[str, bool]] | None = None  # its (text, trained) preview, with a tokenizer
    preview_df: Any = field(default=None, repr=False)  # pandas DataFrame of the first raw rows
    broken: list[str] = field(default_factory=list)  # where each row that could not be read is ("line 7")
    sampled: bool = False  # counted on the file's first rows only (the upload preview's quick first answer)
    # What `sampled` says after the counts; the data panel's bounded inspection, which is not followed by a count
    # of the whole file, says so instead.
    sampled_note: str = " (the first rows only; counting the whole file...)"
    origin: str = ""  # a Hub dataset or folder: what was read, at which commit ("hf://o/n [train] @ 1a2b3c4d5e")

    def stats(self) -> dict[str, float]:
        """min/mean/median/p95/max token length of the kept rows (empty without a tokenizer)."""
        xs = np.sort(np.asarray(self.token_lengths, dtype=np.int64))
        if not len(xs):
            return {}
        p95 = int(xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)])
        return {"min": int(xs[0]), "mean": float(xs.mean()), "median": float(np.median(xs)), "p95": p95,
                "max": int(xs[-1])}

    def summary(self) -> str:
        how = "detected" if self.detected else "chosen"
        lines = ([f"Dataset: {self.origin}"] if self.origin else []) + [f"Format: {self.format} ({how})"]
        split = f" ({self.n_train} train / {self.n_eval} eval)" if self.n_train or self.n_eval else ""
        lines.append(f"Rows: {self.rows_read} read, {self.rows_kept} kept{split}"
                     + (self.sampled_note if self.sampled else ""))
        if self.dropped:
            parts = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
            lines.append(f"Dropped: {parts}")
            for d in self.dropped_examples[:3]:
                lines.append(f"  e.g. {d}")
        if self.broken:
            # Every broken line by its number (the first 20 here; the report keeps up to 1,000), to fix the file.
            shown = ", ".join(self.broken[:20]) + (", ..." if len(self.broken) > 20 else "")
            lines.append(f"Unreadable rows ({len(self.broken)}{'+' if len(self.broken) >= 1000 else ''}): {shown}")
        s = self.stats()
        if s:
            lines.append(f"Tokens per row: min {s['min']}, mean {s['mean']:.1f}, median {s['median']:g}, "
                         f"p95 {s['p95']}, max {s['max']}")
        if self.max_length is not None and (s or self.dropped.get("too_long")):
            over = self.dropped.get("too_long", 0)
            extra = f" (shortest {self.shortest_too_long} tokens)" if over and self.shortest_too_long else ""
            lines.append(f"Rows over max_length {self.max_length}: {over}{extra}")
        for w in self.warnings:
            lines.append(f"Warning: {w}")
        return "\n".join(lines)



def nothing_left(report: DataReport, name: str) -> DataError:
    d, total = report.dropped, report.rows_read
    if len(d) == 1:
        reason = next(iter(d))
        first = report.dropped_examples[0] if report.dropped_examples else None
        if reason == "too_long":
            return DataError(f"{name}: all {total} rows are longer than max_length {report.max_length} tokens "
                             f"(shortest is {report.shortest_too_long}): raise max_length or shorten the rows.")
        if reason == "empty":
            return DataError(f"{name}: all {total} rows are empty (no answer text to learn from). Check that the "
                             "right columns are used, or set column_map.")
        if reason == "no_trained_tokens":
            return DataError(f"{name}: no row has an assistant answer to train on. Check the format and roles.")
        return DataError(f"{name}: all {total} rows were dropped as {reason}" + (f", e.g. {first}" if first else "")
                         + ". Fix the rows, or pick the right format or column_map.")
    parts = ", ".join(f"{n} {r}" for r, n in d.items())
    return DataError(f"{name}: no usable rows remain out of {total} ({parts}). See the data check for examples, "
                     "and fix the file or the settings (format, column_map, max_length).")

