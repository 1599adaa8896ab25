"""`python -m qlora_ui check-data FILE`: the report the upload panel shows, on the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import BUNDLED_MODEL, DATA_FORMATS
from .common import SUPPORTED, DataError
from .prepare import inspect_file
from .report import nothing_left

log = logging.getLogger(__name__)

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
    from ..config import FIELD_INDEX, coerce

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
    from ..modeling import ModelError

    out, err = sys.stdout, sys.stderr
    try:
        column_map = _parse_column_map(getattr(args, "column_map", ""))
        tok = None
        model = getattr(args, "model", BUNDLED_MODEL) or ""
        if model.lower() != "none":
            try:
                from ..config import ModelConfig
                from ..modeling import load_tokenizer, resolve_model_path

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
        print(f"error: {nothing_left(report, Path(args.file).name)}", file=err)
        return 2
    if report.example is not None:
        print("\nExample (trained part " + ("in green" if out.isatty() else "«marked»") + "):", file=out)
        if report.example_segments:
            print(_mark(report.example_segments, out.isatty()), file=out)
        else:
            for m in report.example:
                print(f"[{m['role']}] {m['content']}", file=out)
    return 0
