"""The paper's Elo (qlora_ui/evaluate/elo.py) and `python -m qlora_ui arena elo`: known strengths come out in order
and inside their intervals, ties rate equal, the written order of the votes does not matter, the numpy orderings are
the plain loop's, and a malformed file is one message naming its line (exit 2)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from qlora_ui.cli import main as cli_main
from qlora_ui.errors import ArenaError
from qlora_ui.evaluate.elo import Game, _encode, compute, elo_orderings, elo_python, read_votes
from tests.fault_helpers import cli

GAP = 100  # Elo points between neighbouring players


def synthetic(seed: int, n: int = 1000, players: int = 5, ties: float = 0.1) -> list[Game]:
    """Votes drawn from known strengths: player i is i * GAP points above player 0, 10% of games tied."""
    rng = random.Random(seed)
    games = []
    for _ in range(n):
        a, b = rng.sample(range(players), 2)
        p_a = 1 / (1 + 10 ** ((b - a) * GAP / 400))
        w = "tie" if rng.random() < ties else ("model_a" if rng.random() < p_a else "model_b")
        games.append(Game(f"p{a}", f"p{b}", w))
    return games


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_strengths_are_ordered_and_inside_their_intervals(seed):
    board = compute(synthetic(seed), permutations=2000, seed=seed)
    assert board.models == ["p4", "p3", "p2", "p1", "p0"]
    # The true ratings, centred on the start rating (Elo only knows differences; the mean stays at 1000).
    for i in range(5):
        m, true = f"p{i}", 1000 + (i - 2) * GAP
        assert board.low[m] <= true <= board.high[m], (m, board.low[m], true, board.high[m])
        assert board.low[m] < board.elo[m] < board.high[m]
    assert sum(board.games.values()) == 2 * 1000
    assert abs(np.mean(list(board.elo.values())) - 1000) < 1e-6  # each game moves the two ratings by +d and -d


def test_all_ties_give_equal_ratings():
    games = [Game(a, b, "tie") for a, b in [("x", "y"), ("y", "z"), ("z", "x")] * 20]
    board = compute(games, permutations=500)
    for m in "xyz":
        assert board.elo[m] == pytest.approx(1000) and board.low[m] == pytest.approx(1000)
        assert board.high[m] == pytest.approx(1000) and board.games[m] == 40
    assert board.win_rate["x"]["y"] == 0.5


def test_result_does_not_depend_on_the_written_order_of_the_votes():
    games = synthetic(7, n=300)
    shuffled = list(games)
    random.Random(1).shuffle(shuffled)
    # The same game written as (b, a) with the winner mirrored is the same game too.
    mirrored = [Game(g.model_b, g.model_a, {"model_a": "model_b", "model_b": "model_a", "tie": "tie"}[g.winner])
                for g in shuffled]
    first = compute(games, permutations=300, seed=3).as_json()
    assert compute(shuffled, permutations=300, seed=3).as_json() == first
    assert compute(mirrored, permutations=300, seed=3).as_json() == first


def test_numpy_orderings_equal_the_papers_loop():
    games = synthetic(3, n=200)
    models, a, b, score = _encode(games)
    winner = {1.0: "model_a", 0.0: "model_b", 0.5: "tie"}
    canon = [Game(models[i], models[j], winner[s]) for i, j, s in zip(a, b, score)]
    rng = np.random.default_rng(0)
    orders = np.stack([rng.permutation(len(canon)) for _ in range(4)])
    fast = elo_orderings(a, b, score, len(models), orders)
    for row, order in zip(fast, orders):
        slow = elo_python(canon, order.tolist())
        assert row == pytest.approx([slow[m] for m in models], abs=1e-9)


def test_win_rates_and_votes_per_pair():
    games = [Game("x", "y", "model_a"), Game("y", "x", "model_b"), Game("x", "y", "tie"), Game("x", "z", "model_b")]
    board = compute(games, permutations=50)
    assert board.win_rate["x"]["y"] == pytest.approx(2.5 / 3) and board.win_rate["y"]["x"] == pytest.approx(0.5 / 3)
    assert board.win_rate["z"]["x"] == 1.0 and board.win_rate["y"]["z"] is None
    assert board.pair_votes["x"]["y"] == 3 and board.pair_votes["z"]["y"] == 0
    assert board.games == {"x": 4, "y": 3, "z": 1}


def write_votes(path, games: list[Game]):
    path.write_text("".join(json.dumps({"model_a": g.model_a, "model_b": g.model_b, "winner": g.winner,
                                        "source": "human"}) + "\n" for g in games))
    return path


def test_cli_json_shape(tmp_path):
    votes = write_votes(tmp_path / "votes.jsonl", synthetic(0, n=200, players=3))
    r = cli("arena", "elo", "--votes", votes, "--permutations", "200", "--seed", "1", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out) == ["ratings"] and list(out["ratings"]) == ["p2", "p1", "p0"]
    for rating in out["ratings"].values():
        assert set(rating) == {"elo", "low", "high", "games"}
        assert rating["low"] <= rating["elo"] <= rating["high"] and isinstance(rating["games"], int)
    assert sum(r["games"] for r in out["ratings"].values()) == 400


@pytest.mark.parametrize("line, says", [
    ("{not json", "not valid JSON"),
    ('{"model_a": "x", "winner": "tie"}', "missing model_b"),
    ('{"model_a": "x", "model_b": "y", "winner": "a"}', "must be one of model_a, model_b, tie"),
    ('{"model_a": "x", "model_b": "x", "winner": "tie"}', "two different models"),
    ('["x", "y"]', "JSON object is expected"),
])
def test_a_malformed_votes_file_names_its_line_and_exits_2(tmp_path, capsys, line, says):
    votes = write_votes(tmp_path / "votes.jsonl", synthetic(0, n=3))
    votes.write_text(votes.read_text() + "\n" + line + "\n")  # line 4 blank, line 5 bad
    assert cli_main(["arena", "elo", "--votes", str(votes), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.count("\n") == 0 and "line 5" in err and says in err, err
    with pytest.raises(ArenaError, match="line 5"):
        read_votes(votes)


def test_a_missing_or_empty_votes_file_is_a_user_error(tmp_path, capsys):
    assert cli_main(["arena", "elo", "--votes", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such votes file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert cli_main(["arena", "elo", "--votes", str(tmp_path / "empty.jsonl")]) == 2
    assert "No votes yet" in capsys.readouterr().err
