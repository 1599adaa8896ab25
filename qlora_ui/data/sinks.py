"""Where a reader's rows go. Every sink counts rows, drops and limits and keeps the first rows as a sample;
`ArrowSink` writes each row's JSON text and its origin ("line 7") into an Arrow file that `datasets` memory-maps
(prepare.py), `ListSink` keeps the rows as dicts for small uses (`read_records`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import MAX_DROPPED_EXAMPLES, MAX_RECORDS, DataError, DroppedRow

SAMPLE_ROWS = 200  # rows kept for format detection and the preview
COLUMN_ROWS = 1000  # rows whose keys make up the column list
BATCH_ROWS = 20_000  # rows per Arrow record batch
MAX_BROKEN = 1000  # unreadable rows listed by position in the report


class Sink:
    """Counts rows, drops and limits; keeps the first rows as a sample. Subclasses keep the rows."""

    def __init__(self, name: str, kind: str, max_rows: int = 0, max_records: int = MAX_RECORDS):
        self.name, self.kind = name, kind
        self.max_rows, self.max_records = max(0, int(max_rows or 0)), max_records
        self.n = 0  # rows kept
        self.rows_seen = 0  # rows kept + rows that could not be parsed
        self.dropped: Counter = Counter()
        self.dropped_examples: list[DroppedRow] = []
        self.warnings: list[str] = []
        self.columns: dict[str, None] = {}
        self.sample: list[dict] = []
        self.broken: list[str] = []  # where each unreadable row is ("line 7"), the first MAX_BROKEN of them
        self.tell: Callable[[], int] | None = None  # bytes of the file read so far, for a progress bar
        self.on_flush: Callable[[Sink], None] | None = None

    @property
    def full(self) -> bool:
        return bool(self.max_rows) and self.n >= self.max_rows

    def add(self, where: str, rec: Any, raw: str | None = None) -> None:
        self.rows_seen += 1
        if not isinstance(rec, dict):
            self.bad("malformed", f"a JSON {_json_type(rec)}, not an object with named fields", where)
            return
        if self.n >= self.max_records:
            raise _too_many(self.name, self.max_records)
        if self.n < COLUMN_ROWS:
            self.columns.update(dict.fromkeys(rec))
            if self.n < SAMPLE_ROWS:
                self.sample.append(rec)
        self.n += 1
        self.keep(where, rec, raw)

    def bad(self, reason: str, detail: str, where: str, counted: bool = True) -> None:
        if not counted:
            self.rows_seen += 1
        self.dropped[reason] += 1
        if len(self.broken) < MAX_BROKEN:
            self.broken.append(where)
        if len(self.dropped_examples) < MAX_DROPPED_EXAMPLES:
            self.dropped_examples.append(DroppedRow(self.rows_seen, reason, detail, where))

    def keep(self, where: str, rec: dict, raw: str | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ListSink(Sink):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records: list[dict] = []
        self.where: list[str] = []

    def keep(self, where: str, rec: dict, raw: str | None) -> None:
        self.records.append(rec)
        self.where.append(where)


class ArrowSink(Sink):
    """Rows as (`_where`, `_rec` JSON text) record batches in an Arrow stream file, the format `datasets`
    memory-maps; memory stays at one batch."""

    def __init__(self, path: Path, *a, **kw):
        import pyarrow as pa

        super().__init__(*a, **kw)
        self.schema = pa.schema([("_where", pa.string()), ("_rec", pa.string())])
        self.writer = pa.ipc.new_stream(str(path), self.schema)
        self._where: list[str] = []
        self._rec: list[str] = []

    def keep(self, where: str, rec: dict, raw: str | None) -> None:
        self._where.append(where)
        self._rec.append(raw if raw is not None else json.dumps(rec, ensure_ascii=False, default=str))
        if len(self._rec) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rec:
            self.writer.write_batch(pa.record_batch([pa.array(self._where, pa.string()),
                                                     pa.array(self._rec, pa.string())], schema=self.schema))
            self._where, self._rec = [], []
            if self.on_flush is not None:
                self.on_flush(self)

    def close(self) -> None:
        self._flush()
        self.writer.close()


def _json_type(v: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}.get(
        type(v), "null" if v is None else type(v).__name__)


def _too_many(name: str, max_records: int) -> DataError:
    return DataError(f"{name} has more than {max_records:,} rows, over the limit for one dataset. Set max_rows to "
                     "train on a subset, or split the file.")
