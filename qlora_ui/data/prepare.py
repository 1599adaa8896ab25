"""The whole pipeline: file -> Arrow rows -> conversations -> tokens with labels (stages.py, cached) -> the report's
numbers from Arrow columns -> shuffled train/eval split.

The shuffle and split are not cached: the same seeded permutation as ever over the kept rows, applied with
`Dataset.select` (no copy). max_length is applied here, to the stored lengths.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from .common import MAX_DROPPED_EXAMPLES, PREVIEW_ROWS, SUPPORTED, DataError, Drop, DroppedRow
from .formats import ColumnPlan, resolve_format
from .render import segments_for_preview, template_overhead
from .report import DataReport, nothing_left
from .sources import Source, source_for
from .stages import BATCH, RawRows, RowEncoder, Settings, load_rows, load_tokens, sample_rows

log = logging.getLogger(__name__)

_CONVERSION_DROPS = ("empty", "malformed")

# ---------------------------------------------------------------------------------------------------
# The report, the split, and the public entry points
# ---------------------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, labels, attention_mask (int lists), length
    eval: Any
    report: DataReport
    conversations: Sequence[list[dict]]  # kept rows, file order, for previews (built on access)


def _rows_dataset():
    """The `Rows` class, made on first use (importing datasets takes a second that `--help` should not pay), and
    registered as this module's `Rows` so that it pickles like any class."""
    if "Rows" in globals():
        return globals()["Rows"]
    from datasets import Dataset

    class Rows(Dataset):
        """A `Dataset` whose scalar columns come back as lists. `ds["length"]` is otherwise a lazy `Column` that
        reads one row per index, and the Trainer's length-grouped sampler indexes it a million times (measured:
        226 us each, 20 s of a 100,000-row start)."""

        def __getitem__(self, key):
            if isinstance(key, str) and key in self.column_names and not hasattr(self.features[key], "feature"):
                values = self.data.column(key).to_numpy()
                if self._indices is not None:
                    values = values[self._indices.column(0).to_numpy()]
                return values.tolist()
            return super().__getitem__(key)

    Rows.__qualname__ = "Rows"
    globals()["Rows"] = Rows
    return Rows


def _as_rows(ds):
    return _rows_dataset()(ds.data, info=ds.info, split=ds.split, indices_table=ds._indices,
                           fingerprint=ds._fingerprint)


class Conversations(Sequence):
    """The kept rows as conversations, built when asked for: a million of them would not fit in memory."""

    def __init__(self, rows, kept: np.ndarray, settings: Settings):
        self.rows, self.kept, self.settings = rows, kept, settings

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.settings.conversation(self.rows[int(self.kept[i])]["_rec"])


def _preview_df(records: list[dict], n: int = PREVIEW_ROWS):
    import pandas as pd

    def cell(v):
        if isinstance(v, (dict, list)):
            s = json.dumps(v, ensure_ascii=False)
            return s if len(s) <= 300 else s[:297] + "..."
        return v

    return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in records[:n]])


def _settings(raw: RawRows, data_format: str, column_map: dict | None, system_prompt: str,
              max_length: int | None, train_on_source: bool) -> tuple[Settings, DataReport]:
    """Map the columns and tell the format (from the sample), with the report filled up to that point."""
    plan = ColumnPlan(raw.columns, column_map)
    sample = [plan(r) for r in raw.sample]
    fmt, detected = resolve_format(sample, plan.columns, data_format)
    m = raw.meta
    report = DataReport(path="", format=fmt, detected=detected, columns=plan.columns, rows_read=m["rows_seen"],
                        dropped=dict(m["dropped"]), dropped_examples=raw.dropped_examples(),
                        warnings=list(m["warnings"]), broken=list(m.get("broken", [])))
    report.preview_df = _preview_df(sample)
    if plan.inferred:
        pairs = ", ".join(f"{src} → {dst}" for src, dst in plan.inferred.items())
        report.warnings.append(f"Read the columns as {pairs}: the user asks, the reply is trained. If that is "
                               "wrong, set the column map under 'Column mapping and options'.")
    if m.get("source"):
        report.origin = f"{m['name']} @ {str(m['revision'])[:12]}"
    return Settings(fmt, plan, system_prompt or "", max_length, train_on_source), report


def _column(ds, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy()


def _summarize(rows, toks, report: DataReport, with_tokens: bool, max_length: int | None = None) -> np.ndarray:
    """Fill the report from the stage-2 columns (max_length applied here); the kept row indices (file order)."""
    reasons = np.asarray(toks.data.column("_drop").fill_null("").to_numpy(zero_copy_only=False), dtype=object)
    length = _column(toks, "length") if with_tokens else None
    too_long = np.zeros(len(reasons), dtype=bool)
    if with_tokens and max_length is not None:
        # Checked before "no trained tokens", as the per-row order always was; template errors have no length.
        too_long = (length > max_length) & np.isin(reasons, ("", "no_trained_tokens"))
        reasons[too_long] = "too_long"
    kept = np.flatnonzero(reasons == "")
    dropped = Counter(report.dropped)
    values, counts = np.unique(reasons[reasons != ""], return_counts=True)
    dropped.update(dict(zip(map(str, values), map(int, counts))))
    report.dropped = dict(dropped)
    examples = list(report.dropped_examples)
    # Reading drops first, then conversion drops, then tokenization drops: the order the pipeline meets them.
    for stage in (np.isin(reasons, _CONVERSION_DROPS), ~np.isin(reasons, ("", *_CONVERSION_DROPS))):
        room = MAX_DROPPED_EXAMPLES - len(examples)
        if room <= 0:
            break
        for i in np.flatnonzero(stage)[:room]:
            i = int(i)
            detail = f"{length[i]} tokens > max_length {max_length}" if too_long[i] else toks[i]["_detail"]
            examples.append(DroppedRow(i + 1, str(reasons[i]), detail, rows[i]["_where"]))
    report.dropped_examples = examples
    report.rows_kept = len(kept)
    if with_tokens:
        report.token_lengths = length[kept].astype(np.int32)
        report.trained_tokens = int(_column(toks, "trained")[kept].sum())
        report.shortest_too_long = int(length[too_long].min()) if too_long.any() else None
    return kept


def _check_overhead(tokenizer, fmt: str, system_prompt: str, max_length: int) -> None:
    overhead = template_overhead(tokenizer, fmt, system_prompt)
    if overhead and max_length <= overhead:
        raise DataError(f"max_length {max_length} is smaller than the chat template's own overhead: an empty "
                        f"exchange already takes {overhead} tokens (markers and any default system prompt). "
                        f"Raise max_length well above {overhead}, e.g. to {max(64, 4 * overhead)}.")


def _no_dataset() -> DataError:
    return DataError(f"No dataset given. Choose a file ({SUPPORTED}).")


def check_file(cfg: DataConfig, *, max_bytes: int | None = None) -> str:
    """Read, map and detect the dataset without tokenizing: the same DataError the upload panel shows, raised
    before a run folder exists (a file already rejected in the panel must not start a run). Returns the format."""
    if not cfg.data_path:
        raise _no_dataset()
    raw = load_rows(cfg.data_path, cfg.max_rows, max_bytes=max_bytes, source=source_for(cfg))
    settings, report = _settings(raw, cfg.data_format, cfg.column_map, cfg.system_prompt, None, False)
    rows = raw.dataset()
    # One usable row settles it; only a file whose first rows are all unusable is converted in full.
    for rec in rows.select(range(min(len(rows), BATCH)))["_rec"]:
        try:
            settings.conversation(rec)
            return settings.fmt
        except Drop:
            continue
    toks = load_tokens(raw, settings, None)
    if not len(_summarize(rows, toks, report, with_tokens=False)):
        raise nothing_left(report, Path(cfg.data_path).name)
    return settings.fmt


def prepare_dataset(cfg: DataConfig, tokenizer, seed: int, *, max_bytes: int | None = None) -> PreparedData:
    """The tokenized train/eval rows for a data config, or a DataError saying why there are none."""
    if not cfg.data_path:
        raise _no_dataset()
    raw = load_rows(cfg.data_path, cfg.max_rows, max_bytes=max_bytes, source=source_for(cfg))
    settings, report = _settings(raw, cfg.data_format, cfg.column_map, cfg.system_prompt, cfg.max_length,
                                 cfg.train_on_source)
    report.path = str(cfg.data_path)
    report.max_length = cfg.max_length
    _check_overhead(tokenizer, settings.fmt, cfg.system_prompt, cfg.max_length)
    rows = raw.dataset()
    toks = load_tokens(raw, settings, tokenizer)
    kept = _summarize(rows, toks, report, with_tokens=True, max_length=cfg.max_length)
    if not len(kept):
        raise nothing_left(report, Path(cfg.data_path).name)
    conversations = Conversations(rows, kept, settings)
    report.example = conversations[0]
    # The same seeded shuffle as ever (random.Random over the kept rows), so splits and benches stay comparable.
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    shuffled = kept[np.asarray(order, dtype=np.int64)]
    n_eval = 0
    if cfg.eval_fraction > 0 and len(kept) >= 2:
        n_eval = min(len(kept) - 1, max(1, round(len(kept) * cfg.eval_fraction)))
    cols = toks.select_columns(["input_ids", "labels", "attention_mask", "length"])
    report.n_eval, report.n_train = n_eval, len(kept) - n_eval
    return PreparedData(train=_as_rows(cols.select(shuffled[n_eval:])), eval=_as_rows(cols.select(shuffled[:n_eval])),
                        report=report, conversations=conversations)


def inspect_file(path: str | Path, tokenizer=None, data_format: str = "auto", column_map: dict | None = None,
                 max_length: int = 512, system_prompt: str = "", train_on_source: bool = False,
                 max_rows: int = 0, *, max_bytes: int | None = None, sample: int = 0,
                 source: Source | None = None) -> DataReport:
    """Everything the upload panel and `check-data` show about a file, without building the split.

    Raises DataError when the file cannot be read or its format told; rows that would be dropped are
    counted in the report instead (a file whose rows are all too long gives a report, not an error).
    Without a tokenizer there are no token statistics and no length check. `sample=N` looks at the first N
    rows only, in memory and uncached (the upload preview's first answer); `report.sampled` says so. `source`: a
    Hub dataset or dataset folder with its subset, split and revision (sources.py); `path` names one otherwise.
    """
    if sample:
        raw = sample_rows(path, min(sample, max_rows) if max_rows else sample, max_bytes=max_bytes, source=source)
    else:
        raw = load_rows(path, max_rows, max_bytes=max_bytes, source=source)
    try:
        settings, report = _settings(raw, data_format, column_map, system_prompt, max_length, train_on_source)
    except DataError:
        limit = min(sample, max_rows) if sample and max_rows else sample or max_rows
        pairs = _as_preferences(path, raw, tokenizer, data_format, column_map, max_length, system_prompt, limit,
                                source)
        if pairs is None:
            raise
        pairs.sampled = bool(sample) and pairs.rows_read >= limit
        return pairs
    report.path = str(path)
    report.sampled = bool(sample) and raw.meta["rows"] >= (min(sample, max_rows) if max_rows else sample)
    if tokenizer is not None:
        report.max_length = max_length
        try:
            _check_overhead(tokenizer, settings.fmt, system_prompt, max_length)
        except DataError as e:
            report.warnings.append(str(e))
    if sample:
        from datasets import Dataset
        from datasets.table import InMemoryTable

        recs = [json.dumps(r, ensure_ascii=False, default=str) for r in raw.meta["records"]]
        rows = Dataset.from_dict({"_where": raw.meta["where"], "_rec": recs})
        toks = Dataset(InMemoryTable(RowEncoder(settings, tokenizer)(rows[:])))
    else:
        rows = raw.dataset()
        toks = load_tokens(raw, settings, tokenizer)
    kept = _summarize(rows, toks, report, with_tokens=tokenizer is not None, max_length=max_length)
    convs = Conversations(rows, kept, settings)
    if len(kept):
        report.example = convs[0]
    else:
        report.example = _first_conversation(rows, settings)  # still show what a row looks like, if too long
    if tokenizer is not None and report.example is not None:
        try:
            report.example_segments = segments_for_preview(report.example, tokenizer, train_on_source)
        except Exception as e:  # noqa: BLE001 - the preview is optional; the drop was already counted
            log.debug("no preview: %s", e)
    return report


def _as_preferences(path, raw: RawRows, tokenizer, data_format: str, column_map: dict | None, max_length: int,
                    system_prompt: str, max_rows: int, source: Source | None) -> DataReport | None:
    """A file (or Hub dataset) of preference pairs that no SFT format reads: its preference report, as method dpo
    and orpo would read it, with a note saying so; `check-data` has no method setting, and a pairs file there used
    to end in "Cannot tell the dataset format". None when it does not hold pairs (the SFT error stands)."""
    if data_format != "auto" or not {"chosen", "rejected"} <= set(ColumnPlan(raw.columns, column_map).columns):
        return None
    from ..config import DataConfig
    from .preference import inspect_preferences

    src = source if source is not None else source_for(DataConfig(data_path=str(path)))
    cfg = DataConfig(data_path=str(path), column_map=column_map or {}, max_length=max_length,
                     system_prompt=system_prompt or "", max_rows=max_rows or 0,
                     **({"data_config": src.config, "data_split": src.split, "data_revision": src.revision}
                        if src is not None else {}))
    report = inspect_preferences(cfg, tokenizer)
    report.warnings.append("These rows are preference pairs ('chosen' and 'rejected'): train them with method dpo "
                           "or orpo (--method dpo); method sft cannot use them.")
    return report


def _first_conversation(rows, settings: Settings) -> list[dict] | None:
    for rec in rows.select(range(min(len(rows), BATCH)))["_rec"]:
        try:
            return settings.conversation(rec)
        except Drop:
            continue
    return None
