"""Writing shell commands a user can paste: quoting, and wrapping one long command into continuation lines."""

from __future__ import annotations

import re


def shell_quote(s: str) -> str:
    """`s` as one POSIX shell word: as is when it holds only safe characters, else in single quotes."""
    return s if re.fullmatch(r"[A-Za-z0-9._/:=,@+-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def join_command(parts: list[str], width: int = 0) -> str:
    """The words (already quoted) as one command line, or wrapped into `\\` continuation lines of about `width`
    characters (0 = one line)."""
    if not width:
        return " ".join(parts)
    lines, cur = [], ""
    for part in parts:
        if cur and len(cur) + 1 + len(part) > width:
            lines.append(cur)
            cur = "  " + part
        else:
            cur = f"{cur} {part}" if cur else part
    return " \\\n".join(lines + [cur])
