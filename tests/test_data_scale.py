"""Datasets at size: the Arrow preparation cache (hit, invalidation, concurrent builders), broken lines in a big
file, the batched encoder against the per-row one, the size cap, the sample preview, and a resume refusing data
that changed."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest

from qlora_ui.config import DataConfig, RunConfig
from qlora_ui.data import (
    DataError,
    encode_many,
    inspect_file,
    prepare_dataset,
    read_records,
    stages,
    to_conversations,
    token_spans,
)
from tests.fault_helpers import DATA, VIEWPORT, open_app, start_app

FORMAT_FILES = ["alpaca.json", "dolly.jsonl", "sharegpt.json", "messages.jsonl", "prompt_completion.csv",
                "guanaco.txt", "plain.txt"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A data cache of the test's own, so hits and misses are this test's."""
    d = tmp_path / "cache"
    monkeypatch.setenv("QLORA_DATA_CACHE", str(d))
    return d


@pytest.fixture
def encoder_calls(monkeypatch) -> list[int]:
    """How many map batches were encoded (in-process: small files use no worker processes)."""
    calls: list[int] = []
    real = stages.RowEncoder.__call__

    def counting(self, batch):
        calls.append(len(batch["_rec"]))
        return real(self, batch)

    monkeypatch.setattr(stages.RowEncoder, "__call__", counting)
    return calls


def write_alpaca(path: Path, n: int, broken: dict[int, str] | None = None) -> Path:
    """n rows; `broken` maps 1-based line numbers to a broken line put there instead."""
    broken = broken or {}
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, n + 1):
            f.write(broken.get(i, json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."})) + "\n")
    return path


def stage_dirs(cache: Path, kind: str) -> set[str]:
    return {p.name for p in cache.glob(f"{kind}-*")}


# ---- the cache ----

def test_second_prepare_is_a_cache_hit(tokenizer, tmp_path, cache, encoder_calls):
    cfg = DataConfig(data_path=str(write_alpaca(tmp_path / "d.jsonl", 40)), eval_fraction=0.1)
    a = prepare_dataset(cfg, tokenizer, seed=3)
    assert encoder_calls and len(stage_dirs(cache, "raw")) == 1 and len(stage_dirs(cache, "tok")) == 1
    encoder_calls.clear()
    b = prepare_dataset(cfg, tokenizer, seed=3)
    assert encoder_calls == []  # nothing re-encoded
    assert a.train[:] == b.train[:] and a.eval[:] == b.eval[:]
    assert a.report.summary() == b.report.summary()
    assert set(a.train.column_names) == {"input_ids", "labels", "attention_mask", "length"}
    assert all(r["length"] == len(r["input_ids"]) for r in a.train)
    assert not list(cache.glob(".tmp-*"))  # built in a temp folder, renamed into place


@pytest.mark.parametrize("change", ["max_length", "system_prompt", "train_on_source", "column_map", "data_format",
                                    "chat_template", "one_byte"])
def test_a_change_that_matters_prepares_again(tokenizer, tmp_path, cache, encoder_calls, change):
    path = write_alpaca(tmp_path / "d.jsonl", 12)
    cfg = DataConfig(data_path=str(path), eval_fraction=0.0)
    tok = tokenizer
    first = prepare_dataset(cfg, tok, seed=0)
    encoder_calls.clear()
    if change == "max_length":
        cfg.max_length = int(first.report.token_lengths.min())  # the longer rows now go
    elif change == "system_prompt":
        cfg.system_prompt = "Be brief."
    elif change == "train_on_source":
        cfg.train_on_source = True
    elif change == "column_map":
        cfg.column_map = {"output": "response"}  # instruction/response: dolly
    elif change == "data_format":
        cfg.data_format = "alpaca"  # the format detection found: the key holds the format used, so a hit
    elif change == "chat_template":
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = None  # the fallback template
    elif change == "one_byte":
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("Answer 7.", "Answer 8."), encoding="utf-8")
    again = prepare_dataset(cfg, tok, seed=0)
    if change == "data_format":
        assert not encoder_calls and again.train[:] == first.train[:]
        return
    if change == "max_length":
        # Applied to the cached lengths: a new result without tokenizing again.
        assert not encoder_calls and 0 < again.report.dropped["too_long"] < 12
        assert len(again.train) == 12 - again.report.dropped["too_long"]
        assert "tokens > max_length" in again.report.summary()
        return
    assert encoder_calls, f"{change}: served from the cache"
    assert len(stage_dirs(cache, "tok")) == 2
    assert len(stage_dirs(cache, "raw")) == (2 if change == "one_byte" else 1)
    if change in ("system_prompt", "train_on_source", "chat_template", "one_byte"):
        assert again.train[:] != first.train[:]


def test_concurrent_builders_share_one_build(tokenizer, tmp_path, cache, encoder_calls):
    """The ranks of a multi-process run all call prepare_dataset: one builds, the others wait and load it."""
    cfg = DataConfig(data_path=str(write_alpaca(tmp_path / "d.jsonl", 30)), eval_fraction=0.1)
    out: list = [None] * 3

    def rank(i):
        out[i] = prepare_dataset(cfg, tokenizer, seed=5).train[:]

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] == out[2]
    assert sum(encoder_calls) == 30  # each row encoded once
    assert len(stage_dirs(cache, "tok")) == 1 and not list(cache.glob(".tmp-*"))


# ---- broken lines in a big file ----

def test_100k_rows_with_10_broken_lines(tmp_path, cache):
    broken_at = [3, 999, 12_345, 20_000, 33_333, 50_001, 66_666, 77_777, 88_888, 100_000]
    breaks = {n: ('{"instruction": "cut off", "output": ' if k % 2 else "not json at all") for k, n in
              enumerate(broken_at)}
    path = write_alpaca(tmp_path / "big.jsonl", 100_000, breaks)
    report = inspect_file(path)  # no tokenizer: reading and conversion only
    assert report.rows_read == 100_000 and report.rows_kept == 99_990
    assert report.dropped == {"malformed": 10}
    assert report.broken == [f"line {n}" for n in broken_at]
    text = report.summary()
    assert "Unreadable rows (10): line 3, line 999, line 12345" in text and "line 100000" in text


# ---- the batched encoder is the per-row one ----

@pytest.mark.parametrize("name", FORMAT_FILES)
@pytest.mark.parametrize("train_on_source", [False, True])
def test_encode_many_matches_encode(tokenizer, name, train_on_source):
    from qlora_ui.data import detect_format

    records = read_records(DATA / name)
    convs, _ = to_conversations(records, detect_format(records))
    for (ids, labels), conv in zip(encode_many(convs, tokenizer, train_on_source), convs):
        assert (list(ids), list(labels)) == token_spans(conv, tokenizer, train_on_source)


def test_encode_many_with_the_fallback_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    convs, _ = to_conversations(read_records(DATA / "sharegpt.json"), "sharegpt")
    for (ids, labels), conv in zip(encode_many(convs, tok), convs):
        assert (list(ids), list(labels)) == token_spans(conv, tok)


# ---- limits and the quick preview ----

def test_size_cap_is_a_setting(tmp_path, cache, monkeypatch):
    path = write_alpaca(tmp_path / "d.jsonl", 200)
    monkeypatch.setenv("QLORA_MAX_DATA_SIZE", "2kb")
    with pytest.raises(DataError, match="over the .* limit"):
        inspect_file(path)
    monkeypatch.setenv("QLORA_MAX_DATA_SIZE", "1gb")
    assert inspect_file(path).rows_kept == 200


def test_not_enough_disk_for_the_cache_is_said_plainly(tmp_path, cache, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(DataError, match="Not enough free disk"):
        inspect_file(write_alpaca(tmp_path / "d.jsonl", 20))


def test_sample_preview_reads_only_the_first_rows(tokenizer, tmp_path, cache):
    path = write_alpaca(tmp_path / "d.jsonl", 5000)
    quick = inspect_file(path, tokenizer, sample=200)
    assert quick.sampled and quick.rows_read == 200 and len(quick.token_lengths) == 200
    assert quick.format == "alpaca" and quick.preview_df.shape[0] == 20 and quick.example_segments
    assert "first rows only" in quick.summary()
    assert not list(cache.glob("raw-*"))  # the sample is not cached
    small = inspect_file(DATA / "alpaca.json", tokenizer, sample=200)
    assert not small.sampled and small.rows_kept == 6  # the whole file fitted in the sample


# ---- a run's record of its data ----

@pytest.mark.parametrize("copied", [True, False])
def test_resume_refuses_a_changed_dataset(tmp_path, monkeypatch, copied):
    from qlora_ui import runs
    from qlora_ui.errors import RunError
    from qlora_ui.jobs import resume_job

    if not copied:
        monkeypatch.setattr(runs, "COPY_DATA_MAX_BYTES", 10)  # "big": used where it lies
    data = write_alpaca(tmp_path / "d.jsonl", 8)
    cfg = RunConfig(runs_dir=str(tmp_path / "runs"))
    cfg.data.data_path = str(data)
    run = runs.create_run(cfg)
    cfg = runs.copy_dataset_into(run, cfg)
    record = json.loads((run.path / "dataset.json").read_text())
    assert record["copied"] is copied and record["size"] == data.stat().st_size and len(record["sha256"]) == 64
    assert record["path"] == str(data.resolve())
    assert (run.data_dir.is_dir()) is copied
    used = Path(cfg.data.data_path)
    assert (used.parent == run.data_dir.resolve()) is copied
    runs.check_run_dataset(run, str(used))  # unchanged: fine
    used.write_text(used.read_text().replace("Answer 5.", "Answer 6."))
    before = run.config_path.read_text()
    with pytest.raises(RunError, match="has changed since the run started") as e:
        resume_job(run, overrides={"batch_size": 1, "processes": 2})
    assert run.name in str(e.value) and ("where it lies" in str(e.value)) is not copied
    assert run.config_path.read_text() == before  # a refused resume changes nothing in the run
    used.unlink()
    with pytest.raises(RunError, match="no longer exists"):
        resume_job(run)


# ---- in the browser ----

@pytest.mark.slow
def test_browser_upload_button_and_a_big_server_file(browser, tmp_path):
    """Upload your own file with the button; pick a 9 MB file from --data-root: a preview from its first rows comes
    within seconds, then the counts of its first 10,000 rows (the data panel reads no more of any file, so one big
    file cannot hold the inspection lane; training reads it whole)."""
    import time

    root = tmp_path / "datasets"
    root.mkdir()
    filler = "several careful words about the garden, the kitchen and the library " * 3
    with open(root / "big.jsonl", "w", encoding="utf-8") as f:
        for i in range(21_000):
            f.write(json.dumps({"instruction": f"Question {i}: {filler}?", "output": f"Answer {i}: {filler}."}) + "\n")
    assert (root / "big.jsonl").stat().st_size > 8 * 2**20  # over the quick-preview threshold
    proc, url = start_app(tmp_path, None, "--data-root", str(root))
    try:
        page = open_app(browser.new_page(viewport=VIEWPORT), url)
        with page.expect_file_chooser() as chooser:
            page.locator("#dataset-upload").click()
        chooser.value.set_files(str(DATA / "alpaca.json"))
        page.wait_for_selector("#data-summary:has-text('Format: alpaca')", timeout=60_000)
        assert "6 kept" in page.locator("#data-summary").inner_text()
        box = page.locator("#dataset-server input")
        box.click()
        t = time.perf_counter()
        page.get_by_role("option", name="datasets/big.jsonl").click()
        page.wait_for_selector("#data-summary:has-text('first rows only')", timeout=30_000)
        first = time.perf_counter() - t
        assert page.locator("#length-hist .main-svg").count() > 0
        page.wait_for_selector("#data-summary:has-text('10000 read')", timeout=300_000)
        assert "the first 10,000 rows only" in page.locator("#data-summary").inner_text()
        assert first < 20, f"the first preview took {first:.1f} s"
    finally:
        proc.terminate()
        proc.wait(20)
