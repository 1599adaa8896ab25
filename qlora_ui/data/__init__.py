"""Read, validate and format fine-tuning datasets; tokenize them with response-only labels; cache the result.

Pipeline (`prepare_dataset`): check the file (files.py) and read it into Arrow (reading.py, sinks.py) ->
rename columns and detect the format (formats.py) -> turn every row into a conversation, render it with the
chat template and label the assistant turns (render.py), in `Dataset.map` and cached by fingerprint
(stages.py) -> drop rows that are too long or train nothing -> shuffle -> train/eval split (prepare.py).
report.py is what users see about a file; check_cli.py is `python -m qlora_ui check-data`.

Every problem with a user's file surfaces as a `DataError` whose message is one paragraph naming the
problem and the fix. Rows that cannot be used are dropped and counted by reason in a `DataReport`.
"""

from .check_cli import add_check_data_parser, check_data_main
from .common import (
    DEFAULT_MAX_DATA_BYTES,
    EXTENSIONS,
    IGNORE_INDEX,
    MAX_DROPPED_EXAMPLES,
    MAX_RECORDS,
    PREVIEW_ROWS,
    SUPPORTED,
    DataError,
    DroppedRow,
    data_cache_dir,
    max_data_bytes,
    parse_size,
)
from .files import file_digest
from .formats import (
    FORMAT_COLUMNS,
    ColumnPlan,
    apply_column_map,
    check_columns,
    columns_of,
    conversation_rows,
    detect_format,
    is_raw,
    normalize_columns,
    to_conversations,
)
from .prepare import PreparedData, check_file, inspect_file, prepare_dataset
from .reading import ReadResult, read_records, read_table
from .render import (
    FALLBACK_CHAT_TEMPLATE,
    Encoded,
    chat_template_kwargs,
    encode,
    encode_many,
    render_chat,
    render_text,
    segments_for_preview,
    template_overhead,
    token_spans,
)
from .report import DataReport
from .sources import HF_PREFIX, Source, hub_repo, load_split, preview_rows, source_for, source_of, split_names
from .stages import load_rows, tokenizer_fingerprint

MAX_FILE_BYTES = DEFAULT_MAX_DATA_BYTES  # the old name of the dataset size cap

__all__ = (
    "DEFAULT_MAX_DATA_BYTES", "EXTENSIONS", "FALLBACK_CHAT_TEMPLATE", "FORMAT_COLUMNS", "IGNORE_INDEX",
    "MAX_DROPPED_EXAMPLES", "MAX_FILE_BYTES", "MAX_RECORDS", "PREVIEW_ROWS", "SUPPORTED", "ColumnPlan",
    "DataError", "DataReport", "DroppedRow", "Encoded", "PreparedData", "ReadResult", "add_check_data_parser",
    "apply_column_map", "chat_template_kwargs", "check_columns", "check_data_main", "check_file", "columns_of",
    "conversation_rows", "data_cache_dir", "detect_format", "encode", "encode_many", "file_digest", "inspect_file",
    "is_raw", "load_rows", "max_data_bytes", "normalize_columns", "parse_size", "prepare_dataset", "read_records",
    "read_table", "render_chat", "render_text", "segments_for_preview", "template_overhead", "to_conversations",
    "token_spans", "tokenizer_fingerprint",
    "HF_PREFIX", "Source", "hub_repo", "load_split", "preview_rows", "source_for", "source_of", "split_names",
)
