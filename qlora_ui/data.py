"""Read, validate and format fine-tuning datasets; tokenize them with response-only labels.

Pipeline (`prepare_dataset`): read the file -> rename columns (column_map) -> detect the format ->
turn every row into a conversation -> render it with the tokenizer's chat template and label the
assistant turns -> drop rows that are too long or train nothing -> shuffle -> train/eval split.

Conversations are lists of `{"role": "system"|"user"|"assistant", "content": str}`. Plain text rows
(format "text") are a single assistant message with `"raw": True`: such a conversation is tokenized
as the bare text plus the eos token (no chat template) and every token is trained. `is_raw(conv)`
tells them apart.

Every problem with a user's file surfaces as a `DataError` whose message is one paragraph naming the
problem and the fix. Rows that cannot be used are dropped and counted by reason in a `DataReport`.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import logging
import math
import random
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .config import BUNDLED_MODEL, DATA_FORMATS, DataConfig

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_RECORDS = 10_000_000  # same ceiling as DataConfig.max_rows; beyond it the user must pick a subset
IGNORE_INDEX = -100  # label of masked tokens (ignored by the cross-entropy loss)
PREVIEW_ROWS = 20
MAX_DROPPED_EXAMPLES = 5

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".text": "txt"}
SUPPORTED = "CSV, TSV, JSON, JSONL, Parquet or TXT"
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

# Columns each format needs, for detection and for the "unknown columns" message.
FORMAT_COLUMNS = {
    "alpaca": "instruction, output (input optional)",
    "dolly": "instruction, response (context optional)",
    "sharegpt": "conversations (a list of {from, value})",
    "messages": "messages (a list of {role, content})",
    "prompt_completion": "prompt, completion",
    "guanaco": "text containing '### Human:' and '### Assistant:'",
    "text": "text",
}
_REQUIRED = {"alpaca": ("output",), "dolly": ("instruction", "response"), "sharegpt": ("conversations",),
             "messages": ("messages",), "prompt_completion": ("prompt", "completion"), "guanaco": ("text",),
             "text": ("text",)}
# Common column names and what they most likely mean, for the column_map suggestion.
_SYNONYMS = {"question": "instruction", "query": "instruction", "prompt": "instruction", "input": "instruction",
             "answer": "output", "response": "output", "completion": "output", "target": "output",
             "chosen": "output", "content": "text", "document": "text", "body": "text", "sentence": "text",
             "conversation": "conversations", "dialog": "conversations", "dialogue": "conversations",
             "chat": "messages", "turns": "messages"}

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                 "bot": "assistant", "system": "system"}
_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant|System)\s*:", re.IGNORECASE)

# Used when the tokenizer has no chat template (base models). ChatML markers, but each turn ends in
# the tokenizer's eos token so the trained model stops generating on its own; chat.py renders with
# the same template (`chat_template_kwargs`), so training and inference agree.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "(eos_token if eos_token else '<|im_end|>') + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class DataError(ValueError):
    """A dataset that cannot be used, as one paragraph: what is wrong and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DroppedRow(NamedTuple):
    row: int  # 1-based position of the row in the file (for JSONL/TXT: the line)
    reason: str  # the Counter key: empty, malformed, too_long, no_trained_tokens, template_error
    detail: str  # what exactly, e.g. "no 'output' field"
    where: str = ""  # "line 7", "row 3", "item 2", "block 4"

    def __str__(self) -> str:
        return f"{self.where or f'row {self.row}'} {self.reason}: {self.detail}"


class _Drop(Exception):
    """A row that cannot be used; carries the Counter reason and a detail for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

@dataclass
class ReadResult:
    records: list[dict]
    where: list[str]  # origin of each record ("line 7"), for messages about dropped rows
    rows_seen: int  # records + lines that could not be parsed
    dropped: Counter
    dropped_examples: list[DroppedRow]
    warnings: list[str]
    kind: str  # csv, tsv, json, jsonl, parquet, txt


def read_records(path: str | Path, max_rows: int = 0, *, max_bytes: int = MAX_FILE_BYTES,
                 max_records: int = MAX_RECORDS) -> list[dict]:
    """The rows of a dataset file as dicts (lines that do not parse are skipped; see `read_table`)."""
    return read_table(path, max_rows, max_bytes=max_bytes, max_records=max_records).records


def read_table(path: str | Path, max_rows: int = 0, *, max_bytes: int = MAX_FILE_BYTES,
               max_records: int = MAX_RECORDS) -> ReadResult:
    """Read a CSV/TSV/JSON/JSONL/Parquet/TXT file; broken JSONL/CSV lines are counted as 'malformed'.

    Raises DataError for a missing, empty, oversized, binary or unparseable file, or when more than
    `max_records` rows would be read (pass max_rows to take a subset instead).
    """
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
    if size > max_bytes:
        raise DataError(f"{name} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit for a dataset "
                        "file. Use a smaller sample of it, or split it and train on one part.")
    max_rows = max(0, int(max_rows or 0))
    res = ReadResult([], [], 0, Counter(), [], [], kind)
    try:
        if kind == "parquet":
            _read_parquet(p, res, max_rows, max_records)
        else:
            raw = p.read_bytes()
            text = _decode(raw, name, kind, res.warnings)
            if not text.strip():
                raise DataError(f"{name} contains only whitespace, no data. Pick the file that holds the examples.")
            {"csv": _read_csv, "tsv": _read_csv, "json": _read_json, "jsonl": _read_jsonl,
             "txt": _read_txt}[kind](text, name, res, max_rows, max_records)
    except DataError:
        raise
    except (OSError, ValueError, csv.Error, RecursionError, MemoryError) as e:
        # Anything a parser threw that the readers did not anticipate: still one readable paragraph.
        raise DataError(f"{name} could not be read as {kind.upper()} ({type(e).__name__}: {str(e)[:200]}). "
                        f"Check that it really is a {kind.upper()} file, or save it again as {SUPPORTED}.") from None
    if not res.records:
        if res.dropped:
            first = res.dropped_examples[0] if res.dropped_examples else None
            raise DataError(f"{name}: none of its {res.rows_seen} rows could be read"
                            + (f", e.g. {first}" if first else "")
                            + f". Fix the file so that each row is a valid {kind.upper()} record.")
        raise DataError(f"{name} holds no rows. Add examples to it.")
    for w in res.warnings:
        log.info(w)  # not a warning here: the report shows them, and the CLI would print them twice
    return res


def _json_type(v: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}.get(
        type(v), "null" if v is None else type(v).__name__)


def _too_many(name: str, max_records: int) -> DataError:
    return DataError(f"{name} has more than {max_records:,} rows, over the limit for one dataset. Set max_rows to "
                     "train on a subset, or split the file.")


def _add_record(res: ReadResult, rec: Any, where: str, name: str, max_records: int) -> None:
    res.rows_seen += 1
    if not isinstance(rec, dict):
        _drop_read(res, "malformed", f"a JSON {_json_type(rec)}, not an object with named fields", where)
        return
    if len(res.records) >= max_records:
        raise _too_many(name, max_records)
    res.records.append(rec)
    res.where.append(where)


def _drop_read(res: ReadResult, reason: str, detail: str, where: str) -> None:
    res.dropped[reason] += 1
    if len(res.dropped_examples) < MAX_DROPPED_EXAMPLES:
        res.dropped_examples.append(DroppedRow(res.rows_seen, reason, detail, where))


def _decode(raw: bytes, name: str, kind: str, warnings: list[str]) -> str:
    """Text from bytes: BOMs (UTF-8/16/32), BOM-less UTF-16, UTF-8, else Windows-1252/Latin-1 with a warning."""
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError as e:
                raise DataError(f"{name} starts with a {enc.upper()} byte-order mark but is not valid {enc.upper()} "
                                f"(byte {e.start}). Save it again as UTF-8.") from None
    head = raw[:4096]
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
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            raise _binary(name, kind) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        try:
            text, enc = raw.decode("cp1252"), "Windows-1252"
        except UnicodeDecodeError:
            text, enc = raw.decode("latin-1"), "Latin-1"
        warnings.append(f"{name} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); it was read as "
                        f"{enc}. If accented characters look wrong, save the file as UTF-8.")
    sample = text[:4096]
    ctrl = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f\v")
    if ctrl > 0.05 * len(sample):  # control characters do not occur in real text; this is binary data
        raise _binary(name, kind)
    return text


def _binary(name: str, kind: str) -> DataError:
    return DataError(f"{name} looks like a binary file, not {kind.upper()} text. It may have been renamed; give the "
                     f"real data file, saved as {SUPPORTED}.")


def _read_jsonl(text: str, name: str, res: ReadResult, max_rows: int, max_records: int) -> None:
    stripped = text.lstrip()
    if stripped.startswith("["):
        # A pretty-printed JSON array saved as .jsonl: read it as JSON rather than failing every line.
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            res.warnings.append(f"{name} holds one JSON array rather than one object per line; read it as JSON.")
            _records_from_json(data, name, res, max_rows, max_records)
            return
    first_error = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if max_rows and len(res.records) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            res.rows_seen += 1
            _drop_read(res, "malformed", f"not valid JSON ({msg})", f"line {lineno}")
            first_error = first_error or (lineno, msg)
            continue
        _add_record(res, rec, f"line {lineno}", name, max_records)
    if not res.records and first_error:
        lineno, msg = first_error
        every = "Every line" if res.rows_seen > 1 else "The only line"
        raise DataError(f"{name} line {lineno} is not valid JSON ({msg}). {every} failed to parse, so nothing "
                        "can be used. Each line must be one JSON object like {\"instruction\": ..., \"output\": ...}.")


def _read_json(text: str, name: str, res: ReadResult, max_rows: int, max_records: int) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if e.msg == "Extra data" and lines and all(ln.lstrip().startswith("{") for ln in lines[:50]):
            # Really JSON Lines with a .json name, which is common (datasets' to_json writes this).
            res.kind = "jsonl"
            _read_jsonl(text, name, res, max_rows, max_records)
            return
        cut = e.pos >= len(text.rstrip()) - 1
        why = " The file seems cut off (truncated): re-download or re-export it." if cut else \
            " Fix the file there (a missing comma, quote or bracket), or validate it with a JSON checker."
        raise DataError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).{why}") from None
    _records_from_json(data, name, res, max_rows, max_records)


def _records_from_json(data: Any, name: str, res: ReadResult, max_rows: int, max_records: int) -> None:
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if any(k in data for k in ("conversations", "messages", "instruction", "prompt")):
            data = [data]  # the file is a single example
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        elif "train" in lists:
            res.warnings.append(f"{name} holds several lists ({', '.join(lists)}); using 'train'.")
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
        if max_rows and len(res.records) >= max_rows:
            break
        if isinstance(rec, str):
            rec = {"text": rec}  # a list of strings is a plain-text dataset
        _add_record(res, rec, f"item {i}", name, max_records)


def _read_csv(text: str, name: str, res: ReadResult, max_rows: int, max_records: int) -> None:
    first = text.split("\n", 1)[0]
    if res.kind == "tsv":
        delim = "\t"
    else:
        # Spreadsheets in many locales write ';'; some tools write tabs into .csv files.
        counts = {d: first.count(d) for d in (",", ";", "\t", "|")}
        delim = max(counts, key=counts.get) if max(counts.values()) > 0 else ","
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB per cell) would reject long documents
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError(f"{name} has no header row. The first line must name the columns, e.g. instruction,output.")
    seen = 0
    for row in reader:
        if max_rows and len(res.records) >= max_rows:
            break
        if not any(cell.strip() for cell in row):
            continue  # blank line
        seen += 1
        where = f"row {seen} (line {reader.line_num})"
        if len(row) > len(header):
            res.rows_seen += 1
            _drop_read(res, "malformed", f"{len(row)} fields but the header names {len(header)}; quote fields "
                       f"that contain '{delim}'", where)
            continue
        rec = {h or f"column_{j + 1}": (row[j] if j < len(row) else "") for j, h in enumerate(header)}
        _add_record(res, rec, where, name, max_records)
    if seen == 0:
        raise DataError(f"{name} has a header ({', '.join(h for h in header if h)[:200]}) but no data rows. "
                        "Add the examples below the header line.")


def _read_txt(text: str, name: str, res: ReadResult, max_rows: int, max_records: int) -> None:
    """Guanaco text (`### Human: ... ### Assistant: ...`) or plain text, into {"text": ...} records.

    One example per line, unless the file has blank lines: then blank-line separated blocks (multi-line
    examples). A guanaco file whose every line holds a whole exchange is one example per line.
    """
    lines = text.splitlines()
    nonempty = [ln for ln in lines if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if ln.strip())
    last = max(i for i, ln in enumerate(lines) if ln.strip())
    has_blank = any(not ln.strip() for ln in lines[first:last])  # a blank line between examples
    if _GUANACO_MARK.search(text):
        per_line = all(_GUANACO_MARK.search(ln) and "assistant" in ln.lower() for ln in nonempty)
    else:
        per_line = not has_blank
    blocks: list[tuple[int, str]] = []
    if per_line:
        blocks = [(i, ln.strip()) for i, ln in enumerate(lines, 1) if ln.strip()]
    else:
        start, cur = 0, []
        for i, ln in enumerate(lines, 1):
            if ln.strip():
                start = start or i
                cur.append(ln)
            elif cur:
                blocks.append((start, "\n".join(cur).strip()))
                start, cur = 0, []
        if cur:
            blocks.append((start, "\n".join(cur).strip()))
    for lineno, block in blocks:
        if max_rows and len(res.records) >= max_rows:
            break
        _add_record(res, {"text": block}, f"line {lineno}", name, max_records)


def _read_parquet(p: Path, res: ReadResult, max_rows: int, max_records: int) -> None:
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
    if not max_rows and n > max_records:
        raise _too_many(p.name, max_records)
    try:
        for batch in pf.iter_batches(batch_size=10_000):
            for rec in batch.to_pylist():
                if max_rows and len(res.records) >= max_rows:
                    return
                _add_record(res, rec, f"row {res.rows_seen + 1}", p.name, max_records)
    except pa.ArrowException as e:
        raise DataError(f"{p.name} is a damaged Parquet file ({str(e)[:150]}). Export it again.") from None


# ---------------------------------------------------------------------------------------------------
# Columns and format detection
# ---------------------------------------------------------------------------------------------------

def columns_of(records: list[dict], sample: int = 1000) -> list[str]:
    """Column names in first-seen order over the first `sample` records."""
    cols: dict[str, None] = {}
    for r in records[:sample]:
        cols.update(dict.fromkeys(r))
    return list(cols)


def apply_column_map(records: list[dict], column_map: dict[str, str] | None) -> list[dict]:
    """Rename columns: {"question": "instruction"}.

    A mapped column replaces any column already named like its target."""
    if not column_map:
        return records
    cols = columns_of(records)
    missing = [src for src in column_map if src not in cols]
    if missing:
        raise DataError(f"Column map renames {', '.join(repr(m) for m in missing)}, but the file has no such column "
                        f"(columns found: {', '.join(cols)[:300]}). Use the names exactly as they appear in the file.")
    srcs, dsts = set(column_map), set(column_map.values())
    out = []
    for r in records:
        new = {k: v for k, v in r.items() if k not in srcs and k not in dsts}
        for src, dst in column_map.items():
            new[dst] = r.get(src)
        out.append(new)
    return out


def normalize_columns(records: list[dict]) -> list[dict]:
    """Case/whitespace-insensitive column names ("Instruction " -> "instruction"), unless that would collide."""
    cols = columns_of(records)
    ren = {c: c.strip().lower() for c in cols if isinstance(c, str) and c.strip().lower() != c}
    ren = {c: n for c, n in ren.items() if n not in cols and list(ren.values()).count(n) == 1}
    if not ren:
        return records
    return [{ren.get(k, k): v for k, v in r.items()} for r in records]


def detect_format(records: list[dict]) -> str:
    """The dataset format from the column names (and, for a `text` column, its content)."""
    cols = set(columns_of(records))
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if "output" in cols and ({"instruction", "input"} & cols):
        return "alpaca"
    if {"instruction", "response"} <= cols:
        return "dolly"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        sample = [r.get("text") for r in records[:200]]
        hits = sum(1 for t in sample if isinstance(t, str) and "### Human" in t and "### Assistant" in t)
        return "guanaco" if hits * 2 >= len(sample) else "text"
    raise DataError(_unknown_columns_message(sorted(map(str, cols))))


def _unknown_columns_message(cols: list[str]) -> str:
    needs = "; ".join(f"{fmt}: {need}" for fmt, need in FORMAT_COLUMNS.items())
    guess = ",".join(f"{c}={_SYNONYMS[c.lower()]}" for c in cols if c.lower() in _SYNONYMS)
    example = guess or "question=instruction,answer=output"
    return (f"Cannot tell the dataset format from its columns ({', '.join(cols)[:300] or 'none'}). Each format needs "
            f"these columns: {needs}. Rename your columns with column_map, e.g. {example} "
            f"(CLI: --column-map {example}), or pick the format explicitly.")


def check_columns(records: list[dict], fmt: str) -> None:
    """Raise if a chosen (not detected) format's required columns are absent."""
    cols = columns_of(records)
    need = _REQUIRED[fmt]
    if fmt == "alpaca" and not ({"instruction", "input"} & set(cols)):
        need = ("instruction", "output")
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataError(f"Format '{fmt}' needs the columns {FORMAT_COLUMNS[fmt]}, but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing (columns found: {', '.join(cols)[:300]}). "
                        "Choose another format, use 'auto', or rename columns with column_map.")


# ---------------------------------------------------------------------------------------------------
# Rows -> conversations
# ---------------------------------------------------------------------------------------------------

def is_raw(conv: list[dict]) -> bool:
    """A plain-text example: tokenized as is (no chat template) and trained on every token."""
    return len(conv) == 1 and bool(conv[0].get("raw"))


def _text(v: Any, field_name: str) -> str:
    """A text cell: numbers become strings, None/NaN become empty, containers are malformed."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list) and all(isinstance(p, dict) for p in v):
        # OpenAI multi-part content: [{"type": "text", "text": ...}]
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        kinds = sorted({str(p.get("type")) for p in v} - {"text"})
        raise _Drop("malformed", f"'{field_name}' has non-text parts ({', '.join(kinds)})")
    raise _Drop("malformed", f"'{field_name}' is a {type(v).__name__}, expected text")


def _field(rec: dict, key: str, required: bool = True) -> str:
    if key not in rec:
        if required:
            raise _Drop("malformed", f"no '{key}' field")
        return ""
    return _text(rec[key], key)


def _turns(value: Any, key: str, role_key: str, content_key: str) -> list[dict]:
    """A list of turns ({from, value} or {role, content}, either spelling accepted) as chat messages."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # CSV exports store the list as a JSON string
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Drop("malformed", f"'{key}' is text that is not a valid JSON list") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _Drop("empty", f"'{key}' is empty")
    if not isinstance(value, list):
        raise _Drop("malformed", f"'{key}' is a {type(value).__name__}, expected a list of turns")
    msgs = []
    for j, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise _Drop("malformed", f"turn {j} of '{key}' is a {type(turn).__name__}, expected an object")
        role = turn.get(role_key, turn.get("role" if role_key == "from" else "from"))
        if content_key in turn:
            content = turn[content_key]
        else:
            content = turn.get("content" if content_key == "value" else "value")
        r = _ROLE_ALIASES.get(str(role).strip().lower()) if role is not None else None
        if r is None:
            raise _Drop("malformed", f"turn {j} has unknown role {role!r} (use {role_key} = "
                        f"{'human/gpt/system' if role_key == 'from' else 'user/assistant/system'})")
        msgs.append({"role": r, "content": _text(content, f"{key}[{j}].{content_key}")})
    return msgs


def _guanaco_turns(text: str) -> list[dict]:
    parts = _GUANACO_MARK.split(text)
    if len(parts) == 1:
        raise _Drop("malformed", "no '### Human:' / '### Assistant:' markers")
    msgs = []
    if parts[0].strip():
        msgs.append({"role": "system", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": {"human": "user", "assistant": "assistant", "system": "system"}[role.lower()],
                     "content": content.strip()})
    return msgs


def _row_to_conversation(rec: dict, fmt: str) -> list[dict]:
    if fmt == "alpaca":
        instr, inp, out = _field(rec, "instruction", False), _field(rec, "input", False), _field(rec, "output")
        if "instruction" not in rec and "input" not in rec:
            raise _Drop("malformed", "no 'instruction' field")
        prompt = "\n\n".join(s for s in (instr.strip(), inp.strip()) if s)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}]
    if fmt == "dolly":
        instr, ctx, resp = _field(rec, "instruction"), _field(rec, "context", False), _field(rec, "response")
        prompt = "\n\n".join(s for s in (instr.strip(), ctx.strip()) if s)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _field(rec, "prompt")},
                {"role": "assistant", "content": _field(rec, "completion")}]
    if fmt == "sharegpt":
        if "conversations" not in rec:
            raise _Drop("malformed", "no 'conversations' field")
        return _turns(rec["conversations"], "conversations", "from", "value")
    if fmt == "messages":
        if "messages" not in rec:
            raise _Drop("malformed", "no 'messages' field")
        return _turns(rec["messages"], "messages", "role", "content")
    if fmt == "guanaco":
        return _guanaco_turns(_field(rec, "text"))
    if fmt == "text":
        return [{"role": "assistant", "content": _field(rec, "text"), "raw": True}]
    raise ValueError(f"unknown data format {fmt!r}")


def _clean_conversation(msgs: list[dict], system_prompt: str) -> list[dict]:
    """Validate a chat conversation: drop trailing user turns, require a non-empty assistant turn."""
    if not msgs:
        raise _Drop("empty", "no turns")
    if is_raw(msgs):
        if not msgs[0]["content"].strip():
            raise _Drop("empty", "empty text")
        return msgs
    if all(not m["content"].strip() for m in msgs):
        raise _Drop("empty", "every field is empty")
    # Nothing after the last assistant turn can be trained, so a trailing user question is cut.
    while msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise _Drop("malformed", "no assistant turn to learn from")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise _Drop("empty", "the answer is empty")
    if len(msgs) == 2 and msgs[0]["role"] == "user" and not msgs[0]["content"].strip():
        raise _Drop("empty", "the prompt is empty")  # an answer to nothing (e.g. an empty instruction cell)
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def to_conversations(records: list[dict], fmt: str, system_prompt: str = "", *,
                     where: list[str] | None = None,
                     examples: list[DroppedRow] | None = None) -> tuple[list[list[dict]], Counter]:
    """Each record as a chat conversation; unusable rows dropped and counted by reason.

    Returns (conversations, dropped). The conversations are not aligned with the records when rows
    were dropped; `conversation_rows` keeps the alignment if needed. Pass `examples` to collect the
    first few dropped rows (with `where`, their origin in the file).
    """
    convs, _, dropped = conversation_rows(records, fmt, system_prompt, where=where, examples=examples)
    return convs, dropped


def conversation_rows(records: list[dict], fmt: str, system_prompt: str = "", *, where: list[str] | None = None,
                      examples: list[DroppedRow] | None = None) -> tuple[list[list[dict]], list[int], Counter]:
    """Like `to_conversations`, plus the 0-based record index of each kept conversation."""
    if fmt not in _REQUIRED:
        raise DataError(f"Unknown data format '{fmt}'. Use one of: {', '.join(DATA_FORMATS)}.")
    convs, rows, dropped = [], [], Counter()
    for i, rec in enumerate(records):
        try:
            conv = _clean_conversation(_row_to_conversation(rec, fmt), system_prompt)
        except _Drop as d:
            dropped[d.reason] += 1
            if examples is not None and len(examples) < MAX_DROPPED_EXAMPLES:
                examples.append(DroppedRow(i + 1, d.reason, d.detail, where[i] if where else f"row {i + 1}"))
            continue
        convs.append(conv)
        rows.append(i)
    return convs, rows, dropped


# ---------------------------------------------------------------------------------------------------
# Tokenization with response-only labels
# ---------------------------------------------------------------------------------------------------

class Encoded(NamedTuple):
    text: str  # the rendered example (for raw text: text + eos token)
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]  # char span of each token in `text`


def chat_template_kwargs(tokenizer) -> dict:
    """Extra apply_chat_template arguments: the fallback template when the tokenizer has none."""
    return {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_CHAT_TEMPLATE}


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **chat_template_kwargs(tokenizer))


def render_text(conv: list[dict], tokenizer) -> str:
    """The exact string a conversation is tokenized from (what the preview segments concatenate to)."""
    if is_raw(conv):
        return conv[0]["content"] + (tokenizer.eos_token or "")
    return render_chat(tokenizer, conv)


def _special_strings(tokenizer) -> list[str]:
    toks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            toks.add(str(t.content))
    return sorted((t for t in toks if t), key=len, reverse=True)


def _assistant_spans(conv: list[dict], tokenizer, full: str) -> list[tuple[int, int]]:
    """Char spans in `full` of each assistant turn's content plus its end-of-turn token.

    Each turn is located by rendering the prefix up to the turn with the generation prompt and the
    prefix including the turn; the difference is the turn as the template writes it. That keeps
    injected text (SmolLM2's default system prompt, BOS tokens, Llama-3 headers) out of the spans.
    """
    specials = _special_strings(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, conv[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, conv[: i + 1])
        consistent = upto.startswith(before) and full.startswith(upto) and len(before) >= cursor
        start = len(before) if consistent else cursor
        seg = upto[start:] if consistent else full[start:]
        content = m["content"]
        k = seg.find(content) if content else 0
        if k < 0 and content.strip():
            content = content.strip()  # templates like Llama-3's strip the content
            k = seg.find(content)
        if k < 0:
            if not consistent:
                # The template rewrote this turn and renders history differently: we cannot place it.
                raise _Drop("template_error", f"assistant turn {i + 1} is not found in the rendered template")
            s, e = 0, len(seg.rstrip())  # the turn is there but rewritten: train all of it
        else:
            s, e = k, k + len(content)
            after = seg[e:]
            ws = len(after) - len(after.lstrip(" \t\n"))
            end_tok = next((t for t in specials if after.startswith(t, ws)), None)
            if end_tok:
                e += ws + len(end_tok)
            elif consistent:
                e = max(e, len(seg.rstrip()))  # no special end token (e.g. fallback without eos): the rest
        spans.append((start + s, start + e))
        cursor = start + e
    return spans


def encode(conv: list[dict], tokenizer, train_on_source: bool = False) -> Encoded:
    """Render and tokenize one conversation, with labels (-100 = not trained) and token offsets."""
    if is_raw(conv):
        text = conv[0]["content"]
        try:
            enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError):  # slow tokenizer: offsets only matter for previews
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            offs = [(0, 0)] * len(ids)
        eos = tokenizer.eos_token
        if eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)  # so the model learns where a text ends
            offs.append((len(text), len(text) + len(eos)))
            text += eos
        return Encoded(text, ids, list(ids), offs)
    full = render_chat(tokenizer, conv)
    spans = _assistant_spans(conv, tokenizer, full)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        return _encode_piecewise(full, spans, tokenizer, train_on_source)
    labels = []
    j = 0
    for tid, (s, e) in zip(ids, offs):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        trained = train_on_source or (j < len(spans) and spans[j][0] <= s < spans[j][1] and e > s)
        labels.append(tid if trained else IGNORE_INDEX)
    return Encoded(full, ids, labels, offs)


def _encode_piecewise(full: str, spans: list[tuple[int, int]], tokenizer, train_on_source: bool) -> Encoded:
    """For tokenizers without offset mapping (slow ones): tokenize masked and trained pieces separately."""
    ids, labels, offs, pos = [], [], [], 0
    cuts = [(a, b, True) for a, b in spans]
    pieces = []
    for a, b, t in cuts:
        if a > pos:
            pieces.append((pos, a, False))
        pieces.append((a, b, t))
        pos = b
    if pos < len(full):
        pieces.append((pos, len(full), False))
    for a, b, t in pieces:
        piece_ids = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += [i if (t or train_on_source) else IGNORE_INDEX for i in piece_ids]
        offs += [(a, a)] * len(piece_ids)  # approximate: every token of a piece starts where the piece starts
        if piece_ids:
            offs[-len(piece_ids)] = (a, b)
    return Encoded(full, ids, labels, offs)


def token_spans(conv: list[dict], tokenizer, train_on_source: bool = False) -> tuple[list[int], list[int]]:
    """input_ids and labels for one conversation; labels are -100 except on what is trained.

    Trained: each assistant turn's content and its end-of-turn token (e.g. `<|im_end|>`), or every token
    with train_on_source, or every token of a raw text example (which also gets the eos token). A token
    is trained when it starts inside a turn: if the content begins with several whitespace characters,
    the tokenizer may fuse the first of them with the template's newline, and that token stays masked.
    """
    e = encode(conv, tokenizer, train_on_source)
    return e.input_ids, e.labels


def segments_for_preview(conv: list[dict], tokenizer, train_on_source: bool = False) -> list[tuple[str, bool]]:
    """The rendered example as consecutive (text, trained) pieces, split at token boundaries."""
    e = encode(conv, tokenizer, train_on_source)
    cuts: list[tuple[int, bool]] = []
    for lab, (s, _) in zip(e.labels, e.offsets):
        t = lab != IGNORE_INDEX
        if not cuts or cuts[-1][1] != t:
            cuts.append((s, t))
    if not cuts:
        return [(e.text, False)] if e.text else []
    out = []
    for n, (s, t) in enumerate(cuts):
        a = 0 if n == 0 else s
        b = cuts[n + 1][0] if n + 1 < len(cuts) else len(e.text)
        if b > a:
            out.append((e.text[a:b], t))
    return out


def template_overhead(tokenizer, fmt: str = "alpaca", system_prompt: str = "") -> int:
    """Tokens of an empty exchange: the least any example costs before its content."""
    if fmt == "text":
        return 1 if tokenizer.eos_token_id is not None else 0
    conv = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    try:
        return len(tokenizer(render_chat(tokenizer, conv), add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a template that rejects empty turns: no overhead check rather than a crash
        return 0


# ---------------------------------------------------------------------------------------------------
# Report and the whole pipeline
# ---------------------------------------------------------------------------------------------------

@dataclass
class DataReport:
    path: str = ""
    format: str = ""
    detected: bool = True  # the format came from detection (data_format "auto")
    columns: list[str] = field(default_factory=list)
    rows_read: int = 0  # rows in the file (valid or not), up to max_rows
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    token_lengths: list[int] = field(default_factory=list)  # of kept rows
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

    def stats(self) -> dict[str, float]:
        """min/mean/median/p95/max token length of the kept rows (empty without a tokenizer)."""
        xs = sorted(self.token_lengths)
        if not xs:
            return {}
        p95 = xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]
        return {"min": xs[0], "mean": statistics.fmean(xs), "median": statistics.median(xs), "p95": p95,
                "max": xs[-1]}

    def summary(self) -> str:
        how = "detected" if self.detected else "chosen"
        lines = [f"Format: {self.format} ({how})"]
        split = f" ({self.n_train} train / {self.n_eval} eval)" if self.n_train or self.n_eval else ""
        lines.append(f"Rows: {self.rows_read} read, {self.rows_kept} kept{split}")
        if self.dropped:
            parts = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
            lines.append(f"Dropped: {parts}")
            for d in self.dropped_examples[:3]:
                lines.append(f"  e.g. {d}")
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


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids", "labels", "attention_mask"}: lists of int
    eval: list[dict]
    report: DataReport
    conversations: list[list[dict]]  # kept rows, file order, for previews


def _preview_df(records: list[dict], n: int = PREVIEW_ROWS):
    import pandas as pd

    def cell(v):
        if isinstance(v, (dict, list)):
            s = json.dumps(v, ensure_ascii=False)
            return s if len(s) <= 300 else s[:297] + "..."
        return v

    return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in records[:n]])


def _load(path: str | Path, data_format: str, column_map: dict | None, system_prompt: str, max_rows: int,
          max_bytes: int) -> tuple[ReadResult, list[dict], str, list[list[dict]], list[int], DataReport]:
    """Read -> column map -> detect -> conversations, with the report filled up to that point."""
    res = read_table(path, max_rows, max_bytes=max_bytes)
    records = normalize_columns(apply_column_map(res.records, column_map))
    if data_format in ("", "auto", None):
        fmt, detected = detect_format(records), True
    else:
        if data_format not in _REQUIRED:
            raise DataError(f"Unknown data format '{data_format}'. Use one of: {', '.join(DATA_FORMATS)}.")
        check_columns(records, data_format)
        fmt, detected = data_format, False
    examples = list(res.dropped_examples)
    convs, rows, dropped = conversation_rows(records, fmt, system_prompt, where=res.where, examples=examples)
    report = DataReport(path=str(path), format=fmt, detected=detected, columns=columns_of(records),
                        rows_read=res.rows_seen, dropped=dict(res.dropped + dropped), dropped_examples=examples,
                        warnings=list(res.warnings))
    report.preview_df = _preview_df(records)
    return res, records, fmt, convs, rows, report


def _tokenize_all(convs: list[list[dict]], rows: list[int], where: list[str], tokenizer, max_length: int | None,
                  train_on_source: bool, report: DataReport) -> list[tuple[int, list[int], list[int]]]:
    """Tokenize kept conversations; drop too_long / no_trained_tokens / template_error into the report."""
    dropped = Counter(report.dropped)
    kept = []
    for n, (conv, r) in enumerate(zip(convs, rows)):
        try:
            ids, labels = token_spans(conv, tokenizer, train_on_source)
            if max_length is not None and len(ids) > max_length:
                report.shortest_too_long = min(report.shortest_too_long or len(ids), len(ids))
                raise _Drop("too_long", f"{len(ids)} tokens > max_length {max_length}")
            if all(lab == IGNORE_INDEX for lab in labels):
                raise _Drop("no_trained_tokens", "no token is trained")
        except _Drop as d:
            reason, detail = d.reason, d.detail
        except Exception as e:  # noqa: BLE001 - the model's template refused this row (e.g. roles must alternate)
            reason, detail = "template_error", f"{type(e).__name__}: {str(e)[:150]}"
        else:
            kept.append((n, ids, labels))
            continue
        dropped[reason] += 1
        if len(report.dropped_examples) < MAX_DROPPED_EXAMPLES:
            report.dropped_examples.append(DroppedRow(r + 1, reason, detail, where[r] if where else f"row {r + 1}"))
    report.dropped = dict(dropped)
    report.token_lengths = [len(ids) for _, ids, _ in kept]
    report.trained_tokens = sum(sum(1 for lab in labels if lab != IGNORE_INDEX) for _, _, labels in kept)
    report.rows_kept = len(kept)
    return kept


def _nothing_left(report: DataReport, name: str) -> DataError:
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


def _check_overhead(tokenizer, fmt: str, system_prompt: str, max_length: int) -> None:
    overhead = template_overhead(tokenizer, fmt, system_prompt)
    if overhead and max_length <= overhead:
        raise DataError(f"max_length {max_length} is smaller than the chat template's own overhead: an empty "
                        f"exchange already takes {overhead} tokens (markers and any default system prompt). "
                        f"Raise max_length well above {overhead}, e.g. to {max(64, 4 * overhead)}.")


def check_file(cfg: DataConfig, *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """Read, map and detect the dataset without tokenizing: the same DataError the upload panel shows, raised
    before a run folder exists (a file already rejected in the panel must not start a run). Returns the format."""
    if not cfg.data_path:
        raise DataError(f"No dataset given. Choose a file ({SUPPORTED}).")
    _, _, fmt, convs, _, report = _load(cfg.data_path, cfg.data_format, cfg.column_map, cfg.system_prompt,
                                        cfg.max_rows, max_bytes)
    if not convs:
        raise _nothing_left(report, Path(cfg.data_path).name)
    return fmt


def prepare_dataset(cfg: DataConfig, tokenizer, seed: int, *, max_bytes: int = MAX_FILE_BYTES) -> PreparedData:
    """The tokenized train/eval rows for a data config, or a DataError saying why there are none."""
    if not cfg.data_path:
        raise DataError(f"No dataset given. Choose a file ({SUPPORTED}).")
    res, _, fmt, convs, rows, report = _load(cfg.data_path, cfg.data_format, cfg.column_map,
                                             cfg.system_prompt, cfg.max_rows, max_bytes)
    report.max_length = cfg.max_length
    _check_overhead(tokenizer, fmt, cfg.system_prompt, cfg.max_length)
    kept = _tokenize_all(convs, rows, res.where, tokenizer, cfg.max_length, cfg.train_on_source, report)
    if not kept:
        raise _nothing_left(report, Path(cfg.data_path).name)
    conversations = [convs[n] for n, _, _ in kept]
    report.example = conversations[0]
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if cfg.eval_fraction > 0 and len(kept) >= 2:
        n_eval = min(len(kept) - 1, max(1, round(len(kept) * cfg.eval_fraction)))
    rows_out = [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}
                for _, ids, labels in (kept[i] for i in order)]
    report.n_eval, report.n_train = n_eval, len(kept) - n_eval
    return PreparedData(train=rows_out[n_eval:], eval=rows_out[:n_eval], report=report, conversations=conversations)


def inspect_file(path: str | Path, tokenizer=None, data_format: str = "auto", column_map: dict | None = None,
                 max_length: int = 512, system_prompt: str = "", train_on_source: bool = False,
                 max_rows: int = 0, *, max_bytes: int = MAX_FILE_BYTES) -> DataReport:
    """Everything the upload panel and `check-data` show about a file, without building the dataset.

    Raises DataError when the file cannot be read or its format told; rows that would be dropped are
    counted in the report instead (a file whose rows are all too long gives a report, not an error).
    Without a tokenizer there are no token statistics and no length check.
    """
    res, _, fmt, convs, rows, report = _load(path, data_format, column_map, system_prompt, max_rows,
                                             max_bytes)
    if tokenizer is None:
        report.rows_kept = len(convs)
        report.example = convs[0] if convs else None
        return report
    report.max_length = max_length
    try:
        _check_overhead(tokenizer, fmt, system_prompt, max_length)
    except DataError as e:
        report.warnings.append(str(e))
    kept = _tokenize_all(convs, rows, res.where, tokenizer, max_length, train_on_source, report)
    if kept:
        report.example = convs[kept[0][0]]
    elif convs:
        report.example = convs[0]  # still show what a row looks like, even if it is too long
    if report.example is not None:
        try:
            report.example_segments = segments_for_preview(report.example, tokenizer, train_on_source)
        except Exception as e:  # noqa: BLE001 - the preview is optional; the drop was already counted
            log.debug("no preview: %s", e)
    return report


# ---------------------------------------------------------------------------------------------------
# CLI: python -m qlora_ui check-data FILE
# ---------------------------------------------------------------------------------------------------

def add_check_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check-data", help="Check a dataset file: format, rows, drops, token lengths.",
                              description="Read a dataset file the way training will, and report the detected "
                                          "format, kept and dropped rows, token lengths and one rendered example "
                                          "(trained part marked «like this»).")
    p.add_argument("file", help=f"Dataset file ({SUPPORTED}).")
    p.add_argument("--model", default=BUNDLED_MODEL, help="Model whose tokenizer and chat template to use "
                   "(default: the bundled SmolLM2). 'none' skips tokenization.")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS, dest="data_format",
                   help="Dataset format (default: detect).")
    p.add_argument("--column-map", default="", help="Rename columns first, e.g. question=instruction,answer=output.")
    p.add_argument("--max-length", type=int, default=512, help="Longest example in tokens (default 512).")
    p.add_argument("--system-prompt", default="", help="System prompt added to examples without one.")
    p.add_argument("--train-on-source", action="store_true", help="Also train on prompt tokens.")
    p.add_argument("--max-rows", type=int, default=0, help="Read at most this many rows (0 = all).")
    p.set_defaults(func=check_data_main)
    return p


def _parse_column_map(s: str) -> dict[str, str]:
    from .config import FIELD_INDEX, coerce

    try:
        return coerce(FIELD_INDEX["column_map"][1], s or "")
    except (ValueError, TypeError, AttributeError):
        raise DataError(f"--column-map '{s}' is not a mapping; write it like question=instruction,answer=output.") \
            from None


def _mark(segments: list[tuple[str, bool]], color: bool) -> str:
    if color:
        return "".join(f"\033[1;32m{t}\033[0m" if on else f"\033[2m{t}\033[0m" for t, on in segments)
    return "".join(f"«{t}»" if on else t for t, on in segments)


def check_data_main(args) -> int:
    """`check-data`: print the report; exit 0, or 2 with a one-paragraph error for a bad file."""
    from .modeling import ModelError

    out, err = sys.stdout, sys.stderr
    try:
        column_map = _parse_column_map(getattr(args, "column_map", ""))
        tok = None
        model = getattr(args, "model", BUNDLED_MODEL) or ""
        if model.lower() != "none":
            try:
                from .config import ModelConfig
                from .modeling import load_tokenizer, resolve_model_path

                mc = ModelConfig(base_model=model)
                tok = load_tokenizer(resolve_model_path(mc), mc)
            except ModelError as e:
                print(f"warning: no token statistics, the tokenizer did not load: {e}", file=err)
        report = inspect_file(args.file, tok, data_format=getattr(args, "data_format", "auto"),
                              column_map=column_map, max_length=getattr(args, "max_length", 512),
                              system_prompt=getattr(args, "system_prompt", ""),
                              train_on_source=getattr(args, "train_on_source", False),
                              max_rows=getattr(args, "max_rows", 0))
    except DataError as e:
        print(f"error: {e}", file=err)
        return 2
    except Exception as e:  # a CLI check must never end in a traceback
        log.debug("check-data failed", exc_info=True)
        print(f"error: {args.file} could not be checked ({type(e).__name__}: {' '.join(str(e).split())[:300]}).",
              file=err)
        return 2
    print(report.summary(), file=out)
    if report.rows_kept == 0 and report.rows_read > 0:
        # Nothing to train on: the same message `train` gives, and the same exit code.
        print(f"error: {_nothing_left(report, Path(args.file).name)}", file=err)
        return 2
    if report.example is not None:
        print("\nExample (trained part " + ("in green" if out.isatty() else "«marked»") + "):", file=out)
        if report.example_segments:
            print(_mark(report.example_segments, out.isatty()), file=out)
        else:
            for m in report.example:
                print(f"[{m['role']}] {m['content']}", file=out)
    return 0
