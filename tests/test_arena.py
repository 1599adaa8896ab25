"""The arena (qlora_ui/evaluate/arena.py) and its judge (judge.py): votes kept per session and once per battle, appends
safe from many threads, prompts from files; a judge behind a stub OpenAI-compatible server that always prefers the
first answer ends every battle in a tie, one that prefers a model gives it the wins. In Chromium: two sessions vote on
the same battle, the names appear only after voting, the leaderboard updates, a repeated vote is refused."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qlora_ui.errors import ArenaError
from qlora_ui.evaluate.arena import Arena, Battle, file_prompts, prompt_hash
from qlora_ui.evaluate.elo import read_votes
from qlora_ui.evaluate.judge import Judge, parse_verdict, run_judge
from tests.fault_helpers import VIEWPORT, fast_cfg, nudge_adapter, start_app, wait_for, write_rows

GOOD = "Arr, a fine answer."
BAD = "no."


def store_battles(arena: Arena, pairs: list[tuple[str, str]]) -> list[Battle]:
    """Battles written as the arena writes them; the first model of each pair answers GOOD, the second BAD, shown in
    alternating order."""
    out = []
    for i, (good, bad) in enumerate(pairs):
        msgs = [{"role": "user", "content": f"Question {i}?"}]
        a, b = (good, bad) if i % 2 == 0 else (bad, good)
        battle = Battle(id=f"b{i}", messages=msgs, prompt_hash=prompt_hash(msgs), model_a=a, model_b=b,
                        answer_a=GOOD if a == good else BAD, answer_b=GOOD if b == good else BAD, created=time.time())
        arena._append(arena.battles_path, asdict(battle))
        out.append(battle)
    return out


def test_two_sessions_vote_on_one_battle_and_a_repeat_is_refused(tmp_path):
    arena = Arena(tmp_path)
    [battle] = store_battles(arena, [("run-x", "base")])
    assert arena.next_unvoted("session-1").id == battle.id
    first = arena.vote(battle.id, "A", "session-1")
    assert (first["model_a"], first["model_b"], first["winner"]) == ("run-x", "base", "model_a")
    with pytest.raises(ArenaError, match="already voted on this battle"):
        arena.vote(battle.id, "B", "session-1")
    arena.vote(battle.id, "tie", "session-2")
    votes = read_votes(arena.votes_path)  # the LMSYS file the CLI reads
    assert [v["winner"] for v in votes] == ["model_a", "tie"]
    assert len({v["session"] for v in votes}) == 2 and all(v["source"] == "human" for v in votes)
    assert "session-1" not in arena.votes_path.read_text()  # the session is stored hashed
    assert arena.next_unvoted("session-1") is None
    assert arena.leaderboard().games == {"run-x": 2, "base": 2}
    with pytest.raises(ArenaError, match="not a vote"):
        arena.vote(battle.id, "C", "session-3")
    with pytest.raises(ArenaError, match="no browser session"):
        arena.vote(battle.id, "A", None)


def test_votes_from_many_threads_are_all_kept_once(tmp_path):
    """Eight sessions each send four votes at the same moment (double clicks, several tabs of one user): exactly
    one vote per session is kept, every line whole."""
    arena = Arena(tmp_path)
    [battle] = store_battles(arena, [("run-x", "base")])
    refused = []
    start = threading.Barrier(32)

    def rater(i: int):
        start.wait()
        try:
            arena.vote(battle.id, "A" if i % 2 else "B", f"s{i % 8}")
        except ArenaError:
            refused.append(i)

    threads = [threading.Thread(target=rater, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    votes = read_votes(arena.votes_path)
    assert len(votes) == 8 and len({v["session"] for v in votes}) == 8 and len(refused) == 24


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("How are you?\n\nWhat is a ship?\n")
    assert [p[-1]["content"] for p in file_prompts(tmp_path / "p.txt")] == ["How are you?", "What is a ship?"]
    rows = [{"prompt": "Hi"}, {"instruction": "Sing"},
            {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                          {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = file_prompts(tmp_path / "p.jsonl")
    assert [p[-1]["content"] for p in got] == ["Hi", "Sing", "Q2"] and len(got[2]) == 3  # the answer left out
    (tmp_path / "bad.jsonl").write_text('{"answer": "x"}\n')
    with pytest.raises(ArenaError, match="row 1: no prompt found"):
        file_prompts(tmp_path / "bad.jsonl")


def test_held_out_prompts_are_the_rows_training_held_out(tmp_path, tiny_model_dir):
    from qlora_ui.data import prepare_dataset
    from qlora_ui.evaluate.arena import held_out_prompts
    from qlora_ui.runs import create_run
    from qlora_ui.studio import Studio

    cfg = fast_cfg(tiny_model_dir, write_rows(tmp_path / "rows.jsonl"), eval_fraction=0.25, seed=5,
                   runs_dir=str(tmp_path / "runs"), name="held")
    run = create_run(cfg)
    studio = Studio(tmp_path / "runs")
    prompts = held_out_prompts(studio, run.name)
    # What training evaluates on: the eval split's token ids, as text.
    tok = studio.tokenizer_for(str(tiny_model_dir))
    prepared = prepare_dataset(run.config().data, tok, seed=5)
    eval_text = [tok.decode(r["input_ids"]) for r in prepared.eval]
    assert len(prompts) == len(eval_text) == 10
    for p, text in zip(prompts, eval_text):
        assert p[-1]["role"] == "user" and p[-1]["content"] in text
    assert len({p[-1]["content"] for p in prompts}) == 10


# ---- the judge, against a stub OpenAI-compatible server ----

class StubJudge:
    """A tiny OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions answering "[[1]]"/"[[2]]" by
    `prefer(first_answer, second_answer)`. Records the prompts it was sent."""

    def __init__(self, prefer):
        self.prefer, self.prompts = prefer, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict, status: int = 200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "stub-judge", "object": "model", "created": 0,
                                                        "owned_by": "tests"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                stub.prompts.append(prompt)
                first = prompt.split("[The Start of Assistant 1's Answer]\n")[1].split("\n[The End")[0]
                second = prompt.split("[The Start of Assistant 2's Answer]\n")[1].split("\n[The End")[0]
                verdict = stub.prefer(first, second)
                self._send({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                "role": "assistant", "content": f"Both are short.\n{verdict}"}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def stub():
    servers = []

    def make(prefer):
        servers.append(StubJudge(prefer))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_a_judge_that_always_prefers_the_first_answer_ends_every_battle_in_a_tie(tmp_path, stub):
    arena = Arena(tmp_path)
    store_battles(arena, [("run-x", "base"), ("run-x", "base"), ("base", "run-y"), ("run-y", "run-x")])
    server = stub(lambda first, second: "[[1]]")
    result = run_judge(arena, Judge(server.url, "sk-none"))
    assert result.model == "stub-judge" and result.judged == 4 and result.ties_from_flips == 4
    assert len(server.prompts) == 8  # every battle asked twice, once in each order
    votes = read_votes(arena.judge_path)
    assert [v["winner"] for v in votes] == ["tie"] * 4 and all(v["source"] == "judge" for v in votes)
    assert not arena.votes_path.exists()  # kept apart from people's votes
    board = arena.leaderboard("judge")
    assert list(board.elo.values()) == pytest.approx([1000] * 3)
    # Judged battles are not judged again by the same judge model.
    assert run_judge(arena, Judge(server.url, "sk-none")).judged == 0 and len(server.prompts) == 8


def test_a_judge_that_prefers_one_model_gives_it_the_wins_and_agreement_is_counted(tmp_path, stub):
    arena = Arena(tmp_path)
    battles = store_battles(arena, [("run-x", "base")] * 4)
    server = stub(lambda first, second: "[[1]]" if first == GOOD else "[[2]]")
    assert run_judge(arena, Judge(server.url, "", "stub-judge")).ties_from_flips == 0
    votes = read_votes(arena.judge_path)
    assert all(v["model_a" if v["winner"] == "model_a" else "model_b"] == "run-x" for v in votes)
    assert {v["winner"] for v in votes} == {"model_a", "model_b"}  # run-x was shown first and second
    assert arena.leaderboard("judge").models == ["run-x", "base"]
    # People agree on three battles of four: agreement 75%.
    for b, choice in zip(battles, ["A", "B", "A", "A"]):
        arena.vote(b.id, choice, "person")
    assert arena.agreement() == (0.75, 4)


def test_judge_errors_are_user_errors(tmp_path, stub):
    with pytest.raises(ArenaError, match="not an http"):
        Judge("localhost:1234", "k")
    with pytest.raises(ArenaError, match="Cannot reach the judge endpoint"):
        Judge("http://127.0.0.1:9/v1", "k", "m", timeout=2).ask("q", "a", "b")
    assert parse_verdict("blah [[2]]") == "second" and parse_verdict("8 7\nbecause") == "first"
    assert parse_verdict("[[TIE]]") == "tie" and parse_verdict("I cannot decide") is None


def test_cli_judge_then_elo(tmp_path, stub, capsys):
    from qlora_ui.cli import main as cli_main

    arena = Arena(tmp_path)
    store_battles(arena, [("run-x", "base")] * 3)
    server = stub(lambda first, second: "[[1]]" if first == GOOD else "[[2]]")
    assert cli_main(["arena", "judge", "--runs-dir", str(tmp_path), "--url", server.url, "--key", "k"]) == 0
    assert "3 battles judged" in capsys.readouterr().out
    assert cli_main(["arena", "elo", "--votes", str(arena.judge_path), "--json", "--permutations", "100"]) == 0
    ratings = json.loads(capsys.readouterr().out)["ratings"]
    assert list(ratings) == ["run-x", "base"] and ratings["run-x"]["games"] == 3


def test_the_tabs_handlers_say_what_to_fix_and_show_the_judge_beside_people(tmp_path, stub):
    import gradio as gr

    from qlora_ui.studio import Studio
    from qlora_ui.ui.tabs import arena as tab
    from tests.fault_helpers import ByName

    studio, c = Studio(tmp_path / "runs"), ByName()
    ask = {"contestants": ["bundled:SmolLM2-135M-Instruct"], "source": tab.TYPED, "typed": "Hi", "prompt_run": None,
           "file": None, "temperature": 0.7, "max_new_tokens": 16, "seed": 0}
    with pytest.raises(gr.Error, match="at least two contestants"):
        tab.new_battle(studio, c, ask)
    with pytest.raises(gr.Error, match="Type a prompt first"):
        tab.new_battle(studio, c, ask | {"typed": "  \n", "contestants": ["x", "y"]})
    with pytest.raises(gr.Error, match="not a contestant here"):
        tab.new_battle(studio, c, ask | {"contestants": ["x", "y"]})
    with pytest.raises(gr.Error, match="No battle to vote on"):
        tab.vote(studio, c, "", "A", "s1")
    battles = store_battles(studio.arena, [("run-x", "base")] * 2)
    assert tab.next_battle(studio, c, "s1")["battle"] == battles[0].id
    out = tab.vote(studio, c, battles[0].id, "B", "s1")
    assert "A was <b>run-x</b>" in out["reveal"] and "you voted B" in out["reveal"]
    assert out["board"][0][1] == "base" and out["judge_board"] == [] and "1 people's votes" in out["agreement"]
    server = stub(lambda first, second: "[[1]]" if first == GOOD else "[[2]]")
    out = tab.run_judge(studio, c, {"judge_url": server.url, "judge_key": "k", "judge_model": ""})
    assert "2 battles judged now" in out["judge_status"] and out["judge_board"][0][1] == "run-x"
    assert "judge agrees with people on 0% of 1" in out["agreement"]
    assert len(out["plot"].data) == 2  # people's and the judge's Elo, with their intervals
    with pytest.raises(gr.Error, match="Cannot reach the judge endpoint"):
        tab.run_judge(studio, c, {"judge_url": "http://127.0.0.1:9/v1", "judge_key": "k", "judge_model": "m"})
    # Shared beyond this machine, a visitor cannot make the server call addresses of their choosing.
    studio.api_access = "key"
    before = len(server.prompts)
    with pytest.raises(gr.Error, match="only in an app reachable from this machine alone"):
        tab.run_judge(studio, c, {"judge_url": server.url, "judge_key": "k", "judge_model": ""})
    assert len(server.prompts) == before


# ---- in Chromium: two sessions, one battle ----

@pytest.fixture(scope="module")
def arena_app(tmp_path_factory, tiny_model_dir):
    """The app with one finished run on the tiny model, so that its adapter and its base can battle. The adapter is
    made directly (a nudged fresh LoRA, as training would save it): training it would add seconds and test nothing
    here."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_ui.runs import create_run

    tmp = tmp_path_factory.mktemp("arena-app")
    model = tmp / "models" / "tiny"  # where start_app puts it: under the app's --model-root
    shutil.copytree(tiny_model_dir, model)
    run = create_run(fast_cfg(model, write_rows(tmp / "rows.jsonl"), runs_dir=str(tmp / "runs"), name="arena"))
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    nudge_adapter(peft, seed=0, scale=0.5).save_pretrained(run.adapter_dir)
    run.write_status("finished")
    proc, url = start_app(tmp, tiny_model_dir)
    yield url, tmp, run.name, model.name
    proc.terminate()
    proc.wait(30)


def open_arena(page, url: str):
    page.goto(url)
    page.get_by_role("tab", name="Evaluate").click()
    page.wait_for_selector("#arena-new", timeout=90_000)
    return page


def toast_text(page) -> str:
    page.wait_for_selector(".toast-body", timeout=20_000)
    text = page.locator(".toast-body").first.inner_text()
    page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")
    return text


@pytest.mark.slow
def test_two_sessions_vote_on_one_battle_in_the_browser(browser, arena_app):
    url, tmp, run_name, base_name = arena_app
    a = open_arena(browser.new_context(viewport=VIEWPORT).new_page(), url)
    b = open_arena(browser.new_context(viewport=VIEWPORT).new_page(), url)

    # Session 1 picks both contestants, types a prompt and starts a battle: two answers, no names.
    for name in (run_name, base_name):
        a.locator("#arena-contestants input").click()
        a.get_by_role("option", name=name, exact=True).click()
    a.keyboard.press("Escape")
    a.locator("#arena-typed textarea").fill("Say the word number 3.")
    a.locator("#arena-new").click()
    a.wait_for_function("document.querySelector('#arena-a textarea').value.length > 0 && "
                        "document.querySelector('#arena-b textarea').value.length > 0", timeout=60_000)
    page_text = a.locator("body").inner_text()
    assert "A was" not in page_text and "B was" not in page_text
    assert run_name not in a.locator("#arena-prompt").inner_text() + a.locator("#arena-reveal").inner_text()

    # Session 1 votes A: the names appear, the leaderboard counts one vote.
    a.locator("#arena-vote-a").click()
    a.wait_for_selector("#arena-reveal:has-text('A was')", timeout=20_000)
    reveal = a.locator("#arena-reveal").inner_text()
    assert run_name in reveal and base_name in reveal
    a.wait_for_selector("#arena-agreement:has-text('1 people')", timeout=20_000)
    assert a.locator("#arena-board").inner_text().count(run_name) == 1

    # Session 2 rates the same stored battle: same answers, names hidden until it votes too.
    b.locator("#arena-next").click()
    b.wait_for_function("document.querySelector('#arena-a textarea').value.length > 0", timeout=20_000)
    for side in ("a", "b"):
        assert b.locator(f"#arena-{side} textarea").input_value() == a.locator(f"#arena-{side} textarea").input_value()
    assert "A was" not in b.locator("#arena-reveal").inner_text()
    b.locator("#arena-vote-b").click()
    b.wait_for_selector("#arena-reveal:has-text('A was')", timeout=20_000)
    b.wait_for_selector("#arena-agreement:has-text('2 people')", timeout=20_000)

    # A repeated vote in one session is refused, and not written.
    a.locator("#arena-vote-b").click()
    assert "already voted" in toast_text(a)
    votes = [json.loads(line) for line in (tmp / "runs" / "arena" / "votes.jsonl").read_text().splitlines()]
    assert len(votes) == 2 and len({v["session"] for v in votes}) == 2
    assert len({v["battle"] for v in votes}) == 1 and [v["winner"] for v in votes] == ["model_a", "model_b"]
    assert {votes[0]["model_a"], votes[0]["model_b"]} == {run_name, base_name}

    # Session 1's leaderboard, refreshed, shows both votes; no more unrated battles for session 2.
    a.locator("#arena-refresh-board").click()
    a.wait_for_selector("#arena-agreement:has-text('2 people')", timeout=20_000)
    b.locator("#arena-next").click()
    wait_for(lambda: "No unrated battles" in b.locator("body").inner_text(), 20, "the 'no unrated battles' note")
