"""The bad-input corpus: every broken file gives a one-paragraph DataError naming the problem, or loads with
the broken rows dropped and counted. Never a traceback, never a crash."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qlora_ui.config import DataConfig
from qlora_ui.data import DataError, inspect_file, prepare_dataset, read_records
from tests.fault_helpers import BAD


@dataclass
class Err:
    words: tuple[str, ...]  # all must appear in the message (case-insensitive)


@dataclass
class Ok:
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    warning: str = ""  # a substring of one of the report's warnings
    check: object = None  # extra assertion on the report


# (file, how to load it, expectation). "inspect" = inspect_file with the tokenizer (reports drops);
# "prepare" = prepare_dataset (raises when nothing is left).
CASES = [
    ("empty.jsonl", "inspect", Err(("empty", "0 bytes"))),
    ("whitespace_only.txt", "inspect", Err(("only whitespace",))),
    ("header_only.csv", "inspect", Err(("header", "no data rows", "instruction"))),
    ("notes.docx", "inspect", Err((".docx", "not a supported", "csv"))),
    ("table.xyz", "inspect", Err((".xyz", "not a supported"))),
    ("image_renamed.jsonl", "inspect", Err(("png image", "not a jsonl"))),
    ("random_bytes.jsonl", "inspect", Err(("binary",))),
    ("truncated.json", "inspect", Err(("not valid json", "truncated"))),
    ("all_broken.jsonl", "inspect", Err(("line 1", "not valid json", "every line"))),
    ("broken_line.jsonl", "inspect", Ok(4, {"malformed": 1},
                                        check=lambda r: "line 3" in r.summary() and "malformed" in r.summary())),
    ("latin1.csv", "inspect", Ok(2, warning="not valid UTF-8",
                                 check=lambda r: r.example[0]["content"] == "Translate café")),
    ("utf16.jsonl", "inspect", Ok(2, check=lambda r: r.example[0]["content"] == "Grüß Gott")),
    ("utf8_bom.csv", "inspect", Ok(2, check=lambda r: r.columns == ["instruction", "output"])),
    ("mixed_types.json", "inspect", Ok(3, {"empty": 1, "malformed": 1},
                                       check=lambda r: r.example[1]["content"] == "42")),
    # Columns no format names and no question/answer pair this app recognises (question,answer is read as is).
    ("missing_columns.csv", "inspect", Err(("cannot tell", "frage", "antwort", "--column-map",
                                            "question=instruction"))),
    ("missing_field.jsonl", "inspect", Ok(2, {"malformed": 1}, check=lambda r: "no 'output' field" in r.summary())),
    ("too_long.jsonl", "prepare", Err(("all 40 rows", "longer than max_length 64", "shortest is", "raise max_length"))),
    ("too_long.jsonl", "inspect", Ok(0, {"too_long": 40}, check=lambda r: "over max_length 64: 40" in r.summary())),
    ("sharegpt_unknown_roles.json", "inspect", Ok(2, {"malformed": 1},
                                                  check=lambda r: "function_call" in r.summary())),
    ("ends_on_user.jsonl", "inspect", Ok(2, {"malformed": 1},
                                         check=lambda r: r.example[-1] == {"role": "assistant", "content": "Hello"})),
    ("not_a_list.json", "inspect", Err(("json object", "not a list", "name, version"))),
    ("empty_list.json", "inspect", Err(("empty list",))),
    ("scalar.json", "inspect", Err(("single json str", "list of"))),
    ("fake.parquet", "inspect", Err(("not a valid parquet",))),
    ("extra_fields.csv", "inspect", Ok(2, {"malformed": 1}, check=lambda r: "quote fields" in r.summary())),
    ("all_empty.jsonl", "prepare", Err(("all 2 rows are empty",))),
    ("jsonl_named.json", "inspect", Ok(3)),
    ("wrong_types.jsonl", "inspect", Ok(1, {"malformed": 2})),
]


def check(path: Path, mode: str, expect, tokenizer, **kw):
    try:
        if mode == "prepare":
            report = prepare_dataset(DataConfig(data_path=str(path), max_length=kw.get("max_length", 64)),
                                     tokenizer, seed=0).report
        else:
            report = inspect_file(path, tokenizer, max_length=kw.get("max_length", 64),
                                  max_bytes=kw.get("max_bytes", 200 * 2**20))
    except DataError as e:
        msg = str(e)
        assert isinstance(expect, Err), f"unexpected DataError: {msg}"
        assert "Traceback" not in msg and "\n" not in msg, msg
        for w in expect.words:
            assert w.lower() in msg.lower(), f"{w!r} not in: {msg}"
        return None
    assert isinstance(expect, Ok), f"expected DataError with {expect.words}, got a report: {report.summary()}"
    assert report.rows_kept == expect.kept, report.summary()
    assert report.dropped == expect.dropped, report.summary()
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    if expect.warning:
        assert any(expect.warning in w for w in report.warnings), report.warnings
    if expect.check is not None:
        assert expect.check(report), report.summary()
    return report


@pytest.mark.parametrize(("name", "mode", "expect"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input(tokenizer, name, mode, expect):
    check(BAD / name, mode, expect, tokenizer)


def test_corpus_is_complete():
    # Every committed bad file is exercised by a case above.
    assert {p.name for p in BAD.iterdir()} == {c[0] for c in CASES}
    assert len(list(BAD.iterdir())) >= 20


def test_huge_row_is_dropped_as_too_long(tokenizer, tmp_path):
    path = tmp_path / "huge_row.jsonl"
    rows = [{"instruction": "Short", "output": "ok"}, {"instruction": "Long", "output": "lorem ipsum " * 8400},
            {"instruction": "Also short", "output": "fine"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = check(path, "inspect", Ok(2, {"too_long": 1}), tokenizer, max_length=512)
    assert report.shortest_too_long > 16_000


def test_huge_line_count(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": "x"}\n' * 200_000, encoding="utf-8")
    with pytest.raises(DataError, match="more than 100,000 rows.*max_rows"):
        read_records(path, max_records=100_000)
    assert len(read_records(path, max_rows=1000, max_records=100_000)) == 1000


def test_file_over_the_size_cap(tokenizer, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "hello world"}\n' * 5000, encoding="utf-8")
    check(path, "inspect", Err(("MB", "over the", "limit")), tokenizer, max_bytes=50_000)


def test_parquet_renamed_to_jsonl(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.jsonl"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    check(path, "inspect", Err(("parquet file", "rename it to .parquet")), tokenizer)


def test_missing_file_and_folder(tokenizer, tmp_path):
    check(tmp_path / "nope.jsonl", "inspect", Err(("does not exist",)), tokenizer)
    (tmp_path / "dir.jsonl").mkdir()
    check(tmp_path / "dir.jsonl", "inspect", Err(("folder",)), tokenizer)


def test_utf16_without_bom(tokenizer, tmp_path):
    path = tmp_path / "u16.csv"
    path.write_bytes("instruction,output\nHi,Hello\n".encode("utf-16-le"))
    check(path, "inspect", Ok(1), tokenizer)
