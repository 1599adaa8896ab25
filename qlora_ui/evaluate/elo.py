"""Elo ratings from pairwise votes, as the QLoRA paper computes them (Dettmers et al. 2023, sec. 5.1 and appendix):
every model starts at 1000, each game moves both ratings by K = 32 times (score - expected score), a tie scores half a
win, and since Elo depends on the order of the games, the ratings are averaged over many (10,000) random orderings of
the same games, with the 2.5th and 97.5th percentiles over those orderings as the 95% interval.

Votes are read in the LMSYS battle format (one JSON object per line: `model_a`, `model_b`, `winner` in `model_a`,
`model_b`, `tie`), so files from other arenas rate here and ours rate there.

The orderings are run side by side: one numpy step per game updates that game's two ratings in every ordering at
once (bench/elo.py measures it against a plain-Python loop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArenaError

INIT_RATING = 1000.0
K = 32.0
SCALE = 400.0  # a 400-point gap means 10:1 expected odds, the chess convention the paper keeps
PERMUTATIONS = 10_000
WINNERS = ("model_a", "model_b", "tie")
SCORE = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}  # model_a's score; model_b's is 1 - that
CHUNK = 2_500  # orderings computed at once: 2,500 x 1,000 games of int32 indexes is 10 MB


@dataclass(frozen=True)
class Game:
    model_a: str
    model_b: str
    winner: str  # one of WINNERS


@dataclass
class Leaderboard:
    models: list[str]  # best first
    elo: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    games: dict[str, int]
    win_rate: dict[str, dict[str, float | None]] = field(default_factory=dict)  # [row][col]: row's score vs col
    pair_votes: dict[str, dict[str, int]] = field(default_factory=dict)
    permutations: int = PERMUTATIONS

    def as_json(self) -> dict:
        """The CLI's `--json` shape: {"ratings": {model: {elo, low, high, games}}}, best first."""
        return {"ratings": {m: {"elo": round(self.elo[m], 2), "low": round(self.low[m], 2),
                                "high": round(self.high[m], 2), "games": self.games[m]} for m in self.models}}

    def rows(self) -> list[list]:
        """[rank, model, elo, low, high, games] per model, best first."""
        return [[i + 1, m, round(self.elo[m]), round(self.low[m]), round(self.high[m]), self.games[m]]
                for i, m in enumerate(self.models)]


def parse_vote(line: str, where: str) -> dict:
    """One LMSYS-format vote, or an ArenaError naming `where` (the file and line) and what is wrong."""
    try:
        v = json.loads(line)
    except ValueError as e:
        raise ArenaError(f"{where}: not valid JSON ({e.msg}). Each line must be one JSON object with model_a, "
                         "model_b and winner.") from None
    if not isinstance(v, dict):
        raise ArenaError(f"{where}: a JSON object is expected, got {type(v).__name__}.")
    missing = [k for k in ("model_a", "model_b", "winner") if k not in v]
    if missing:
        raise ArenaError(f"{where}: missing {', '.join(missing)}. Each vote needs model_a, model_b and winner.")
    a, b, w = v["model_a"], v["model_b"], v["winner"]
    if not (isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()):
        raise ArenaError(f"{where}: model_a and model_b must be non-empty model names.")
    if a == b:
        raise ArenaError(f"{where}: model_a and model_b are both '{a[:80]}'; a game needs two different models.")
    if w not in WINNERS:
        # LMSYS also writes 'tie (bothbad)': a tie for rating purposes.
        if w == "tie (bothbad)":
            v["winner"] = "tie"
        else:
            raise ArenaError(f"{where}: winner is {json.dumps(w)[:80]}; it must be one of model_a, model_b, tie.")
    return v


def read_votes(path: str | Path) -> list[dict]:
    """Every vote of a JSONL file (blank lines skipped), or one ArenaError naming the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArenaError(f"{path}: no such votes file. Vote in the Arena (Evaluate tab) or give a JSONL file of "
                         "LMSYS-format battles.") from None
    except UnicodeDecodeError as e:
        raise ArenaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    return [parse_vote(line, f"{path.name} line {i}") for i, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def games_of(votes: list[dict]) -> list[Game]:
    return [Game(v["model_a"], v["model_b"], v["winner"]) for v in votes]


def _encode(games: list[Game]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(models sorted by name, a index, b index, model_a's score), the games put in one canonical form and order
    first: the orderings are drawn over that, so the result does not depend on the order the votes were written in,
    nor on which model a vote wrote first (a game between b and a won by b is the same game as a vs b won by b)."""
    models = sorted({g.model_a for g in games} | {g.model_b for g in games})
    idx = {m: i for i, m in enumerate(models)}
    coded = sorted((idx[g.model_a], idx[g.model_b], SCORE[g.winner]) if idx[g.model_a] < idx[g.model_b]
                   else (idx[g.model_b], idx[g.model_a], 1.0 - SCORE[g.winner]) for g in games)
    arr = np.array(coded, dtype=np.float64).reshape(-1, 3)
    return models, arr[:, 0].astype(np.intp), arr[:, 1].astype(np.intp), arr[:, 2]


def elo_orderings(a: np.ndarray, b: np.ndarray, score: np.ndarray, n_models: int, orders: np.ndarray) -> np.ndarray:
    """Final ratings [n_orderings, n_models] after playing the games in each row's order of `orders`
    [n_orderings, n_games]. One numpy step per game, over every ordering at once."""
    n = orders.shape[0]
    ratings = np.full((n, n_models), INIT_RATING)
    flat = ratings.reshape(-1)
    base = np.arange(n, dtype=np.intp) * n_models
    for g in orders.T:  # the t-th game of every ordering
        ia, ib = base + a[g], base + b[g]
        ea = 1.0 / (1.0 + 10.0 ** ((flat[ib] - flat[ia]) / SCALE))
        d = K * (score[g] - ea)  # b's update is -d: its expected score is 1 - ea, its score 1 - score
        flat[ia] += d
        flat[ib] -= d
    return ratings


def elo_python(games: list[Game], order: list[int]) -> dict[str, float]:
    """The paper's loop, one ordering, in plain Python: the reference (tests, bench/elo.py)."""
    rating: dict[str, float] = {}
    for i in order:
        g = games[i]
        ra, rb = rating.get(g.model_a, INIT_RATING), rating.get(g.model_b, INIT_RATING)
        ea = 1 / (1 + 10 ** ((rb - ra) / SCALE))
        eb = 1 / (1 + 10 ** ((ra - rb) / SCALE))
        sa = SCORE[g.winner]
        rating[g.model_a] = ra + K * (sa - ea)
        rating[g.model_b] = rb + K * (1 - sa - eb)
    return rating


def compute(games: list[Game], permutations: int = PERMUTATIONS, seed: int = 0) -> Leaderboard:
    """The paper's Elo: mean over `permutations` random orderings, 2.5/97.5 percentiles as the interval; plus
    games per model, the win-rate matrix and votes per pair (those do not depend on order)."""
    if not games:
        raise ArenaError("No votes yet: rate some battles in the Arena (or give a votes file) first.")
    if permutations < 1:
        raise ArenaError(f"permutations is {permutations}; it must be at least 1 (the paper used 10,000).")
    models, a, b, score = _encode(games)
    p, m = len(models), len(a)
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, permutations, CHUNK):
        n = min(CHUNK, permutations - start)
        orders = rng.permuted(np.broadcast_to(np.arange(m, dtype=np.int32), (n, m)), axis=1)
        parts.append(elo_orderings(a, b, score, p, orders))
    all_ratings = np.concatenate(parts)
    mean = all_ratings.mean(axis=0)
    low, high = np.percentile(all_ratings, [2.5, 97.5], axis=0)

    games_n = np.bincount(a, minlength=p) + np.bincount(b, minlength=p)
    won = np.zeros((p, p))  # won[i, j]: i's score against j, summed over their games
    played = np.zeros((p, p), dtype=np.int64)
    np.add.at(won, (a, b), score)
    np.add.at(won, (b, a), 1.0 - score)
    np.add.at(played, (a, b), 1)
    np.add.at(played, (b, a), 1)
    order = sorted(range(p), key=lambda i: (-mean[i], models[i]))
    ranked = [models[i] for i in order]
    win_rate = {models[i]: {models[j]: (float(won[i, j] / played[i, j]) if played[i, j] else None)
                            for j in order} for i in order}
    pair_votes = {models[i]: {models[j]: int(played[i, j]) for j in order} for i in order}
    return Leaderboard(models=ranked, elo={models[i]: float(mean[i]) for i in range(p)},
                       low={models[i]: float(low[i]) for i in range(p)},
                       high={models[i]: float(high[i]) for i in range(p)},
                       games={models[i]: int(games_n[i]) for i in range(p)}, win_rate=win_rate,
                       pair_votes=pair_votes, permutations=permutations)


def format_table(board: Leaderboard) -> str:
    head = ["rank", "model", "elo", "95% interval", "games"]
    body = [[str(r), m, str(e), f"{lo} to {hi}", str(n)] for r, m, e, lo, hi, n in board.rows()]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [head, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)
