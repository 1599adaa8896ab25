"""The two cached stages of preparing a dataset, under ~/.cache/qlora-studio/data (QLORA_DATA_CACHE), each a folder
named by a fingerprint:

- `raw-<key>`: the file's rows as Arrow (reading.py), keyed by the sha256 of the file's bytes, its name and
  max_rows. Reading is one streaming pass; a million-row JSONL is never a list of dicts.
- `tok-<key>`: per row, input_ids / labels / attention_mask / length, or why it was dropped; keyed by the raw
  key and every setting that changes the tokens (format, column map, system prompt, train_on_source, the
  tokenizer and its chat template). Built with `Dataset.map` (batched, one process per core), so a second
  start, a resume, or another rank of a multi-process run loads it in a second. max_length is not in the key:
  it is applied to the stored lengths, so `check-data` and `train` share one build, and moving the max_length
  slider re-counts a million rows in a moment instead of tokenizing them again.

A stage is built in a temporary folder and renamed into place (an interrupted build never looks complete),
under a file lock, so the ranks of a multi-process run wait for one build instead of each doing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import IGNORE_INDEX, DataError, Drop, DroppedRow, data_cache_dir
from .files import file_digest, file_kind
from .formats import ColumnPlan, conversation_of
from .reading import read_into
from .render import encode_many
from .sinks import ArrowSink, ListSink, Sink
from .sources import Source, load_split, preview_rows, source_of

PIPELINE_VERSION = "3"  # part of every cache key: bump when reading or encoding changes what a stage holds
BATCH = 1000  # rows per map batch
PARALLEL_FROM = 20_000  # rows from which the map uses one process per core (below, start-up costs more)
KEEP_STAGES = 24  # cached stages kept; the oldest are removed beyond that


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
                        f"has {free / 2**30:.1f} GB free. Free some space, or point QLORA_DATA_CACHE at a larger "
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
    now = time.time()
    for tmp in root.glob(".tmp-*"):  # builds that died midway, an hour ago or more
        if now - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)
    for lock in root.glob("locks/*.lock"):
        # A lock whose stage is built (or a day old) guards nothing any more; one in use must stay.
        built = (root / f"raw-{lock.stem}").exists() or (root / f"tok-{lock.stem}").exists()
        try:
            if built or now - lock.stat().st_mtime > 86400:
                lock.unlink()
        except OSError:
            pass


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)  # recently used stages are the last to be pruned
    except OSError:
        pass


def _stage(name: str, key: str, need: int, what: str, build: Callable[[Path], None]) -> Path:
    """The cached stage folder `name` (raw-<key>, tok-<key>), built by `build(tmp)` when missing: under a file lock
    (another thread or rank waits, then finds it built), with `need` bytes of free disk checked first, into a
    temporary folder renamed into place once `build` has written its meta.json (an interrupted build never looks
    complete, and leaves no partial folder)."""
    root = data_cache_dir()
    final = root / name
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _lock(key):
            if not (final / "meta.json").is_file():
                _need_disk(root, need, what)
                tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir(parents=True)
                try:
                    build(tmp)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                _publish(tmp, final)
    _touch(final)
    return final


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
              on_progress: Callable[[float], None] | None = None, source: Source | None = None) -> RawRows:
    """The file's rows from the cache, or read into it (one streaming pass, then renamed into place). A Hub
    dataset or a dataset folder (`source`, or a path naming one) is opened through `datasets` (sources.py) and
    its rows stored the same way."""
    src = source if source is not None else source_of(str(path))
    if src is not None:
        return _load_source_rows(src, max_rows, max_bytes=max_bytes)
    p, kind, size = file_kind(path, max_bytes=max_bytes)
    digest = file_digest(p)
    key = _key("raw", digest, p.name, kind, int(max_rows or 0))

    def build(tmp: Path) -> None:
        bar = _ReadProgress(size, p.name)
        try:
            sink = read_into(p, bar.sink_factory(tmp / "rows.arrow", max_rows), max_bytes=max_bytes)
            (tmp / "meta.json").write_text(json.dumps(_meta_of(sink, key, digest), default=str))
        finally:
            bar.close()

    # Rows are stored as their JSON text: about the file's size again.
    final = _stage(f"raw-{key}", key, int(size * 1.3) + 64 * 2**20, f"the prepared copy of {p.name}", build)
    return RawRows(final, json.loads((final / "meta.json").read_text()))


def _load_source_rows(src: Source, max_rows: int, *, max_bytes: int | None) -> RawRows:
    """Stage 1 for a Hub dataset or a dataset folder: its split's rows into the same Arrow rows as a file's, keyed by
    the commit (hub) or the files' sha256 (folder), so the format detection, report and token cache are shared."""
    loaded = load_split(src, max_bytes=max_bytes)
    ds = loaded.dataset
    key = _key("raw", "source", src.kind, src.ref, src.config, src.split, loaded.revision, int(max_rows or 0))

    def build(tmp: Path) -> None:
        sink = ArrowSink(tmp / "rows.arrow", src.shown, "dataset", max_rows)
        try:
            for batch in ds.with_format("arrow").iter(batch_size=BATCH):  # honours a select()
                for rec in batch.to_pylist():
                    if sink.full:
                        break
                    sink.add(f"row {sink.rows_seen + 1}", rec)
        finally:
            sink.close()
        if not sink.n:
            raise DataError(f"{src.shown} holds no rows. Pick another split or subset.")
        meta = _meta_of(sink, key, loaded.revision)
        # What the run's dataset.json records: where the rows came from, and a digest of the rows themselves (the
        # same rows always write the same Arrow bytes).
        meta.update(source={"kind": src.kind, "ref": src.ref, "config": src.config, "split": src.split},
                    revision=loaded.revision, fingerprint=file_digest(tmp / "rows.arrow"))
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))

    final = _stage(f"raw-{key}", key, int(loaded.size * 1.3) + 64 * 2**20, f"the prepared copy of {src.shown}",
                   build)
    return RawRows(final, json.loads((final / "meta.json").read_text()))


class _ReadProgress:
    """A tqdm bar over the file's bytes while it is read (the upload panel shows it through Gradio's tqdm tracking;
    on a terminal it is the usual bar; elsewhere it stays quiet)."""

    def __init__(self, size: int, name: str):
        from tqdm import tqdm

        self.bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"Reading {name}", disable=None)
        self.done = 0

    def sink_factory(self, path: Path, max_rows: int) -> Callable[[str, str], Sink]:
        def make(name: str, kind: str) -> Sink:
            sink = ArrowSink(path, name, kind, max_rows)
            sink.on_flush = self.flushed
            return sink
        return make

    def flushed(self, sink: Sink) -> None:
        try:
            pos = sink.tell() if sink.tell is not None else 0
        except (OSError, ValueError):  # the last batch is written after the reader closed the file
            pos = self.bar.total
        if pos > self.done:
            self.bar.update(pos - self.done)
            self.done = pos

    def close(self) -> None:
        self.bar.close()


def sample_rows(path: str | Path, rows: int, *, max_bytes: int | None = None, source: Source | None = None) -> RawRows:
    """The first `rows` rows, in memory and uncached: what the upload preview shows within seconds (a Hub dataset's
    streamed, before its download)."""
    src = source if source is not None else source_of(str(path))
    if src is not None:
        sink = ListSink(src.shown, "dataset", rows)
        for rec in preview_rows(src, rows):
            sink.add(f"row {sink.rows_seen + 1}", rec)
        meta = _meta_of(sink, "", "")
        return RawRows(Path(), {**meta, "records": sink.records, "where": sink.where})
    sink = read_into(path, lambda name, kind: ListSink(name, kind, rows), max_bytes=max_bytes)
    meta = _meta_of(sink, "", "")
    return RawRows(Path(), {**meta, "records": sink.records, "where": sink.where})



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
        for k, res in zip(at, encode_many(convs, self.tokenizer, self.s.train_on_source)):
            if isinstance(res, Drop):
                reason[k], detail[k] = res.reason, res.detail
                continue
            if isinstance(res, BaseException):  # the model's template refused this row (e.g. roles must alternate)
                reason[k], detail[k] = "template_error", f"{type(res).__name__}: {str(res)[:150]}"
                continue
            ids, labels = res
            length[k] = len(ids)  # also for rows dropped below: max_length is applied later, to this column
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
               settings.train_on_source, tokenizer_fingerprint(tokenizer))

    def build(tmp: Path) -> None:
        rows = raw.dataset()
        out = rows.map(RowEncoder(settings, tokenizer), batched=True, batch_size=BATCH, input_columns=None,
                       remove_columns=rows.column_names, num_proc=_num_proc(len(rows)),
                       cache_file_name=str(tmp / "rows.arrow"), new_fingerprint=key, desc="Preparing dataset")
        files = [Path(f["filename"]).name for f in out.cache_files]
        del out
        (tmp / "meta.json").write_text(json.dumps({"key": key, "files": files}))

    arrow_bytes = (raw.folder / "rows.arrow").stat().st_size
    final = _stage(f"tok-{key}", key, 2 * arrow_bytes + 64 * 2**20, "the tokenized dataset", build)
    files = json.loads((final / "meta.json").read_text())["files"]
    parts = [Dataset.from_file(str(final / f)) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
