"""Elo over 10,000 random orderings of 1,000 votes among 5 models (the paper's procedure, qlora_ui/evaluate/elo.py):
the numpy version that runs every ordering side by side, against the paper's plain-Python loop in this process.

The plain loop is timed on a slice of the orderings (--baseline-orderings, default 500) and scaled to the full count:
its time grows linearly with the orderings, and running all 10,000 of them costs a minute of a shared CPU.

    .venv/bin/python bench/elo.py [--permutations 10000] [--votes 1000] [--models 5]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
from common import meets, table

from qlora_ui.evaluate.elo import Game, compute, elo_python

GOAL_S = 2.0


def synthetic_games(n_votes: int, n_models: int, seed: int = 0) -> list[Game]:
    """Votes drawn from known strengths (100 Elo points apart), 10% ties."""
    rng = random.Random(seed)
    models = [f"model-{i}" for i in range(n_models)]
    games = []
    for _ in range(n_votes):
        a, b = rng.sample(range(n_models), 2)
        p_a = 1 / (1 + 10 ** ((b - a) * 100 / 400))
        w = "tie" if rng.random() < 0.1 else ("model_a" if rng.random() < p_a else "model_b")
        games.append(Game(models[a], models[b], w))
    return games


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--permutations", type=int, default=10_000)
    ap.add_argument("--votes", type=int, default=1_000)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--baseline-orderings", type=int, default=500)
    args = ap.parse_args()
    games = synthetic_games(args.votes, args.models)

    compute(games[:50], permutations=10)  # warm numpy's first calls
    t0 = time.perf_counter()
    board = compute(games, permutations=args.permutations, seed=0)
    fast = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    n = min(args.baseline_orderings, args.permutations)
    t0 = time.perf_counter()
    plain = [elo_python(games, rng.permutation(len(games)).tolist()) for _ in range(n)]
    slow = (time.perf_counter() - t0) * args.permutations / n
    plain_mean = {m: float(np.mean([r[m] for r in plain])) for m in board.models}
    gap = max(abs(plain_mean[m] - board.elo[m]) for m in board.models)

    print(table(["measure", "value", "goal", "met"], [
        [f"numpy: {args.permutations:,} orderings of {args.votes:,} votes, {args.models} models", f"{fast:.2f} s",
         f"<= {GOAL_S:g} s", meets(fast, "<=", GOAL_S)],
        [f"plain-Python loop (timed on {n:,} orderings, scaled)", f"{slow:.1f} s", "", ""],
        ["speed-up", f"{slow / fast:.0f}x", "", ""],
        ["largest |mean Elo numpy - plain| (different random orderings)", f"{gap:.1f}", "", ""],
    ]))
    print()
    print(table(["model", "elo", "low", "high", "games"],
                [[m, f"{board.elo[m]:.0f}", f"{board.low[m]:.0f}", f"{board.high[m]:.0f}", str(board.games[m])]
                 for m in board.models]))


if __name__ == "__main__":
    main()
