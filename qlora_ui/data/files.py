"""A dataset file before any row is read: its type, size and hash, and its text encoding, settled in one pass over
the bytes (`sniff`), which also refuses binary and renamed files with a one-paragraph `DataError`."""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .common import EXTENSIONS, SUPPORTED, DataError, max_data_bytes

CHUNK = 4 * 1024 * 1024  # bytes per read while hashing and validating the encoding
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
