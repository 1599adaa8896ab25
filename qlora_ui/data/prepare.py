"""The whole pipeline, cached: file -> Arrow rows -> conversations -> tokens with labels -> shuffled split.

Two cached stages under ~/.cache/qlora-studio/data (QLORA_STUDIO_CACHE), each a folder named by a fingerprint:

- `raw-<key>`: the file's rows as Arrow (reading.py), keyed by the sha256 of the file's bytes, its name and
  max_rows. Reading is one streaming pass; a million-row JSONL is never a list of dicts.
- `tok-<key>`: per row, input_ids / labels / attention_mask / length, or why it was dropped; keyed by the raw
  key and every setting that changes the result (format, column map, system prompt, max_length,
  train_on_source, the tokenizer and its chat template). Built with `Dataset.map` (batched, one process per
  core), so a second start, a resume, or another rank of a multi-process run loads it in a second.

A stage is built in a temporary folder and renamed into place (an interrupted build never looks complete),
under a file lock, so the ranks of a multi-process run wait for one build instead of each doing it.
The shuffle and split are not cached: a seeded permutation of the kept rows, `Dataset.select` (no copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from .common import (
    IGNORE_INDEX,
    MAX_DROPPED_EXAMPLES,
    PREVIEW_ROWS,
    SUPPORTED,
    DataError,
    Drop,
    DroppedRow,
    data_cache_dir,
)
from .formats import ColumnPlan, conversation_of, resolve_format
from .reading import ArrowSink, ListSink, Sink, file_digest, file_kind, read_into
from .render import encode_many, segments_for_preview, template_overhead
from .report import DataReport, nothing_left

log = logging.getLogger(__name__)

PIPELINE_VERSION = "2"  # part of every cache key: bump when reading or encoding changes what a stage holds
BATCH = 1000  # rows per map batch
PARALLEL_FROM = 20_000  # rows from which the map uses one process per core (below, start-up costs more)
KEEP_STAGES = 24  # cached stages kept; the oldest are removed beyond that
_CONVERSION_DROPS = ("empty", "malformed")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([PIPELINE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


def _num_proc(rows: int) -> int | None:
    env = os.environ.get("QLORA_DATA_PROC")
    n = int(env) if env else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return n if (n or 1) > 1 and rows >= PARALLEL_FROM else None


def _need_disk(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DataError(f"Not enough free disk for {what}: it needs about {need / 2**30:.1f} GB in {folder}, which "
                        f"has {free / 2**30:.1f} GB free. Free some space, or point QLORA_STUDIO_CACHE at a larger "
                        "disk.")


def _lock(key: str):
    from filelock import FileLock

    locks = data_cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{key}.lock"))


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished stage into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(final.parent)


def _prune(root: Path) -> None:
    stages = sorted((p for p in root.iterdir() if p.is_dir() and p.name[:4] in ("raw-", "tok-")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in stages[KEEP_STAGES:]:
        shutil.rmtree(old, ignore_errors=True)  # open memory maps of it stay valid until closed
    for tmp in root.glob(".tmp-*"):  # builds that died midway, an hour ago or more
        if time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)  # recently used stages are the last to be pruned
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------
# Stage 1: the file's rows in Arrow
# ---------------------------------------------------------------------------------------------------

@dataclass
class RawRows:
    """The rows of one file (as JSON text with their origin), plus what reading found."""

    folder: Path
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return self.meta["key"]

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_file(str(self.folder / "rows.arrow"))

    @property
    def columns(self) -> list[str]:
        return self.meta["columns"]

    @property
    def sample(self) -> list[dict]:
        return self.meta["sample"]

    def dropped_examples(self) -> list[DroppedRow]:
        return [DroppedRow(*d) for d in self.meta["dropped_examples"]]


def _meta_of(sink: Sink, key: str, digest: str) -> dict[str, Any]:
    return {"key": key, "sha256": digest, "name": sink.name, "kind": sink.kind, "rows": sink.n,
            "rows_seen": sink.rows_seen, "dropped": dict(sink.dropped),
            "dropped_examples": [list(d) for d in sink.dropped_examples], "warnings": sink.warnings,
            "columns": list(sink.columns), "sample": sink.sample, "broken": sink.broken}


def load_rows(path: str | Path, max_rows: int = 0, *, max_bytes: int | None = None,
              on_progress: Callable[[float], None] | None = None) -> RawRows:
    """The file's rows from the cache, or read into it (one streaming pass, then renamed into place)."""
    p, kind, size = file_kind(path, max_bytes=max_bytes)
    digest = file_digest(p)
    key = _key("raw", digest, p.name, kind, int(max_rows or 0))
    root = data_cache_dir()
    final = root / f"raw-{key}"
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _lock(key):
            if not (final / "meta.json").is_file():
                # Rows are stored as their JSON text: about the file's size again.
                _need_disk(root, int(size * 1.3) + 64 * 2**20, f"the prepared copy of {p.name}")
                tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir(parents=True)
                try:
                    sink = read_into(p, lambda name, kind: ArrowSink(tmp / "rows.arrow", name, kind, max_rows),
                                     max_bytes=max_bytes)
                    (tmp / "meta.json").write_text(json.dumps(_meta_of(sink, key, digest), default=str))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                _publish(tmp, final)
    _touch(final)
    return RawRows(final, json.loads((final / "meta.json").read_text()))


def sample_rows(path: str | Path, rows: int, *, max_bytes: int | None = None) -> RawRows:
    """The first `rows` rows, in memory and uncached: what the upload preview shows within seconds."""
    sink = read_into(path, lambda name, kind: _SampleSink(name, kind, rows), max_bytes=max_bytes)
    meta = _meta_of(sink, "", "")
    return RawRows(Path(), {**meta, "records": sink.records, "where": sink.where})


class _SampleSink(ListSink):
    pass


# ---------------------------------------------------------------------------------------------------
# Stage 2: conversations and tokens
# ---------------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """What in a tokenizer changes the tokens: its vocabulary and rules, special tokens and chat template."""
    if tokenizer is None:
        return "none"
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    bt = getattr(tokenizer, "backend_tokenizer", None)
    if bt is not None:
        h.update(bt.to_str().encode())
    else:
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    for part in (getattr(tokenizer, "chat_template", None), tokenizer.eos_token, tokenizer.bos_token,
                 sorted(getattr(tokenizer, "all_special_tokens", []) or [])):
        h.update(json.dumps(part, default=str).encode())
    return h.hexdigest()


@dataclass
class Settings:
    """Everything besides the file that decides what a row becomes."""

    fmt: str
    plan: ColumnPlan
    system_prompt: str = ""
    max_length: int | None = None
    train_on_source: bool = False

    def conversation(self, rec_json: str) -> list[dict]:
        return conversation_of(self.plan(json.loads(rec_json)), self.fmt, self.system_prompt)


class RowEncoder:
    """The `Dataset.map` function: a batch of JSON rows -> an Arrow table of tokens or drop reasons.

    A class, not a closure, so that the map's worker processes receive it (tokenizer included) pickled."""

    def __init__(self, settings: Settings, tokenizer):
        self.s, self.tokenizer = settings, tokenizer

    def __call__(self, batch: dict[str, list]) -> Any:
        import pyarrow as pa

        recs = batch["_rec"]
        n = len(recs)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        convs, at = [], []
        for k, rec in enumerate(recs):
            try:
                convs.append(self.s.conversation(rec))
                at.append(k)
            except Drop as d:
                reason[k], detail[k] = d.reason, d.detail
        if self.tokenizer is None:
            return pa.table({"_drop": pa.array(reason, pa.string()), "_detail": pa.array(detail, pa.string())})
        empty = np.zeros(0, np.int32)
        ids_of, labels_of = [empty] * n, [empty] * n
        length, trained = np.zeros(n, np.int32), np.zeros(n, np.int32)
        max_length = self.s.max_length
        for k, res in zip(at, encode_many(convs, self.tokenizer, self.s.train_on_source)):
            if isinstance(res, Drop):
                reason[k], detail[k] = res.reason, res.detail
                continue
            if isinstance(res, BaseException):  # the model's template refused this row (e.g. roles must alternate)
                reason[k], detail[k] = "template_error", f"{type(res).__name__}: {str(res)[:150]}"
                continue
            ids, labels = res
            length[k] = len(ids)
            if max_length is not None and len(ids) > max_length:
                reason[k], detail[k] = "too_long", f"{len(ids)} tokens > max_length {max_length}"
                continue
            t = int(np.count_nonzero(labels != IGNORE_INDEX))
            if t == 0:
                reason[k], detail[k] = "no_trained_tokens", "no token is trained"
                continue
            ids_of[k], labels_of[k], trained[k] = ids, labels, t
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(x) for x in ids_of])]).astype(np.int32))
        flat_ids = np.concatenate(ids_of)
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(labels_of), pa.int32())),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(len(flat_ids), np.int8))),
            "length": pa.array(length), "trained": pa.array(trained),
            "_drop": pa.array(reason, pa.string()), "_detail": pa.array(detail, pa.string())})


def load_tokens(raw: RawRows, settings: Settings, tokenizer):
    """Stage 2 for these rows and settings: from the cache, or built with `Dataset.map` and renamed into place."""
    from datasets import Dataset, concatenate_datasets

    key = _key("tok", raw.key, settings.fmt, settings.plan.column_map, settings.system_prompt,
               settings.max_length if tokenizer is not None else None, settings.train_on_source,
               tokenizer_fingerprint(tokenizer))
    root = data_cache_dir()
    final = root / f"tok-{key}"
    if not (final / "meta.json").is_file():
        with _lock(key):
            if not (final / "meta.json").is_file():
                rows = raw.dataset()
                arrow_bytes = (raw.folder / "rows.arrow").stat().st_size
                _need_disk(root, 2 * arrow_bytes + 64 * 2**20, "the tokenized dataset")
                tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir(parents=True)
                try:
                    out = rows.map(RowEncoder(settings, tokenizer), batched=True, batch_size=BATCH,
                                   input_columns=None, remove_columns=rows.column_names,
                                   num_proc=_num_proc(len(rows)), cache_file_name=str(tmp / "rows.arrow"),
                                   new_fingerprint=key, desc="Preparing dataset")
                    files = [Path(f["filename"]).name for f in out.cache_files]
                    del out
                    (tmp / "meta.json").write_text(json.dumps({"key": key, "files": files}))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                _publish(tmp, final)
    _touch(final)
    files = json.loads((final / "meta.json").read_text())["files"]
    parts = [Dataset.from_file(str(final / f)) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


# ---------------------------------------------------------------------------------------------------
# The report, the split, and the public entry points
# ---------------------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, labels, attention_mask (int lists), length
    eval: Any
    report: DataReport
    conversations: Sequence[list[dict]]  # kept rows, file order, for previews (built on access)


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
    return Settings(fmt, plan, system_prompt or "", max_length, train_on_source), report


def _column(ds, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy()


def _summarize(rows, toks, report: DataReport, with_tokens: bool) -> np.ndarray:
    """Fill the report from the stage-2 columns; the kept row indices (file order)."""
    import pyarrow.compute as pc

    drop = toks.data.column("_drop")
    kept = np.flatnonzero(pc.is_null(drop).to_numpy(zero_copy_only=False))
    reasons = np.asarray(drop.fill_null("").to_numpy(zero_copy_only=False), dtype=object)
    dropped = Counter(report.dropped)
    counts = pc.value_counts(drop.drop_null())
    for item in counts.to_pylist():
        dropped[item["values"]] += item["counts"]
    report.dropped = dict(dropped)
    examples = list(report.dropped_examples)
    # Reading drops first, then conversion drops, then tokenization drops: the order the pipeline meets them.
    for stage in (np.isin(reasons, _CONVERSION_DROPS), ~np.isin(reasons, ("", *_CONVERSION_DROPS))):
        room = MAX_DROPPED_EXAMPLES - len(examples)
        if room <= 0:
            break
        for i in np.flatnonzero(stage)[:room]:
            i = int(i)
            examples.append(DroppedRow(i + 1, reasons[i], toks[i]["_detail"], rows[i]["_where"]))
    report.dropped_examples = examples
    report.rows_kept = len(kept)
    if with_tokens:
        length = _column(toks, "length")
        report.token_lengths = length[kept].astype(np.int32)
        report.trained_tokens = int(_column(toks, "trained")[kept].sum())
        too_long = reasons == "too_long"
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
    raw = load_rows(cfg.data_path, cfg.max_rows, max_bytes=max_bytes)
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
    raw = load_rows(cfg.data_path, cfg.max_rows, max_bytes=max_bytes)
    settings, report = _settings(raw, cfg.data_format, cfg.column_map, cfg.system_prompt, cfg.max_length,
                                 cfg.train_on_source)
    report.path = str(cfg.data_path)
    report.max_length = cfg.max_length
    _check_overhead(tokenizer, settings.fmt, cfg.system_prompt, cfg.max_length)
    rows = raw.dataset()
    toks = load_tokens(raw, settings, tokenizer)
    kept = _summarize(rows, toks, report, with_tokens=True)
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
    return PreparedData(train=cols.select(shuffled[n_eval:]), eval=cols.select(shuffled[:n_eval]), report=report,
                        conversations=conversations)


def inspect_file(path: str | Path, tokenizer=None, data_format: str = "auto", column_map: dict | None = None,
                 max_length: int = 512, system_prompt: str = "", train_on_source: bool = False,
                 max_rows: int = 0, *, max_bytes: int | None = None, sample: int = 0) -> DataReport:
    """Everything the upload panel and `check-data` show about a file, without building the split.

    Raises DataError when the file cannot be read or its format told; rows that would be dropped are
    counted in the report instead (a file whose rows are all too long gives a report, not an error).
    Without a tokenizer there are no token statistics and no length check. `sample=N` looks at the first N
    rows only, in memory and uncached (the upload preview's first answer); `report.sampled` says so.
    """
    if sample:
        raw = sample_rows(path, min(sample, max_rows) if max_rows else sample, max_bytes=max_bytes)
    else:
        raw = load_rows(path, max_rows, max_bytes=max_bytes)
    settings, report = _settings(raw, data_format, column_map, system_prompt, max_length, train_on_source)
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
    kept = _summarize(rows, toks, report, with_tokens=tokenizer is not None)
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


def _first_conversation(rows, settings: Settings) -> list[dict] | None:
    for rec in rows.select(range(min(len(rows), BATCH)))["_rec"]:
        try:
            return settings.conversation(rec)
        except Drop:
            continue
    return None
