"""What every part of the data pipeline shares: the error users see, the drop record, the constants."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

# The largest dataset file accepted (the browser upload cap is separate: app.py --max-file-size). Files are
# streamed into an Arrow cache, so the limit is disk, not memory; QLORA_MAX_DATA_SIZE (e.g. "50gb") overrides it.
DEFAULT_MAX_DATA_BYTES = 20 * 1024**3
MAX_RECORDS = 10_000_000  # same ceiling as DataConfig.max_rows; beyond it the user must pick a subset
IGNORE_INDEX = -100  # label of masked tokens (ignored by the cross-entropy loss)
PREVIEW_ROWS = 20
MAX_DROPPED_EXAMPLES = 5

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".text": "txt"}
SUPPORTED = "CSV, TSV, JSON, JSONL, Parquet or TXT"


def parse_size(text: str | int) -> int:
    """'20gb', '500MB', '1.5g' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    units = {"tb": 1024**4, "t": 1024**4, "gb": 1024**3, "g": 1024**3, "mb": 1024**2, "m": 1024**2,
             "kb": 1024, "k": 1024, "b": 1}
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(float(s))


def max_data_bytes() -> int:
    env = os.environ.get("QLORA_MAX_DATA_SIZE")
    return parse_size(env) if env else DEFAULT_MAX_DATA_BYTES


def data_cache_dir() -> Path:
    """Where prepared datasets live (Arrow files by fingerprint): beside the bundled model's cache, unless
    QLORA_DATA_CACHE names another folder (a bigger disk; a test's own folder)."""
    if os.environ.get("QLORA_DATA_CACHE"):
        return Path(os.environ["QLORA_DATA_CACHE"])
    return Path(os.environ.get("QLORA_STUDIO_CACHE", Path.home() / ".cache" / "qlora-studio")) / "data"


from ..errors import DataError  # noqa: E402,F401 - the error family's; re-exported for the data package


class DroppedRow(NamedTuple):
    row: int  # 1-based position of the row in the file (for JSONL/TXT: the line)
    reason: str  # the Counter key: empty, malformed, too_long, no_trained_tokens, template_error
    detail: str  # what exactly, e.g. "no 'output' field"
    where: str = ""  # "line 7", "row 3", "item 2", "block 4"

    def __str__(self) -> str:
        return f"{self.where or f'row {self.row}'} {self.reason}: {self.detail}"


class Drop(Exception):
    """A row that cannot be used; carries the Counter reason and a detail for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
