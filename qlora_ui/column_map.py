"""The column_map setting's text form: `question=instruction, answer=output`, or a flat JSON / Python dict.

A leaf (imports nothing of the project): config.coerce parses the field with it, and anything else may.
"""

from __future__ import annotations

from typing import Any


def parse_column_map(value: Any, cap: int = 2000) -> dict[str, str]:
    """`question=instruction, answer=output` (the documented form; spaces allowed), or a flat JSON / Python dict.

    Never YAML: its aliases let a few hundred bytes expand to gigabytes, and this text comes from web requests.
    """
    import ast
    import json

    if isinstance(value, dict):
        items = list(value.items())
    else:
        s = str(value).strip()
        if len(s) > cap:
            raise ValueError(f"{len(s):,} characters is too long; the limit is {cap:,}")
        if not s:
            return {}
        if s.startswith("{"):
            try:
                parsed = json.loads(s)
            except RecursionError:  # '{"a": [[[[...' nested past Python's limit
                raise ValueError("write it as question=instruction, answer=output") from None
            except ValueError:
                try:
                    parsed = ast.literal_eval(s)  # {'question': 'instruction'}: literals only, nothing runs
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise ValueError("write it as question=instruction, answer=output") from None
            if not isinstance(parsed, dict):
                raise ValueError("write it as question=instruction, answer=output")
            items = list(parsed.items())
        else:
            items = []
            for part in s.split(","):
                if not part.strip():
                    continue
                src, sep, dst = part.partition("=")
                if not sep:
                    raise ValueError(f"'{part.strip()}' has no '='; write it as question=instruction, "
                                     "answer=output")
                items.append((src, dst))
    out = {}
    for k, v in items:
        # Column names are text (or a header-less file's column number): never a float, which could be 1e999999.
        if not isinstance(k, (str, int)) or not isinstance(v, (str, int)) or isinstance(k, bool) or isinstance(v, bool):
            raise ValueError("each entry maps one column name to another, e.g. question=instruction")
        k, v = str(k).strip(), str(v).strip()
        if not k or not v:
            raise ValueError("a column name is empty; write it as question=instruction, answer=output")
        out[k] = v
    return out
