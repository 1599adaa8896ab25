"""Command-line flags made from the config's fields: every sub-command's settings flags, and the `train` command
that reproduces a config.

Values are kept as the strings typed and parsed later by `config.coerce` (through `RunConfig.updated`), so every
bad value is reported at once, like in the form.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

from .config import FIELD_INDEX, RunConfig, _fmt, choices, field_type
from .presets import load_preset
from .shell import join_command, shell_quote

# Short spellings every sub-command accepts.
CLI_ALIASES = {"--data": "data_path", "--model": "base_model", "--lr": "learning_rate"}


def cli_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_cli_flags(parser, only: Iterable[str] | None = None, *, aliases: Mapping[str, str] | None = None,
                  switches: bool = False, helps: Mapping[str, str] | None = None) -> None:
    """One argparse flag per config field (`only`: these fields, in this order), stored as `cfg__<field>`.

    `aliases`: extra spellings for this parser, alias -> field (on top of CLI_ALIASES). `switches`: true/false
    fields become `--x` / `--no-x` instead of taking a value. `helps`: a help text for a field that means
    something more in this sub-command (e.g. `plan --model` also takes a shape name)."""
    keys = list(FIELD_INDEX) if only is None else list(only)
    unknown = [k for k in keys if k not in FIELD_INDEX]
    if unknown:
        raise ValueError(f"not config fields: {', '.join(unknown)}")
    all_aliases = {**CLI_ALIASES, **(aliases or {})}
    for key in keys:
        f = FIELD_INDEX[key][1]
        ch = choices(f)
        extra = f" Choices: {', '.join(ch)}." if ch else ""
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        rng = f" Range {_fmt(lo)}..{_fmt(hi)}." if lo is not None else ""
        names = [cli_flag(key)] + [a for a, k in all_aliases.items() if k == key]
        text = (helps or {}).get(key) or f.metadata["help"]
        help_ = f"{text}{extra}{rng} Default: {f.default!r}" if f.default is not dataclasses.MISSING else text
        help_ = help_.replace("%", "%%")  # argparse %-formats help texts ("~30% slower")
        if switches and field_type(f) is bool:
            parser.add_argument(*names, dest=f"cfg__{key}", default=None, action=argparse.BooleanOptionalAction,
                                help=help_)
            continue
        metavar = "{" + ",".join(ch) + "}" if ch else "V"
        parser.add_argument(*names, dest=f"cfg__{key}", default=None, metavar=metavar, help=help_)


def cli_values(args) -> dict:
    """{field: value} of the config flags given on the command line."""
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def apply_cli_flags(cfg: RunConfig, args) -> RunConfig:
    values = cli_values(args)
    return cfg.updated(**values) if values else cfg


def cli_command(cfg: RunConfig, preset: str | None = None, *, python: str = "python",
                relative_to: Path | None = None, width: int = 0) -> str:
    """The `python -m qlora_ui train ...` command that reproduces this config.

    `relative_to`: write paths inside that folder relative to it (the command is run from there); `width`: wrap
    into shell continuation lines of about that many characters (0 = one line)."""
    base = load_preset(preset) if preset else RunConfig()
    parts = [f"{python} -m qlora_ui train"] + ([f"--preset {preset}"] if preset else [])
    for key, v in cfg.flat().items():
        if v != base.get(key):
            if isinstance(v, dict):
                v = ",".join(f"{a}={b}" for a, b in v.items())
            if relative_to is not None and isinstance(v, str) and v.startswith("/"):
                try:
                    v = str(Path(v).relative_to(relative_to))
                except ValueError:
                    pass
            parts.append(f"{cli_flag(key)} {shell_quote(str(v))}")
    return join_command(parts, width)
