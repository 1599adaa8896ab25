"""`python -m qlora_ui arena elo|judge`: the arena's Elo from a votes file, and the judge over stored battles.

A malformed votes file is a user error (errors.ArenaError naming the line): one message, exit 2, like every CLI here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .elo import PERMUTATIONS, compute, format_table, games_of, read_votes


def add_arena_parser(sub) -> None:
    p = sub.add_parser("arena", help="The arena: Elo ratings from votes, the judge model over stored battles.",
                       description="Elo as in the QLoRA paper (start 1000, K 32, ties half a win, mean over random "
                                   "orderings with a 95% interval), from LMSYS-format votes. See "
                                   "docs/evaluation.md.")
    arena_sub = p.add_subparsers(dest="arena_command", required=True)

    e = arena_sub.add_parser("elo", help="Elo ratings from a votes file (JSON lines: model_a, model_b, winner).")
    e.add_argument("--votes", required=True, metavar="FILE",
                   help="Votes, one JSON object per line (e.g. runs/arena/votes.jsonl).")
    e.add_argument("--permutations", type=int, default=PERMUTATIONS, metavar="N",
                   help=f"Random orderings the ratings are averaged over (default {PERMUTATIONS:,}, the paper's).")
    e.add_argument("--seed", type=int, default=0, metavar="S", help="Seed of the random orderings.")
    e.add_argument("--json", action="store_true",
                   help='Print {"ratings": {model: {"elo", "low", "high", "games"}}} instead of a table.')
    e.set_defaults(func=elo_main)

    j = arena_sub.add_parser("judge", help="Rate the stored battles with a judge model (both orders each).")
    j.add_argument("--runs-dir", default="runs", help="Runs folder whose arena/ holds the battles.")
    j.add_argument("--url", required=True, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1.")
    j.add_argument("--key", default="", help="API key (or set it in the OPENAI_API_KEY environment variable).")
    j.add_argument("--model", default="", help="Judge model name (default: the first the endpoint lists).")
    j.add_argument("--limit", type=int, default=None, metavar="N", help="Judge at most N battles.")
    j.set_defaults(func=judge_main)


def elo_main(args) -> int:
    board = compute(games_of(read_votes(args.votes)), permutations=args.permutations, seed=args.seed)
    if args.json:
        print(json.dumps(board.as_json()))
    else:
        print(format_table(board))
        print(f"\nmean over {board.permutations:,} random orderings; interval: 2.5th to 97.5th percentile")
    return 0


def judge_main(args) -> int:
    import os

    from .arena import Arena
    from .judge import Judge, run_judge

    arena = Arena(Path(args.runs_dir))
    judge = Judge(args.url, args.key or os.environ.get("OPENAI_API_KEY", ""), args.model)
    result = run_judge(arena, judge, args.limit,
                       progress=lambda i, n: print(f"[{i}/{n}] battles judged", file=sys.stderr))
    print(f"judge {result.model}: {result.judged} battles judged ({result.ties_from_flips} ties from a verdict that "
          f"flipped with the order), {result.skipped} judged before, {result.unparsed} without a verdict")
    board = arena.leaderboard("judge")
    if board is not None:
        print(format_table(board))
    return 0
