"""Read a dataset file row by row, never holding the whole file as Python objects.

One pass over the bytes (files.py: `sniff`) settles the encoding and catches binary or renamed files; then a
streaming reader per file type yields rows to a sink (sinks.py). Lines that do not parse are counted as
'malformed' with their line number; the file itself is refused with a one-paragraph `DataError` when nothing can
be read.

Rows are stored as JSON text rather than typed Arrow columns on purpose: a user's file may mix types in a
column (a number here, a string there) or leave a field out of some rows, and the formats treat
"no 'output' field" differently from an empty one. A typed table would lose both.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import MAX_RECORDS, SUPPORTED, DataError, DroppedRow
from .files import Encoding, file_digest, file_kind, sniff
from .sinks import ArrowSink, ListSink, Sink, _json_type, _too_many

# The file checks and the sinks were part of this module: their names stay importable from here.
__all__ = ("ArrowSink", "Encoding", "ListSink", "ReadResult", "Sink", "file_digest", "file_kind", "read_into",
           "read_records", "read_table", "sniff")

log = logging.getLogger(__name__)

_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant|System)\s*:", re.IGNORECASE)


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
