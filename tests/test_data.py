"""Dataset reading, format detection, conversation building, label masking, splitting and the check-data CLI."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
from pathlib import Path

import pytest

from qlora_ui.config import DataConfig
from qlora_ui.data import (
    IGNORE_INDEX,
    DataError,
    add_check_data_parser,
    apply_column_map,
    check_data_main,
    detect_format,
    inspect_file,
    is_raw,
    prepare_dataset,
    read_records,
    render_text,
    segments_for_preview,
    to_conversations,
    token_spans,
)
from tests.fault_helpers import DATA, ROOT, cli

END = "<|im_end|>"  # SmolLM2's end-of-turn token (also its eos)

FORMAT_FILES = [
    ("alpaca.json", "alpaca", 6),
    ("dolly.jsonl", "dolly", 5),
    ("sharegpt.json", "sharegpt", 4),
    ("messages.jsonl", "messages", 4),
    ("prompt_completion.csv", "prompt_completion", 5),
    ("guanaco.txt", "guanaco", 4),
    ("plain.txt", "text", 3),
]


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)


def expected_trained(conv) -> str:
    return "".join(m["content"] + END for m in conv if m["role"] == "assistant")


def write_alpaca(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


# ---- reading and detection ----

@pytest.mark.parametrize(("name", "fmt", "n"), FORMAT_FILES)
def test_each_format_is_read_and_detected(name, fmt, n):
    records = read_records(DATA / name)
    assert len(records) == n
    assert detect_format(records) == fmt
    convs, dropped = to_conversations(records, fmt)
    assert len(convs) == n and not dropped
    for conv in convs:
        assert conv[-1]["role"] == "assistant" and conv[-1]["content"].strip()
        assert all(m["role"] in ("system", "user", "assistant") for m in conv)


def test_conversions_keep_the_content():
    alpaca, _ = to_conversations(read_records(DATA / "alpaca.json"), "alpaca")
    assert alpaca[1] == [{"role": "user", "content": "Translate to French.\n\nGood morning"},
                         {"role": "assistant", "content": "Bonjour"}]
    dolly, _ = to_conversations(read_records(DATA / "dolly.jsonl"), "dolly")
    assert "31 August 2000 as Virgin Blue" in dolly[0][0]["content"]
    share, _ = to_conversations(read_records(DATA / "sharegpt.json"), "sharegpt")
    assert [m["role"] for m in share[1]] == ["system", "user", "assistant"]
    assert [m["role"] for m in share[2]] == ["user", "assistant", "user", "assistant"]
    assert share[3][1] == {"role": "assistant", "content": "Hello!"}  # user/assistant spellings in sharegpt
    msgs, _ = to_conversations(read_records(DATA / "messages.jsonl"), "messages")
    assert msgs[0][0] == {"role": "system", "content": "You are a terse assistant."}
    pc, _ = to_conversations(read_records(DATA / "prompt_completion.csv"), "prompt_completion")
    assert pc[1][1]["content"] == "apple, pear" and pc[2][0]["content"] == 'Say "hi" politely'
    assert pc[3][1]["content"] == "42"
    guan, _ = to_conversations(read_records(DATA / "guanaco.txt"), "guanaco")
    assert [m["role"] for m in guan[2]] == ["user", "assistant", "user", "assistant"]
    assert guan[2][3]["content"] == "Octopuses have three hearts."
    plain, _ = to_conversations(read_records(DATA / "plain.txt"), "text")
    assert all(is_raw(c) for c in plain)
    assert plain[1][0]["content"].startswith("Call me Ishmael.") and "\n" in plain[1][0]["content"]


def test_parquet_with_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [[{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}] for i in range(5)]
    pq.write_table(pa.table({"messages": msgs, "source": ["x"] * 5}), tmp_path / "chat.parquet")
    records = read_records(tmp_path / "chat.parquet")
    assert len(records) == 5 and detect_format(records) == "messages"
    convs, dropped = to_conversations(records, "messages")
    assert convs[4][1]["content"] == "Hello 4" and not dropped
    assert len(read_records(tmp_path / "chat.parquet", max_rows=2)) == 2


def test_txt_blocks_and_lines(tmp_path):
    blocks = tmp_path / "g.txt"
    blocks.write_text("### Human: Line one\nline two\n### Assistant: Answer\nmore answer\n\n"
                      "### Human: Second\n### Assistant: Reply\n", encoding="utf-8")
    convs, _ = to_conversations(read_records(blocks), "guanaco")
    assert len(convs) == 2 and convs[0][1]["content"] == "Answer\nmore answer"
    lines = tmp_path / "p.txt"
    lines.write_text("first example\nsecond example\n\n", encoding="utf-8")  # trailing blank lines only
    assert [r["text"] for r in read_records(lines)] == ["first example", "second example"]


def test_column_map_overrides_detection(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": "4", "text": "unrelated"}) + "\n", encoding="utf-8")
    records = read_records(path)
    assert detect_format(records) == "text"  # without a map the text column wins
    mapped = apply_column_map(records, {"question": "instruction", "answer": "output"})
    assert detect_format(mapped) == "alpaca"
    convs, _ = to_conversations(mapped, "alpaca")
    assert convs[0][1]["content"] == "4"
    with pytest.raises(DataError, match="no such column"):
        apply_column_map(records, {"nope": "instruction"})
    # a mapped column replaces an existing column of the target name
    swapped = apply_column_map([{"output": "old", "answer": "new", "instruction": "q"}], {"answer": "output"})
    assert swapped == [{"instruction": "q", "output": "new"}]


def test_unknown_columns_suggest_a_column_map():
    with pytest.raises(DataError) as e:
        detect_format([{"question": "a", "answer": "b"}])
    msg = str(e.value)
    assert "question, answer" in msg or "answer, question" in msg
    assert "--column-map" in msg and "Column mapping and options" in msg and "question=instruction" in msg
    assert "alpaca" in msg


def test_a_question_answer_pair_is_read_without_a_column_map(tmp_path):
    from qlora_ui.data.formats import pair_column_map

    assert pair_column_map(["Question", "Answer", "id"]) == {"Question": "prompt", "Answer": "completion"}
    assert pair_column_map(["human", "assistant"]) == {"human": "prompt", "assistant": "completion"}
    assert pair_column_map(["prompt", "response"]) == {"response": "completion"}
    # Never a guess between two candidates, nor over a format's own columns (preference files included).
    assert pair_column_map(["question", "answer", "response"]) == {}
    assert pair_column_map(["instruction", "input", "output"]) == {}
    assert pair_column_map(["prompt", "chosen", "rejected"]) == {}
    qa = tmp_path / "qa.csv"
    qa.write_text("question,answer\n" + "".join(f"What is {i}?,It is {i}.\n" for i in range(6)))
    rep = inspect_file(qa)
    assert rep.format == "prompt_completion" and any("question → prompt" in w for w in rep.warnings)
    # A map the user gives wins over the guess.
    rep = inspect_file(qa, column_map={"question": "instruction", "answer": "output"})
    assert rep.format == "alpaca" and not any("→" in w for w in rep.warnings)


def test_explicit_format_checks_columns():
    cfg = DataConfig(data_path=str(DATA / "dolly.jsonl"), data_format="sharegpt")
    with pytest.raises(DataError, match="needs the columns"):
        prepare_dataset(cfg, tokenizer=None, seed=0)


# ---- tokenization and masking ----

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"},
     {"role": "assistant", "content": "Blue, or ünïcödé 日本語."}],
    [{"role": "user", "content": "Spaces?"}, {"role": "assistant", "content": " padded answer  "}],
]


@pytest.mark.parametrize("conv", CONVS)
def test_only_assistant_turns_are_trained(tokenizer, conv):
    ids, labels = token_spans(conv, tokenizer)
    assert len(ids) == len(labels)
    assert trained_text(tokenizer, ids, labels) == expected_trained(conv)
    masked = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    for m in conv:
        if m["role"] != "assistant":
            assert m["content"] in masked
    if conv[0]["role"] != "system":
        assert "SmolLM" in masked  # the template's default system prompt is there, and masked
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


def test_train_on_source_trains_everything(tokenizer):
    ids, labels = token_spans(CONVS[1], tokenizer, train_on_source=True)
    assert labels == ids


def test_plain_text_is_raw_plus_eos_and_fully_trained(tokenizer):
    conv = [{"role": "assistant", "content": "Just some text.", "raw": True}]
    ids, labels = token_spans(conv, tokenizer)
    assert labels == ids and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "Just some text." + tokenizer.eos_token
    assert "<|im_start|>" not in tokenizer.decode(ids)


@pytest.mark.parametrize(("name", "fmt", "n"), FORMAT_FILES)
def test_preview_segments_concatenate_to_the_rendered_text(tokenizer, name, fmt, n):
    convs, _ = to_conversations(read_records(DATA / name), fmt)
    for conv in convs[:3]:
        segs = segments_for_preview(conv, tokenizer)
        assert "".join(t for t, _ in segs) == render_text(conv, tokenizer)
        trained = "".join(t for t, on in segs if on)
        want = conv[0]["content"] + tokenizer.eos_token if is_raw(conv) else expected_trained(conv)
        assert trained == want
        assert all(a[1] != b[1] for a, b in itertools.pairwise(segs))  # runs alternate
    segs = segments_for_preview(convs[0], tokenizer, train_on_source=True)
    assert len(segs) == 1 and segs[0][1]


def test_tokenizer_without_chat_template_uses_the_fallback(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    conv = CONVS[1]
    ids, labels = token_spans(conv, tok)
    assert render_text(conv, tok).startswith("<|im_start|>system\nBe brief.")
    assert trained_text(tok, ids, labels) == expected_trained(conv)


# ---- prepare_dataset ----

def test_prepare_dataset_rows_and_report(tokenizer):
    cfg = DataConfig(data_path=str(DATA / "messages.jsonl"), eval_fraction=0.25, max_length=256)
    data = prepare_dataset(cfg, tokenizer, seed=1)
    assert (len(data.train), len(data.eval)) == (3, 1)
    for row in [*data.train, *data.eval]:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) <= 256
        assert set(row["attention_mask"]) == {1}
        assert any(lab != IGNORE_INDEX for lab in row["labels"])
    r = data.report
    assert (r.format, r.rows_read, r.rows_kept, r.n_train, r.n_eval) == ("messages", 4, 4, 3, 1)
    assert len(r.token_lengths) == 4 and r.stats()["max"] == max(r.token_lengths)
    assert len(data.conversations) == 4 and data.conversations[0][0]["role"] == "system"


@pytest.mark.parametrize(("n", "fraction", "n_eval"), [(6, 0.0, 0), (6, 0.1, 1), (6, 0.5, 3), (1, 0.2, 0),
                                                       (2, 0.01, 1), (40, 0.05, 2)])
def test_eval_split_sizes(tokenizer, tmp_path, n, fraction, n_eval):
    cfg = DataConfig(data_path=str(write_alpaca(tmp_path / "d.jsonl", n)), eval_fraction=fraction)
    data = prepare_dataset(cfg, tokenizer, seed=0)
    assert (len(data.train), len(data.eval)) == (n - n_eval, n_eval)


def test_shuffle_is_seeded(tokenizer, tmp_path):
    cfg = DataConfig(data_path=str(write_alpaca(tmp_path / "d.jsonl", 30)), eval_fraction=0.1)
    a, b, c = (prepare_dataset(cfg, tokenizer, seed=s) for s in (7, 7, 8))
    assert a.train[:] == b.train[:] and a.eval[:] == b.eval[:]
    assert [r["input_ids"] for r in a.train] != [r["input_ids"] for r in c.train]


def test_system_prompt_is_added_only_where_missing(tokenizer):
    cfg = DataConfig(data_path=str(DATA / "messages.jsonl"), system_prompt="Always be kind.", eval_fraction=0)
    convs = prepare_dataset(cfg, tokenizer, seed=0).conversations
    assert convs[0][0]["content"] == "You are a terse assistant."
    assert convs[1][0] == {"role": "system", "content": "Always be kind."}


def test_max_rows(tokenizer, tmp_path):
    cfg = DataConfig(data_path=str(write_alpaca(tmp_path / "d.jsonl", 50)), max_rows=10, eval_fraction=0)
    assert len(prepare_dataset(cfg, tokenizer, seed=0).train) == 10


def test_max_length_below_template_overhead(tokenizer):
    cfg = DataConfig(data_path=str(DATA / "alpaca.json"), max_length=16)
    with pytest.raises(DataError, match="overhead") as e:
        prepare_dataset(cfg, tokenizer, seed=0)
    assert "max_length 16" in str(e.value)


# ---- inspect_file ----

def test_inspect_file_report(tokenizer):
    r = inspect_file(DATA / "alpaca.json", tokenizer, max_length=256)
    text = r.summary()
    assert "Format: alpaca (detected)" in text and "Rows: 6 read, 6 kept" in text and "Tokens per row" in text
    assert set(r.stats()) == {"min", "mean", "median", "p95", "max"}
    assert r.preview_df.shape == (6, 3)
    assert r.example[0]["content"].startswith("Give three tips")
    assert "".join(t for t, on in r.example_segments if on) == r.example[1]["content"] + END


def test_inspect_file_without_tokenizer():
    r = inspect_file(DATA / "sharegpt.json")
    assert (r.format, r.rows_read, r.rows_kept) == ("sharegpt", 4, 4)
    assert r.stats() == {} and r.example_segments is None and "Tokens" not in r.summary()


# ---- CLI ----

def run_check_data(argv: list[str], capsys) -> tuple[int, str, str]:
    """Through `python -m qlora_ui` when the main CLI exists yet, else through the subcommand's parser."""
    if (ROOT / "qlora_ui" / "__main__.py").exists():
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        p = cli("check-data", *argv, timeout=120, env=env)
        return p.returncode, p.stdout, p.stderr
    parser = argparse.ArgumentParser(prog="qlora_ui")
    add_check_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check-data", *argv])
    assert args.func is check_data_main
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_check_data_good_file(capsys, bundled_dir):
    rc, out, err = run_check_data([str(DATA / "alpaca.json"), "--max-length", "256"], capsys)
    assert rc == 0, err
    assert "Format: alpaca" in out and "6 kept" in out and "Tokens per row" in out
    assert "«Eat well, sleep enough and move every day.<|im_end|>»" in out


def test_cli_check_data_column_map(capsys, bundled_dir):
    path = DATA / "bad" / "missing_columns.csv"
    rc, out, err = run_check_data([str(path), "--column-map", "frage=instruction,antwort=output"], capsys)
    assert rc == 0, err
    assert "Format: alpaca" in out and "2 kept" in out


def test_cli_check_data_bad_file(capsys, bundled_dir):
    rc, out, err = run_check_data([str(DATA / "bad" / "truncated.json")], capsys)
    assert rc == 2
    assert "truncated" in err and "Traceback" not in err and "Traceback" not in out
    assert err.strip().count("\n") == 0  # one paragraph
