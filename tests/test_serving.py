"""Chat requests served together (qlora_ui/serving.py) on a tiny 4-bit model: a batched reply is the reply the
request gets alone, sessions get one request at a time, abandoned rows leave the batch, waiters see their place."""

from __future__ import annotations

import threading

import pytest

from qlora_ui.chat import ChatEngine, GenerationSettings, Waiting
from qlora_ui.serving import ChatBusy
from tests.fault_helpers import lora_cfg, make_tiny_model, nudge_adapter

PROMPTS = ["Tell me about the sea.", "What is your name, sailor? Say it twice."]


@pytest.fixture(scope="module")
def cfg(tokenizer, tmp_path_factory):
    """A tiny Llama with large random weights: the tests' usual tiny model (init std 0.02) answers every prompt
    with the same tokens (the last template token decides), which would make "same reply" comparisons vacuous."""
    return lora_cfg(make_tiny_model(tmp_path_factory.mktemp("loud-llama"), tokenizer, initializer_range=0.3))


@pytest.fixture(scope="module")
def adapter_dir(cfg, tmp_path_factory):
    """A saved adapter that changes the model's output (B is not zero)."""
    from qlora_ui.modeling import load_for_training

    m = nudge_adapter(load_for_training(cfg.model, cfg.quantization, cfg.lora, False).model, seed=3, scale=0.5)
    out = tmp_path_factory.mktemp("adapter")
    m.save_pretrained(out)
    return out


@pytest.fixture()
def engine(cfg):
    eng = ChatEngine()
    eng.load(cfg)
    return eng


def msgs(text):
    return [{"role": "user", "content": text}]


def together(engine, jobs):
    """Run every (messages, settings, adapter) at once; all are queued before the worker takes its batch."""
    streams = [engine.stream(m, s, a) for m, s, a in jobs]
    firsts = [next(s) for s in streams]  # each submitted (a Waiting notice or the first text)
    out = []
    for first, s in zip(firsts, streams):
        last = first
        for last in s:  # noqa: B007
            pass
        out.append(last)
    return out


def test_two_requests_batched_get_the_replies_each_gets_alone(engine):
    jobs = [(msgs(PROMPTS[0]), GenerationSettings(max_new_tokens=12), None),
            (msgs(PROMPTS[1]), GenerationSettings(max_new_tokens=7, temperature=0.9, top_p=0.8, seed=5), None)]
    alone = [engine.reply(m, s, a) for m, s, a in jobs]
    assert engine.server.largest_batch == 1
    both = [t.strip() for t in together(engine, jobs)]
    assert engine.server.largest_batch == 2  # they really shared the forward passes
    assert both == alone
    assert alone[0] and alone[1] and alone[0] != alone[1]


def test_base_and_adapter_share_a_batch_and_match_alone(engine, cfg, adapter_dir):
    name = engine.load(cfg, adapter_dir)
    s = GenerationSettings(max_new_tokens=10)
    alone = [engine.reply(msgs(PROMPTS[0]), s, None), engine.reply(msgs(PROMPTS[0]), s, name)]
    assert alone[0] != alone[1]  # the adapter changes the reply
    before = engine.server.batches_served
    both = [t.strip() for t in together(engine, [(msgs(PROMPTS[0]), s, None), (msgs(PROMPTS[0]), s, name)])]
    assert engine.server.batches_served == before + 1  # one batch, peft's mixed-adapter forward
    assert both == alone


@pytest.fixture(scope="module")
def dora_dir(cfg, tmp_path_factory):
    """A saved DoRA adapter that changes the model's output (B and the magnitudes moved)."""
    from qlora_ui.modeling import load_for_training

    dora = cfg.updated(use_dora=True)
    m = nudge_adapter(load_for_training(dora.model, dora.quantization, dora.lora, False).model, seed=4, scale=0.5)
    out = tmp_path_factory.mktemp("dora")
    m.save_pretrained(out)
    return out


def test_dora_rows_are_served_in_their_own_batch_and_match_alone(engine, cfg, dora_dir):
    """peft cannot mix a DoRA adapter with other rows in one forward (adapter_names): base and DoRA requests sent
    together go through the server as two batches, and each gets the reply it gets alone."""
    name = engine.load(cfg, dora_dir)
    assert name in engine.dora
    s = GenerationSettings(max_new_tokens=10)
    alone = [engine.reply(msgs(PROMPTS[0]), s, None), engine.reply(msgs(PROMPTS[0]), s, name)]
    assert alone[0] != alone[1]  # the adapter changes the reply
    before, engine.server.largest_batch = engine.server.batches_served, 0
    both = [t.strip() for t in together(engine, [(msgs(PROMPTS[0]), s, None), (msgs(PROMPTS[0]), s, name)])]
    # Never two rows in one forward: the DoRA row waits, and starts once the base row has left (in the same
    # decode loop, where a joiner once took over the finished row's tokens: its reply was the base's plus one).
    assert both == alone
    assert engine.server.largest_batch == 1 and engine.server.batches_served in (before + 1, before + 2)


def test_one_request_per_session_and_a_closed_stream_frees_it(engine):
    s = GenerationSettings(max_new_tokens=200)
    first = engine.stream(msgs(PROMPTS[0]), s, None, session="browser-1")
    next(first)
    with pytest.raises(ChatBusy, match="still being written"):
        next(engine.stream(msgs(PROMPTS[1]), s, None, session="browser-1"))
    other = engine.stream(msgs(PROMPTS[1]), GenerationSettings(max_new_tokens=2), None, session="browser-2")
    assert list(other)  # another session is served
    first.close()  # the browser went away
    again = engine.stream(msgs(PROMPTS[1]), GenerationSettings(max_new_tokens=2), None, session="browser-1")
    assert list(again)


def test_an_abandoned_row_stops_generating(engine):
    """A reader that goes away takes its row out of the batch within a token or two, counted at the server: the
    row's own queue says how many tokens it was given before the worker put its last ("done") item."""
    from qlora_ui.serving import Request

    ids = engine._prompt_ids(msgs(PROMPTS[0]), GenerationSettings())["input_ids"][0].tolist()

    def row(n):
        r = Request(ids=ids, temperature=0.0, top_p=1.0, max_new_tokens=n, seed=0, adapter=None, key=engine.key)
        return engine.server.submit(r)

    def texts_until_done(r, seen=0):
        while True:
            kind, _ = r.out.get(timeout=60)
            if kind == "done":
                return seen
            seen += kind == "text"

    # Not abandoned, this prompt runs to its limit (no stop token early), so a row that ends early was cut.
    assert texts_until_done(row(40)) == 40
    long = row(500)
    seen = 0
    while seen < 3:
        kind, _ = long.out.get(timeout=60)
        seen += kind == "text"
    engine.server.release(long)
    # The worker checks the cancel after every token; a few made before the release may still sit in the queue.
    assert texts_until_done(long, seen) <= seen + 8
    assert engine.reply(msgs(PROMPTS[1]), GenerationSettings(max_new_tokens=2), None)


def test_waiting_requests_are_told_their_place_in_line(engine):
    engine.server.max_batch = 1
    try:
        s = GenerationSettings(max_new_tokens=30)
        streams = [engine.stream(msgs(p), s, None) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[0])]
        firsts = [next(x) for x in streams]
        third = firsts[2]
        assert isinstance(third, Waiting) and third.position >= 2 and "number" in third
        finals = [list(x)[-1] for x in streams]
        assert not any(isinstance(f, Waiting) for f in finals)
    finally:
        engine.server.max_batch = 16


def test_a_full_queue_refuses_with_a_message(engine):
    engine.server.max_waiting, engine.server.max_batch = 1, 1
    streams = []
    try:
        with pytest.raises(ChatBusy, match="busy"):
            for p in PROMPTS * 3:
                st = engine.stream(msgs(p), GenerationSettings(max_new_tokens=40), None)
                streams.append(st)
                next(st)
    finally:
        for st in streams:
            st.close()
        engine.server.max_waiting, engine.server.max_batch = 32, 16


def test_concurrent_readers_from_threads(engine):
    """As the app calls it: one reader thread per browser, all at once."""
    s = GenerationSettings(max_new_tokens=8)
    alone = {p: engine.reply(msgs(p), s, None) for p in PROMPTS}
    got, barrier = {}, threading.Barrier(4)

    def user(i):
        barrier.wait()
        got[i] = engine.reply(msgs(PROMPTS[i % 2]), s, None)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(4)] == [alone[PROMPTS[i % 2]] for i in range(4)]
    assert engine.server.largest_batch >= 2


def test_a_late_request_joins_the_running_batch(engine):
    """A request sent while a long reply is being written joins that batch at the next token (its own prefill,
    its KV cache rows appended) instead of waiting for the long reply to end, and still gets its alone reply."""
    short = GenerationSettings(max_new_tokens=5)
    alone = engine.reply(msgs(PROMPTS[1]), short, None)
    batches = engine.server.batches_served
    long = engine.stream(msgs(PROMPTS[0]), GenerationSettings(max_new_tokens=120), None)
    texts = 0
    for item in long:
        texts += not isinstance(item, Waiting)
        if texts >= 3:
            break
    late = list(engine.stream(msgs(PROMPTS[1]), short, None))
    more = list(long)  # the long reply was still going when the late one finished
    assert late[-1].strip() == alone
    assert more and len(more[-1]) > len(late[-1])
    assert engine.server.batches_served == batches + 1 and engine.server.largest_batch == 2
