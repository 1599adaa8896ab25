"""Preference pairs for DPO / ORPO: read, detect, split into prompt / chosen / rejected, count tokens, drop, split.

Three shapes are read, all into TRL's conversational standard (`prompt`, `chosen`, `rejected` as message lists), so
TRL's trainers apply the model's chat template to them the way the SFT path renders its conversations:

- standard: `prompt`, `chosen`, `rejected`, each a string or a list of messages (TRL's own format);
- hh (Anthropic HH-RLHF): `chosen` and `rejected` only, each a whole conversation (a message list, or the
  `\\n\\nHuman: ... \\n\\nAssistant: ...` text); the turns they share are the prompt, the rest the two answers;
- ultrafeedback: `chosen` and `rejected` message lists that repeat the prompt, with `prompt` (a string) or
  `messages` beside them; the repeated prompt is cut from each answer.

A file is read by reading.py; a Hub dataset (hf://owner/name) or a dataset folder the way the SFT path reads it
(sources.py, stages.load_rows). Rows that cannot be used are dropped with a reason (identical, empty, malformed,
too_long), as in the SFT report.
A file that cannot be preference data at all (no `rejected` column, SFT rows, chosen == rejected on every row)
raises one DataError naming the column and the fix, before any run folder exists (jobs.preflight).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .common import MAX_DROPPED_EXAMPLES, DataError, Drop, DroppedRow
from .formats import ColumnPlan, columns_of, detect_format
from .reading import ReadResult, read_table
from .report import DataReport
from .sources import source_for

PREFERENCE_FORMATS = ("standard", "hh", "ultrafeedback")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system"}
_HH_MARK = re.compile(r"(?:^|\n\n)(Human|Assistant|System):[ \t]?")
HOW = ("Preference data needs columns 'chosen' and 'rejected' (the better and the worse answer), with 'prompt' "
       "unless both are whole conversations that start with the same turns (docs/preference.md).")

Messages = list[dict[str, str]]


@dataclass
class PreferenceReport(DataReport):
    """The SFT data report plus one pair as the model sees it (shown in the data panel and `check-data`)."""

    pair: dict[str, Any] | None = None  # prompt / chosen / rejected messages and their token counts
    pairs_sample: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        text = super().summary().replace("Tokens per row", "Tokens per pair (prompt + longer answer)")
        p = self.pair
        if p:
            toks = p.get("tokens") or {}
            n = {k: f" ({toks[k]} tokens)" if k in toks else "" for k in ("prompt", "chosen", "rejected")}
            text += (f"\nExample pair:\n  prompt{n['prompt']}: {_last_text(p['prompt'])[:200]}"
                     f"\n  chosen{n['chosen']}: {_last_text(p['chosen'])[:200]}"
                     f"\n  rejected{n['rejected']}: {_last_text(p['rejected'])[:200]}")
        return text


def _last_text(msgs: Messages) -> str:
    return " / ".join(m["content"] for m in msgs) if len(msgs) <= 2 else "... / " + msgs[-1]["content"]


# ---------------------------------------------------------------------------------------------------
# One row -> (prompt, chosen, rejected)
# ---------------------------------------------------------------------------------------------------

def _hh_turns(text: str) -> Messages | None:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages; None when the text has no such markers."""
    parts = _HH_MARK.split(text)
    if len(parts) < 3:
        return None
    return [{"role": _ROLES[role.lower()], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]


def _messages(value: Any, column: str) -> Messages | str:
    """A cell as messages (a list, one message dict, or HH text) or as a plain string."""
    if isinstance(value, str):
        return _hh_turns(value) or value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        out = []
        for m in value:
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if not isinstance(role, str) or role.lower() not in _ROLES or not isinstance(content, str):
                raise Drop("malformed", f"'{column}' has a message without a known role and text content")
            out.append({"role": _ROLES[role.lower()], "content": content})
        return out
    if value is None or value == [] or value == "":
        raise Drop("empty", f"'{column}' is empty")
    raise Drop("malformed", f"'{column}' is neither text nor a list of messages")


def _answer(value: Messages | str, prompt: Messages, column: str) -> Messages:
    """The completion part of a chosen/rejected cell given the prompt: a string is one assistant turn; a list that
    repeats the prompt (UltraFeedback) loses it; a list of assistant turns stays as it is."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if value[:len(prompt)] == prompt:
        return value[len(prompt):]
    if value and value[0]["role"] == "assistant":
        return value
    # A conversation that restates the prompt slightly differently (whitespace): the answer after the last user turn.
    last_user = max((i for i, m in enumerate(value) if m["role"] == "user"), default=-1)
    return value[last_user + 1:]


def _prompt(value: Any) -> Messages:
    msgs = _messages(value, "prompt")
    if isinstance(msgs, str):
        return [{"role": "user", "content": msgs}]
    # A `messages` column that holds the whole chosen conversation: the prompt is everything before the last answer.
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs


def pair_of(rec: dict, system_prompt: str = "") -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) as message lists, or Drop with the reason."""
    if rec.get("chosen") is None:
        raise Drop("empty", "'chosen' is empty")
    if rec.get("rejected") is None:
        raise Drop("empty", "'rejected' is empty")
    chosen = _messages(rec["chosen"], "chosen")
    rejected = _messages(rec["rejected"], "rejected")
    source = rec.get("prompt") if rec.get("prompt") not in (None, "", []) else rec.get("messages")
    if source in (None, "", []) and "prompt" in rec:
        raise Drop("empty", "the prompt is empty")
    if source not in (None, "", []):
        prompt = _prompt(source)
        chosen_a, rejected_a = _answer(chosen, prompt, "chosen"), _answer(rejected, prompt, "rejected")
    else:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise Drop("malformed", "no 'prompt', and 'chosen'/'rejected' are not conversations to split")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        while k > 0 and chosen[k - 1]["role"] != "user":  # the prompt ends on the question both answers answer
            k -= 1
        if k == 0:
            raise Drop("malformed", "'chosen' and 'rejected' share no opening user turn to use as the prompt")
        prompt, chosen_a, rejected_a = chosen[:k], chosen[k:], rejected[k:]
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise Drop("empty", "the prompt is empty")
    for name, ans in (("chosen", chosen_a), ("rejected", rejected_a)):
        if not ans or not any(m["role"] == "assistant" and m["content"].strip() for m in ans):
            raise Drop("empty", f"the '{name}' answer is empty")
    if [m["content"].strip() for m in chosen_a] == [m["content"].strip() for m in rejected_a]:
        raise Drop("identical", "'chosen' and 'rejected' are the same answer")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt, chosen_a, rejected_a


def format_of(rec: dict) -> str:
    if rec.get("prompt") in (None, "", []) and rec.get("messages") in (None, "", []):
        return "hh"
    c = rec.get("chosen")
    if rec.get("messages") not in (None, "", []) or (isinstance(c, list) and c and isinstance(c[0], dict)
                                                     and c[0].get("role", c[0].get("from")) in ("user", "human")):
        return "ultrafeedback"
    return "standard"


# ---------------------------------------------------------------------------------------------------
# File-level checks: one message naming the column
# ---------------------------------------------------------------------------------------------------

def check_columns(cols: list[str], sample: list[dict], method: str, name: str) -> None:
    has = set(cols)
    if {"chosen", "rejected"} <= has:
        return
    if "chosen" in has or "rejected" in has:
        missing = "rejected" if "chosen" in has else "chosen"
        raise DataError(f"{name}: column '{missing}' is missing (columns found: {', '.join(cols)[:300]}). Method "
                        f"{method} learns from pairs, so every row needs both 'chosen' and 'rejected'. Add the "
                        f"'{missing}' column, or rename yours with the column map (e.g. worse={missing}).")
    try:
        fmt = detect_format(sample, cols)
        looks = f"look like SFT data (format {fmt})"
    except DataError:
        looks = "are not preference data"
    raise DataError(f"{name}: columns 'chosen' and 'rejected' are missing: its columns ({', '.join(cols)[:300]}) "
                    f"{looks}. Method {method} needs preference pairs. {HOW} Train this file with method sft, or "
                    "map your columns with the column map (e.g. better=chosen, worse=rejected).")


def holds_pairs(cfg: DataConfig) -> bool:
    """Whether a file's first rows have both 'chosen' and 'rejected' (after the column map): for the hint an SFT
    run gives when handed preference data."""
    try:
        src = source_for(cfg)
        if src is None:
            records = read_table(cfg.data_path, 50).records
        else:  # the SFT check has just read it into the rows cache: its sample costs nothing more
            from .stages import load_rows

            records = load_rows(cfg.data_path, cfg.max_rows, source=src).sample
        cols = ColumnPlan(columns_of(records), cfg.column_map).columns
    except Exception:  # noqa: BLE001 - only a hint; the SFT path's own error stands
        return False
    return {"chosen", "rejected"} <= set(cols)


def _nothing_left(report: DataReport, name: str) -> DataError:
    d, total = report.dropped, report.rows_read
    first = report.dropped_examples[0] if report.dropped_examples else None
    if set(d) == {"identical"}:
        return DataError(f"{name}: on every one of its {total} rows, 'chosen' equals 'rejected', so there is no "
                         "preference to learn. Put the better answer in 'chosen' and a worse one in 'rejected' (or "
                         "check the column map).")
    if set(d) == {"too_long"}:
        return DataError(f"{name}: all {total} pairs are longer than max_length {report.max_length} tokens "
                         f"(prompt + answer; shortest {report.shortest_too_long}): raise max_length or shorten them.")
    parts = ", ".join(f"{n} {r}" for r, n in d.items())
    return DataError(f"{name}: no usable preference pair remains out of {total} ({parts})"
                     + (f", e.g. {first}" if first else "") + f". {HOW}")


# ---------------------------------------------------------------------------------------------------
# Reading, token counts, split
# ---------------------------------------------------------------------------------------------------

def _tokens(tokenizer, prompt: Messages, chosen: Messages, rejected: Messages) -> dict[str, int]:
    """Token counts as TRL's DPO tokenization sees them: the prompt with the generation prompt, each answer as the
    part of prompt + answer after the prompt."""
    from .render import chat_template_kwargs

    kw = chat_template_kwargs(tokenizer)

    def ids(msgs, gen=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    p = ids(prompt, True)
    c, r = ids(prompt + chosen), ids(prompt + rejected)

    def prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    k = min(prefix(p, c), prefix(p, r))
    return {"prompt": k, "chosen": len(c) - k, "rejected": len(r) - k, "length": max(len(c), len(r))}


def data_name(cfg: DataConfig) -> str:
    """How messages name the data: the file's name, or hf://owner/name (subset) [split] / the folder [split]."""
    src = source_for(cfg)
    return src.shown if src is not None else Path(cfg.data_path).name


def _rows(cfg: DataConfig, max_bytes: int | None) -> tuple[ReadResult, str]:
    """The rows as dicts, and where they came from ("" for a file). A Hub dataset or a dataset folder is read the
    way the SFT path reads it (sources.py: subset, split, revision, the HF cache when offline, the size cap), into
    the same cached Arrow rows (stages.load_rows), so the run's dataset.json and a resume's check see the same
    commit and rows."""
    src = source_for(cfg)
    if src is None:
        return read_table(cfg.data_path, cfg.max_rows, max_bytes=max_bytes), ""
    from .stages import load_rows

    raw = load_rows(cfg.data_path, cfg.max_rows, max_bytes=max_bytes, source=src)
    rows, m = raw.dataset(), raw.meta
    table = ReadResult([json.loads(r) for r in rows["_rec"]], list(rows["_where"]), m["rows_seen"],
                       Counter(m["dropped"]), raw.dropped_examples(), list(m["warnings"]), m["kind"])
    return table, f"{m['name']} @ {str(m['revision'])[:12]}"


@dataclass
class PreferenceData:
    train: Any  # datasets.Dataset: prompt, chosen, rejected (message lists), length
    eval: Any
    report: PreferenceReport


def _read(cfg: DataConfig, max_bytes: int | None, method: str, system_prompt: str
          ) -> tuple[list[tuple[Messages, Messages, Messages]], list[int], PreferenceReport]:
    if not cfg.data_path:
        raise DataError("No dataset given. Choose a file of preference pairs (prompt, chosen, rejected).")
    table, origin = _rows(cfg, max_bytes)
    name = data_name(cfg)
    cols0 = columns_of(table.records)
    plan = ColumnPlan(cols0, cfg.column_map)
    records = [plan(r) for r in table.records]
    cols = plan.columns
    check_columns(cols, records[:1000], method, name)
    fmt = Counter(format_of(r) for r in records[:1000]).most_common(1)[0][0] if records else "standard"
    report = PreferenceReport(path=str(cfg.data_path), format=f"preference ({fmt})", columns=cols,
                              rows_read=table.rows_seen, dropped=dict(table.dropped),
                              dropped_examples=list(table.dropped_examples), warnings=list(table.warnings),
                              origin=origin)
    pairs, where, dropped = [], [], Counter(report.dropped)
    for i, rec in enumerate(records):
        try:
            pairs.append(pair_of(rec, system_prompt))
            where.append(i)
        except Drop as d:
            dropped[d.reason] += 1
            if len(report.dropped_examples) < MAX_DROPPED_EXAMPLES:
                report.dropped_examples.append(DroppedRow(i + 1, d.reason, d.detail, table.where[i]))
    report.dropped = dict(dropped)
    return pairs, where, report


def check_preference_file(cfg: DataConfig, *, method: str = "dpo", max_bytes: int | None = None) -> str:
    """The file-level checks and the conversion of every row, without a tokenizer: the DataError a run would hit,
    raised before a run folder is made. Returns the format label."""
    pairs, _, report = _read(cfg, max_bytes, method, cfg.system_prompt)
    if not pairs:
        raise _nothing_left(report, data_name(cfg))
    return report.format


def inspect_preferences(cfg: DataConfig, tokenizer=None, *, method: str = "dpo",
                        max_bytes: int | None = None) -> PreferenceReport:
    """The data panel's view of a preference file: counts, drops and the first pair with its token counts."""
    pairs, _, report = _read(cfg, max_bytes, method, cfg.system_prompt)
    report.max_length = cfg.max_length if tokenizer is not None else None
    kept, lengths = [], []
    for pair in pairs:
        if tokenizer is not None:
            t = _tokens(tokenizer, *pair)
            if t["length"] > cfg.max_length:
                report.dropped["too_long"] = report.dropped.get("too_long", 0) + 1
                continue
            lengths.append(t["length"])
            if not kept:
                report.pair = {"prompt": pair[0], "chosen": pair[1], "rejected": pair[2], "tokens": t}
        elif not kept:
            report.pair = {"prompt": pair[0], "chosen": pair[1], "rejected": pair[2]}
        kept.append(pair)
    report.rows_kept = len(kept)
    if tokenizer is not None:
        import numpy as np

        report.token_lengths = np.asarray(lengths, dtype=np.int32)
    return report


def prepare_preferences(cfg: DataConfig, tokenizer, seed: int, *, method: str = "dpo",
                        max_bytes: int | None = None) -> PreferenceData:
    """The kept pairs, shuffled and split like the SFT rows (same seeded shuffle, same eval_fraction rule)."""
    import numpy as np
    from datasets import Dataset

    pairs, _, report = _read(cfg, max_bytes, method, cfg.system_prompt)
    report.max_length = cfg.max_length
    rows, lengths, too_long = [], [], []
    for prompt, chosen, rejected in pairs:
        t = _tokens(tokenizer, prompt, chosen, rejected)
        # Dropped, not truncated, as SFT rows are: a cut answer teaches a preference for a fragment.
        if t["length"] > cfg.max_length:
            too_long.append(t["length"])
            continue
        if report.pair is None:
            report.pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tokens": t}
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "length": t["length"]})
        lengths.append(t["length"])
    if too_long:
        report.dropped["too_long"] = report.dropped.get("too_long", 0) + len(too_long)
        report.shortest_too_long = min(too_long)
    report.rows_kept = len(rows)
    report.token_lengths = np.asarray(lengths, dtype=np.int32)
    if not rows:
        raise _nothing_left(report, data_name(cfg))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if cfg.eval_fraction > 0 and len(rows) >= 2:
        n_eval = min(len(rows) - 1, max(1, round(len(rows) * cfg.eval_fraction)))
    report.n_eval, report.n_train = n_eval, len(rows) - n_eval
    shuffled = [rows[i] for i in order]
    return PreferenceData(train=Dataset.from_list(shuffled[n_eval:]), eval=Dataset.from_list(shuffled[:n_eval]),
                          report=report)
