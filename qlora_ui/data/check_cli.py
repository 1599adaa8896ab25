"""`python -m qlora_ui check-data FILE`: the report the upload panel shows, on the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli_flags import add_cli_flags, cli_values
from ..config import RunConfig
from ..errors import ConfigError
from .common import SUPPORTED, DataError
from .prepare import inspect_file
from .report import nothing_left
from .sources import source_of

log = logging.getLogger(__name__)

# What reading and rendering a file depends on, one flag each (the same flags `train` takes).
CHECK_FIELDS = ("base_model", "data_format", "column_map", "max_length", "system_prompt", "train_on_source",
                "max_rows", "data_config", "data_split", "data_revision")


def add_check_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check-data", help="Check a dataset file: format, rows, drops, token lengths.",
                              description="Read a dataset file the way training will, and report the detected "
                                          "format, kept and dropped rows, token lengths and one rendered example "
                                          "(trained part marked «like this»).")
    p.add_argument("file", help=f"Dataset file ({SUPPORTED}), a dataset folder, or hf://owner/name.")
    # The data settings from the config's own fields (`--data-format` etc.); `--format` stays as an alias.
    add_cli_flags(p, CHECK_FIELDS, aliases={"--format": "data_format"}, switches=True,
                  helps={"base_model": "Model whose tokenizer and chat template to use (default: the bundled "
                                       "SmolLM2). 'none' skips tokenization."})
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
        values = cli_values(args)
        column_map = _parse_column_map(values.pop("column_map", ""))
        cfg = RunConfig().updated(**values)
        tok = None
        model = cfg.model.base_model or ""
        if model.lower() != "none":
            try:
                from ..config import ModelConfig
                from ..modeling import load_tokenizer, resolve_model_path

                mc = ModelConfig(base_model=model)
                tok = load_tokenizer(resolve_model_path(mc), mc)
            except ModelError as e:
                print(f"warning: no token statistics, the tokenizer did not load: {e}", file=err)
        d = cfg.data
        report = inspect_file(args.file, tok, data_format=d.data_format, column_map=column_map,
                              max_length=d.max_length, system_prompt=d.system_prompt,
                              train_on_source=d.train_on_source, max_rows=d.max_rows,
                              source=source_of(args.file, d.data_config, d.data_split, d.data_revision))
    except ConfigError as e:
        print(f"error: invalid settings:\n{e}", file=err)
        return 2
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
