"""Columns, format detection, and each row as a chat conversation (the part that knows the seven formats).

Conversations are lists of `{"role": "system"|"user"|"assistant", "content": str}`. Plain text rows
(format "text") are a single assistant message with `"raw": True`: such a conversation is tokenized
as the bare text plus the eos token (no chat template) and every token is trained. `is_raw(conv)`
tells them apart. Rows that cannot be used raise `Drop` with a reason that the report counts.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

from ..config import DATA_FORMATS
from .common import MAX_DROPPED_EXAMPLES, DataError, Drop, DroppedRow

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
    ren = _normal_names(columns_of(records))
    if not ren:
        return records
    return [{ren.get(k, k): v for k, v in r.items()} for r in records]


def _normal_names(cols: list[str]) -> dict[str, str]:
    ren = {c: c.strip().lower() for c in cols if isinstance(c, str) and c.strip().lower() != c}
    return {c: n for c, n in ren.items() if n not in cols and list(ren.values()).count(n) == 1}


# The names people give the two sides of a question/answer file. A file with exactly one of each (and no format's
# own columns) is read as prompt/completion without a column map: `question,answer` CSVs are the commonest upload.
_PROMPT_NAMES = ("question", "query", "input", "instruction", "prompt", "human", "user", "request", "q")
_REPLY_NAMES = ("answer", "response", "output", "completion", "reply", "assistant", "bot", "gpt", "target", "a")


def _has_format_columns(names: set[str]) -> bool:
    return bool({"messages", "conversations", "text"} & names) or ("output" in names and bool(
        {"instruction", "input"} & names)) or {"instruction", "response"} <= names or {"prompt", "completion"} <= names


def pair_column_map(cols: list[str]) -> dict[str, str]:
    """{question column: "prompt", answer column: "completion"} when the columns name one of each side and no
    format's own columns; {} otherwise (the format is then detected, or the unknown-columns message explains)."""
    names: dict[str, str] = {}
    for c in cols:
        if isinstance(c, str):
            names.setdefault(c.strip().lower(), c)
    if _has_format_columns(set(names)):
        return {}
    asks = [names[n] for n in _PROMPT_NAMES if n in names]
    replies = [names[n] for n in _REPLY_NAMES if n in names]
    if len(asks) != 1 or len(replies) != 1:
        return {}  # none, or a choice this code should not guess: the message asks for a column map
    return {src: dst for src, dst in ((asks[0], "prompt"), (replies[0], "completion")) if src != dst}


class ColumnPlan:
    """`apply_column_map` then `normalize_columns`, decided once from a file's columns and applied row by row
    (the file is not in memory as a list of dicts). Without a column map, a question/answer pair of columns is
    mapped to prompt/completion (`inferred` holds that map, for the report)."""

    def __init__(self, cols: list[str], column_map: dict[str, str] | None):
        self.inferred = {} if column_map else pair_column_map(cols)
        self.column_map = dict(column_map or self.inferred)
        if self.column_map:
            missing = [src for src in self.column_map if src not in cols]
            if missing:
                raise DataError(f"Column map renames {', '.join(repr(m) for m in missing)}, but the file has no "
                                f"such column (columns found: {', '.join(map(str, cols))[:300]}). Use the names "
                                "exactly as they appear in the file.")
            self._skip = set(self.column_map) | set(self.column_map.values())
            cols = list(dict.fromkeys([c for c in cols if c not in self._skip] + list(self.column_map.values())))
        self.rename = _normal_names(cols)
        self.columns = [self.rename.get(c, c) for c in cols]

    def __call__(self, rec: dict) -> dict:
        if self.column_map:
            new = {k: v for k, v in rec.items() if k not in self._skip}
            for src, dst in self.column_map.items():
                new[dst] = rec.get(src)
            rec = new
        if self.rename:
            rec = {self.rename.get(k, k): v for k, v in rec.items()}
        return rec


def resolve_format(sample: list[dict], cols: list[str], data_format: str | None) -> tuple[str, bool]:
    """(format, detected) for mapped rows: detect it, or check that the chosen one's columns are there."""
    if data_format in ("", "auto", None):
        return detect_format(sample, cols), True
    if data_format not in _REQUIRED:
        raise DataError(f"Unknown data format '{data_format}'. Use one of: {', '.join(DATA_FORMATS)}.")
    check_columns(sample, data_format, cols)
    return data_format, False


def conversation_of(rec: dict, fmt: str, system_prompt: str = "") -> list[dict]:
    """One row as a clean conversation, or `Drop`."""
    return _clean_conversation(_row_to_conversation(rec, fmt), system_prompt)


def detect_format(records: list[dict], cols: list[str] | None = None) -> str:
    """The dataset format from the column names (and, for a `text` column, its content).

    `cols`: the columns when `records` is only a sample of a larger file."""
    cols = set(columns_of(records) if cols is None else cols)
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
            f"these columns: {needs}. Rename your columns with the column map, e.g. {example} (Model & Data tab, "
            f"'Column mapping and options'; CLI: --column-map {example}), or pick the format explicitly.")


def check_columns(records: list[dict], fmt: str, cols: list[str] | None = None) -> None:
    """Raise if a chosen (not detected) format's required columns are absent."""
    cols = columns_of(records) if cols is None else cols
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
        raise Drop("malformed", f"'{field_name}' has non-text parts ({', '.join(kinds)})")
    raise Drop("malformed", f"'{field_name}' is a {type(v).__name__}, expected text")


def _field(rec: dict, key: str, required: bool = True) -> str:
    if key not in rec:
        if required:
            raise Drop("malformed", f"no '{key}' field")
        return ""
    return _text(rec[key], key)


def _turns(value: Any, key: str, role_key: str, content_key: str) -> list[dict]:
    """A list of turns ({from, value} or {role, content}, either spelling accepted) as chat messages."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # CSV exports store the list as a JSON string
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Drop("malformed", f"'{key}' is text that is not a valid JSON list") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Drop("empty", f"'{key}' is empty")
    if not isinstance(value, list):
        raise Drop("malformed", f"'{key}' is a {type(value).__name__}, expected a list of turns")
    msgs = []
    for j, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise Drop("malformed", f"turn {j} of '{key}' is a {type(turn).__name__}, expected an object")
        role = turn.get(role_key, turn.get("role" if role_key == "from" else "from"))
        if content_key in turn:
            content = turn[content_key]
        else:
            content = turn.get("content" if content_key == "value" else "value")
        r = _ROLE_ALIASES.get(str(role).strip().lower()) if role is not None else None
        if r is None:
            raise Drop("malformed", f"turn {j} has unknown role {role!r} (use {role_key} = "
                        f"{'human/gpt/system' if role_key == 'from' else 'user/assistant/system'})")
        msgs.append({"role": r, "content": _text(content, f"{key}[{j}].{content_key}")})
    return msgs


def _guanaco_turns(text: str) -> list[dict]:
    parts = _GUANACO_MARK.split(text)
    if len(parts) == 1:
        raise Drop("malformed", "no '### Human:' / '### Assistant:' markers")
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
            raise Drop("malformed", "no 'instruction' field")
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
            raise Drop("malformed", "no 'conversations' field")
        return _turns(rec["conversations"], "conversations", "from", "value")
    if fmt == "messages":
        if "messages" not in rec:
            raise Drop("malformed", "no 'messages' field")
        return _turns(rec["messages"], "messages", "role", "content")
    if fmt == "guanaco":
        return _guanaco_turns(_field(rec, "text"))
    if fmt == "text":
        return [{"role": "assistant", "content": _field(rec, "text"), "raw": True}]
    raise ValueError(f"unknown data format {fmt!r}")


def _clean_conversation(msgs: list[dict], system_prompt: str) -> list[dict]:
    """Validate a chat conversation: drop trailing user turns, require a non-empty assistant turn."""
    if not msgs:
        raise Drop("empty", "no turns")
    if is_raw(msgs):
        if not msgs[0]["content"].strip():
            raise Drop("empty", "empty text")
        return msgs
    if all(not m["content"].strip() for m in msgs):
        raise Drop("empty", "every field is empty")
    # Nothing after the last assistant turn can be trained, so a trailing user question is cut.
    while msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise Drop("malformed", "no assistant turn to learn from")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise Drop("empty", "the answer is empty")
    if len(msgs) == 2 and msgs[0]["role"] == "user" and not msgs[0]["content"].strip():
        raise Drop("empty", "the prompt is empty")  # an answer to nothing (e.g. an empty instruction cell)
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
        except Drop as d:
            dropped[d.reason] += 1
            if examples is not None and len(examples) < MAX_DROPPED_EXAMPLES:
                examples.append(DroppedRow(i + 1, d.reason, d.detail, where[i] if where else f"row {i + 1}"))
            continue
        convs.append(conv)
        rows.append(i)
    return convs, rows, dropped

