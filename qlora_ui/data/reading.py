"""Read a dataset file row by row, never holding the whole file as Python objects.

One pass over the bytes (`sniff`) settles the encoding and catches binary or renamed files; then a
streaming reader per file type yields rows to a sink. `ArrowSink` writes each row's JSON text and its
origin ("line 7") into an Arrow file that `datasets` memory-maps (prepare.py); `ListSink` keeps the rows
as dicts for small uses (`read_records`). Lines that do not parse are counted as 'malformed' with their
line number; the file itself is refused with a one-paragraph `DataError` when nothing can be read.

Rows are stored as JSON text rather than typed Arrow columns on purpose: a user's file may mix types in a
column (a number here, a string there) or leave a field out of some rows, and the formats treat
"no 'output' field" differently from an empty one. A typed table would lose both.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .common import (
    EXTENSIONS,
    MAX_DROPPED_EXAMPLES,
    MAX_RECORDS,
    SUPPORTED,
    DataError,
    DroppedRow,
    max_data_bytes,
)

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024  # bytes per read while hashing and validating the encoding
SAMPLE_ROWS = 200  # rows kept for format detection and the preview
COLUMN_ROWS = 1000  # rows whose keys make up the column list
BATCH_ROWS = 20_000  # rows per Arrow record batch
MAX_BROKEN = 1000  # unreadable rows listed by position in the report
_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant|System)\s*:", re.IGNORECASE)
_EXT_HINTS = {
    ".docx": "Word documents are not datasets: put one example per line in a .txt file, or export a table as CSV.",
    ".doc": "Word documents are not datasets: put one example per line in a .txt file, or export a table as CSV.",
    ".xlsx": "In Excel use File > Save As > CSV (UTF-8).",
    ".xls": "In Excel use File > Save As > CSV (UTF-8).",
    ".pdf": "Extract the text into a .txt file first.",
    ".gz": "Decompress it first.",
    ".zip": "Unzip it first and pick the data file inside.",
    ".arrow": "Save it as Parquet or JSONL (datasets: `ds.to_parquet(...)`).",
}
# Magic bytes of files that are often renamed into a dataset extension by mistake.
_MAGIC = [(b"PK\x03\x04", "a ZIP archive (a .docx/.xlsx document or a .zip)"), (b"PAR1", "a Parquet file"),
          (b"\x1f\x8b", "a gzip-compressed file"), (b"%PDF", "a PDF document"), (b"\x89PNG", "a PNG image"),
          (b"\xff\xd8\xff", "a JPEG image"), (b"SQLite format 3", "an SQLite database")]



# ---- sinks: where the rows go ----

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


# ---- the file: checks, hash, encoding ----

def file_kind(path: str | Path, *, max_bytes: int | None = None) -> tuple[Path, str, int]:
    """(path, kind, size) of a dataset file, or the DataError saying why it cannot be one."""
    p = Path(path)
    name = p.name
    if not p.exists():
        raise DataError(f"{path} does not exist. Check the path, or upload the file again.")
    if p.is_dir():
        raise DataError(f"{path} is a folder, not a file. Give the dataset file inside it ({SUPPORTED}).")
    ext = p.suffix.lower()
    kind = EXTENSIONS.get(ext)
    if kind is None:
        hint = _EXT_HINTS.get(ext, f"Save it as {SUPPORTED}.")
        shown = f"extension '{ext}'" if ext else "no extension"
        raise DataError(f"{name} has {shown}, which is not a supported dataset type ({SUPPORTED}). {hint}")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise DataError(f"{name} cannot be read ({e.strerror or e}). Check the file's permissions.") from None
    if size == 0:
        raise DataError(f"{name} is empty (0 bytes). Pick the file that holds the examples.")
    limit = max_data_bytes() if max_bytes is None else max_bytes
    if size > limit:
        raise DataError(f"{name} is {size / 2**20:,.1f} MB, over the {limit / 2**20:,.0f} MB limit for a dataset "
                        "file on this server (QLORA_MAX_DATA_SIZE). Use a smaller sample of it, or split it and "
                        "train on one part.")
    return p, kind, size


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes: what a prepared cache and a run's record of its data are keyed by.

    A start hashes its file up to three times (check, run record, prepare): remembered for the same file, size,
    mtime and ctime (any write changes the ctime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _digest(str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Encoding:
    name: str  # a Python codec name for open(); "" for Parquet
    warnings: list[str] = field(default_factory=list)


def sniff(p: Path, kind: str) -> Encoding:
    """The text encoding of the whole file (BOMs, BOM-less UTF-16, UTF-8, else Windows-1252/Latin-1 with a
    warning), after refusing binary and renamed files. Streams the file once; nothing is kept."""
    name = p.name
    with open(p, "rb") as f:
        head = f.read(4096)
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            bad = _first_bad_byte(p, enc)
            if bad is not None:
                raise DataError(f"{name} starts with a {enc.upper()} byte-order mark but is not valid {enc.upper()} "
                                f"(byte {bad[0]}). Save it again as UTF-8.")
            return _checked(p, enc, kind, Encoding(enc))
    for magic, what in _MAGIC:
        if head.startswith(magic):
            fix = "rename it to .parquet" if magic == b"PAR1" else f"save the data as {SUPPORTED}"
            raise DataError(f"{name} is not a {kind.upper()} text file: it is {what} with a .{kind} name. "
                            f"Give the real data file, or {fix}.")
    if b"\x00" in head:
        even, odd = head[0::2], head[1::2]
        if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
            enc = "utf-16-le"  # BOM-less UTF-16 (Windows tools): ASCII chars have a zero high byte
        elif even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
            enc = "utf-16-be"
        else:
            raise _binary(name, kind)
        if _first_bad_byte(p, enc) is not None:
            raise _binary(name, kind)
        return _checked(p, enc, kind, Encoding(enc))
    bad = _first_bad_byte(p, "utf-8")
    if bad is None:
        return _checked(p, "utf-8", kind, Encoding("utf-8"))
    enc, shown = ("cp1252", "Windows-1252") if _first_bad_byte(p, "cp1252") is None else ("latin-1", "Latin-1")
    warning = (f"{name} is not valid UTF-8 (byte 0x{bad[1]:02x} at offset {bad[0]}); it was read as {shown}. If "
               "accented characters look wrong, save the file as UTF-8.")
    return _checked(p, enc, kind, Encoding(enc, [warning]))


def _first_bad_byte(p: Path, enc: str) -> tuple[int, int] | None:
    """(offset, byte) of the first byte that does not decode, or None: the whole file, in chunks."""
    dec = codecs.getincrementaldecoder(enc)()
    pos = 0
    with open(p, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            pending = dec.getstate()[0]  # bytes of a character cut by the previous chunk: e.start counts them
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                data = pending + chunk
                return pos - len(pending) + e.start, (data[e.start] if e.start < len(data) else 0)
            if not chunk:
                return None
            pos += len(chunk)


def _checked(p: Path, enc: str, kind: str, result: Encoding) -> Encoding:
    """Refuse text that is mostly control characters (binary data), and text with nothing but whitespace."""
    with open(p, encoding=enc, errors="replace", newline="") as f:
        sample = f.read(4096)
        ctrl = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f\v")
        if ctrl > 0.05 * len(sample):  # control characters do not occur in real text; this is binary data
            raise _binary(p.name, kind)
        text = sample
        while not text.strip():
            text = f.read(CHUNK)
            if not text:
                raise DataError(f"{p.name} contains only whitespace, no data. Pick the file that holds the "
                                "examples.")
    return result


def _binary(name: str, kind: str) -> DataError:
    return DataError(f"{name} looks like a binary file, not {kind.upper()} text. It may have been renamed; give the "
                     f"real data file, saved as {SUPPORTED}.")


def _json_type(v: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}.get(
        type(v), "null" if v is None else type(v).__name__)


def _too_many(name: str, max_records: int) -> DataError:
    return DataError(f"{name} has more than {max_records:,} rows, over the limit for one dataset. Set max_rows to "
                     "train on a subset, or split the file.")


# ---- reading ----

def read_into(path: str | Path, sink_factory: Callable[[str, str], Sink], *, max_bytes: int | None = None) -> Sink:
    """Read a CSV/TSV/JSON/JSONL/Parquet/TXT file into a sink; broken JSONL/CSV lines are counted as 'malformed'.

    Raises DataError for a missing, empty, oversized, binary or unparseable file, or when more than the
    sink's `max_records` rows would be read (a `max_rows` limit takes a subset instead).
    """
    p, kind, _ = file_kind(path, max_bytes=max_bytes)
    name = p.name
    sink = sink_factory(name, kind)
    try:
        if kind == "parquet":
            _read_parquet(p, sink)
        else:
            enc = sniff(p, kind)
            sink.warnings.extend(enc.warnings)
            {"csv": _read_csv, "tsv": _read_csv, "json": _read_json, "jsonl": _read_jsonl,
             "txt": _read_txt}[kind](p, enc.name, sink)
    except DataError:
        raise
    except (OSError, ValueError, csv.Error, RecursionError, MemoryError) as e:
        # Anything a parser threw that the readers did not anticipate: still one readable paragraph.
        raise DataError(f"{name} could not be read as {kind.upper()} ({type(e).__name__}: {str(e)[:200]}). "
                        f"Check that it really is a {kind.upper()} file, or save it again as {SUPPORTED}.") from None
    finally:
        sink.close()
    if not sink.n:
        if sink.dropped:
            first = sink.dropped_examples[0] if sink.dropped_examples else None
            raise DataError(f"{name}: none of its {sink.rows_seen} rows could be read"
                            + (f", e.g. {first}" if first else "")
                            + f". Fix the file so that each row is a valid {sink.kind.upper()} record.")
        raise DataError(f"{name} holds no rows. Add examples to it.")
    for w in sink.warnings:
        log.info(w)  # not a warning here: the report shows them, and the CLI would print them twice
    return sink


@dataclass
class ReadResult:
    records: list[dict]
    where: list[str]  # origin of each record ("line 7"), for messages about dropped rows
    rows_seen: int  # records + lines that could not be parsed
    dropped: Counter
    dropped_examples: list[DroppedRow]
    warnings: list[str]
    kind: str  # csv, tsv, json, jsonl, parquet, txt


def read_table(path: str | Path, max_rows: int = 0, *, max_bytes: int | None = None,
               max_records: int = MAX_RECORDS) -> ReadResult:
    """The rows of a file as dicts in memory (small files, tests); training reads through prepare.py instead."""
    s = read_into(path, lambda name, kind: ListSink(name, kind, max_rows, max_records), max_bytes=max_bytes)
    return ReadResult(s.records, s.where, s.rows_seen, s.dropped, s.dropped_examples, s.warnings, s.kind)


def read_records(path: str | Path, max_rows: int = 0, *, max_bytes: int | None = None,
                 max_records: int = MAX_RECORDS) -> list[dict]:
    """The rows of a dataset file as dicts (lines that do not parse are skipped; see `read_table`)."""
    return read_table(path, max_rows, max_bytes=max_bytes, max_records=max_records).records


def _open(p: Path, enc: str, newline: str | None = None):
    return open(p, encoding=enc, newline=newline)


def _first_char(p: Path, enc: str) -> str:
    with _open(p, enc) as f:
        while chunk := f.read(65536):
            if chunk.strip():
                return chunk.lstrip()[:1]
    return ""


def _read_jsonl(p: Path, enc: str, sink: Sink) -> None:
    name = p.name
    if _first_char(p, enc) == "[":
        # A pretty-printed JSON array saved as .jsonl: read it as JSON rather than failing every line.
        try:
            with _open(p, enc) as f:
                data = json.load(f)
        except json.JSONDecodeError:
            pass
        else:
            sink.warnings.append(f"{name} holds one JSON array rather than one object per line; read it as JSON.")
            _records_from_json(data, name, sink)
            return
    first_error = None
    with _open(p, enc) as f:
        sink.tell = f.buffer.tell
        for lineno, line in enumerate(f, 1):
            if sink.full:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                sink.bad("malformed", f"not valid JSON ({msg})", f"line {lineno}", counted=False)
                first_error = first_error or (lineno, msg)
                continue
            sink.add(f"line {lineno}", rec, line.rstrip("\r\n"))
    if not sink.n and first_error:
        lineno, msg = first_error
        every = "Every line" if sink.rows_seen > 1 else "The only line"
        raise DataError(f"{name} line {lineno} is not valid JSON ({msg}). {every} failed to parse, so nothing "
                        "can be used. Each line must be one JSON object like {\"instruction\": ..., \"output\": ...}.")


def _looks_like_jsonl(p: Path, enc: str) -> bool:
    """A .json file that is really JSON Lines (datasets' to_json writes this): its first line is a whole JSON
    object, and each of the first 50 non-empty lines starts with '{'. Read it streaming, like a .jsonl."""
    lines = []
    with _open(p, enc) as f:
        for line in f:
            if line.strip():
                lines.append(line)
                if len(lines) >= 50:
                    break
    if len(lines) < 2 or not all(ln.lstrip().startswith("{") for ln in lines):
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _read_json(p: Path, enc: str, sink: Sink) -> None:
    name = p.name
    if _looks_like_jsonl(p, enc):
        sink.kind = "jsonl"
        _read_jsonl(p, enc, sink)
        return
    # A JSON document has to be parsed whole; for big data, JSONL or Parquet stream row by row.
    with _open(p, enc) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) - 1
        why = " The file seems cut off (truncated): re-download or re-export it." if cut else \
            " Fix the file there (a missing comma, quote or bracket), or validate it with a JSON checker."
        raise DataError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).{why}") from None
    del text
    _records_from_json(data, name, sink)


def _records_from_json(data: Any, name: str, sink: Sink) -> None:
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if any(k in data for k in ("conversations", "messages", "instruction", "prompt")):
            data = [data]  # the file is a single example
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        elif "train" in lists:
            sink.warnings.append(f"{name} holds several lists ({', '.join(lists)}); using 'train'.")
            data = lists["train"]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            # Column-oriented: {"instruction": [...], "output": [...]}
            cols = list(lists)
            data = [dict(zip(cols, vals)) for vals in zip(*lists.values())]
        else:
            keys = ", ".join(list(data)[:10]) or "none"
            raise DataError(f"{name} is a JSON object (keys: {keys}), not a list of examples. Use a list of objects "
                            "like [{\"instruction\": ..., \"output\": ...}], or an object with one key holding that "
                            "list, e.g. {\"data\": [...]}.")
    if not isinstance(data, list):
        raise DataError(f"{name} holds a single JSON {_json_type(data)}, not a list of examples. Use a list of "
                        "objects like [{\"instruction\": ..., \"output\": ...}].")
    if not data:
        raise DataError(f"{name} contains an empty list: there are no examples in it.")
    for i, rec in enumerate(data, 1):
        if sink.full:
            break
        if isinstance(rec, str):
            rec = {"text": rec}  # a list of strings is a plain-text dataset
        sink.add(f"item {i}", rec)


def _read_csv(p: Path, enc: str, sink: Sink) -> None:
    name = p.name
    with _open(p, enc, newline="") as f:
        first = f.readline().split("\n", 1)[0]
    if sink.kind == "tsv":
        delim = "\t"
    else:
        # Spreadsheets in many locales write ';'; some tools write tabs into .csv files.
        counts = {d: first.count(d) for d in (",", ";", "\t", "|")}
        delim = max(counts, key=counts.get) if max(counts.values()) > 0 else ","
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB per cell) would reject long documents
    with _open(p, enc, newline="") as f:
        sink.tell = f.buffer.tell
        reader = csv.reader(f, delimiter=delim)
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise DataError(f"{name} has no header row. The first line must name the columns, e.g. "
                            "instruction,output.")
        seen = 0
        for row in reader:
            if sink.full:
                break
            if not any(cell.strip() for cell in row):
                continue  # blank line
            seen += 1
            where = f"row {seen} (line {reader.line_num})"
            if len(row) > len(header):
                sink.bad("malformed", f"{len(row)} fields but the header names {len(header)}; quote fields "
                         f"that contain '{delim}'", where, counted=False)
                continue
            sink.add(where, {h or f"column_{j + 1}": (row[j] if j < len(row) else "") for j, h in enumerate(header)})
    if seen == 0:
        raise DataError(f"{name} has a header ({', '.join(h for h in header if h)[:200]}) but no data rows. "
                        "Add the examples below the header line.")


def _read_txt(p: Path, enc: str, sink: Sink) -> None:
    """Guanaco text (`### Human: ... ### Assistant: ...`) or plain text, into {"text": ...} records.

    One example per line, unless the file has blank lines: then blank-line separated blocks (multi-line
    examples). A guanaco file whose every line holds a whole exchange is one example per line. A first
    pass over the lines decides which; the second reads.
    """
    marked, all_marked, has_blank, seen, blank_after = False, True, False, False, False
    with _open(p, enc) as f:
        for ln in f:
            if ln.strip():
                has_blank = has_blank or blank_after  # a blank line between two examples
                seen = True
                hit = _GUANACO_MARK.search(ln)
                marked = marked or bool(hit)
                all_marked = all_marked and bool(hit) and "assistant" in ln.lower()
            elif seen:
                blank_after = True
    per_line = all_marked if marked else not has_blank
    with _open(p, enc) as f:
        sink.tell = f.buffer.tell
        if per_line:
            for lineno, ln in enumerate(f, 1):
                if sink.full:
                    break
                if ln.strip():
                    sink.add(f"line {lineno}", {"text": ln.strip()})
            return
        start, cur = 0, []
        for i, ln in enumerate(f, 1):
            if sink.full:
                return
            if ln.strip():
                start = start or i
                cur.append(ln.rstrip("\r\n"))
            elif cur:
                sink.add(f"line {start}", {"text": "\n".join(cur).strip()})
                start, cur = 0, []
        if cur and not sink.full:
            sink.add(f"line {start}", {"text": "\n".join(cur).strip()})


def _read_parquet(p: Path, sink: Sink) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError, ValueError) as e:
        with open(p, "rb") as f:
            head = f.read(4)
        what = " (it starts like JSON/text, so it may be a renamed file)" if head[:1] in (b"{", b"[") else ""
        raise DataError(f"{p.name} is not a valid Parquet file{what} ({str(e)[:150]}). Give a real .parquet file, "
                        f"or name it after its actual type ({SUPPORTED}).") from None
    n = pf.metadata.num_rows
    if n == 0:
        raise DataError(f"{p.name} has columns ({', '.join(pf.schema_arrow.names)[:200]}) but no rows. "
                        "Add examples to it.")
    if not sink.max_rows and n > sink.max_records:
        raise _too_many(p.name, sink.max_records)
    try:
        for batch in pf.iter_batches(batch_size=10_000):
            for rec in batch.to_pylist():
                if sink.full:
                    return
                sink.add(f"row {sink.rows_seen + 1}", rec)
    except pa.ArrowException as e:
        raise DataError(f"{p.name} is a damaged Parquet file ({str(e)[:150]}). Export it again.") from None
