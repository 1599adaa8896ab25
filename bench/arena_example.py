"""The arena's measured example (docs/evaluation.md): the bundled base, a 16-bit LoRA run and an NF4 QLoRA run of the
same recipe, in blind battles on held-out prompts, rated, and turned into the paper's Elo.

    python bench/arena_example.py [--steps 60] [--tokens 48] [--runs DIR]

1. Two runs of the cpu-quickstart recipe (pirate chat data, the same rows, seed and steps): one with the base in
   16 bits (`--load-in-4bit false`, LoRA), one in NF4 with double quantization (QLoRA). The 16-bit run is made
   first, so the base contestant answers with the newest run's quantization: the 4-bit base.
2. Each contestant answers 20 prompts written for the bench (none in the training data; checked) through the arena's
   own answer path (qlora_ui/evaluate/arena.py: same settings and seed, greedy); every pair of contestants then meets
   on every prompt, its two answers in random order as the blind A/B.
3. The rater is a rule, not a person or a model, and says so in the votes' `source`: the task is the pirate voice,
   so the answer with more pirate words wins, unless it repeats a word pair three times or more (a degenerate
   reply loses to one that does not); equal counts are a tie. It reads the answers as the blind A/B a person sees.
4. The Elo: `python -m qlora_ui arena elo --votes FILE --json` (start 1000, K 32, ties as half wins, mean over
   10,000 orderings with a 95% interval), printed with the win-rate matrix.

Writes bench/results/arena_example.json and .txt (the votes file beside them: arena_example_votes.jsonl).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

from common import CLI, ROOT, app_env

sys.path.insert(0, str(Path(__file__).parent))
from preference import PIRATE, STYLE_PROMPTS, loops  # noqa: E402 - the style rule and prompts of bench/preference.py

from qlora_ui.chat import GenerationSettings  # noqa: E402
from qlora_ui.evaluate.arena import _answer, contestants, prompt_hash  # noqa: E402
from qlora_ui.studio import Studio  # noqa: E402


def train(runs: Path, name: str, steps: int, extra: list[str]) -> None:
    p = subprocess.run([*CLI, "train", "--preset", "cpu-quickstart", "--max-steps", str(steps), "--name", name,
                        "--runs-dir", str(runs), "--quiet", *extra], cwd=ROOT, env=app_env(), capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{p.stderr[-3000:]}")


def rule_winner(a: str, b: str) -> str:
    """The rule rater: which blind answer is the better pirate answer ("model_a", "model_b" or "tie")."""
    score = [(not loops(x), len(PIRATE.findall(x))) for x in (a, b)]
    return "tie" if score[0] == score[1] else ("model_a" if score[0] > score[1] else "model_b")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/qlora-bench-arena-example"))
    a = ap.parse_args()
    corpus = (ROOT / "presets" / "data" / "pirate_chat.jsonl").read_text().lower()
    leaked = [q for q in STYLE_PROMPTS if json.dumps(q.lower())[1:-1] in corpus]
    assert not leaked, f"prompts found in the training data: {leaked}"
    if not any(a.runs.glob("*-lora16")):
        train(a.runs, "lora16", a.steps, ["--load-in-4bit", "false"])
    if not any(a.runs.glob("*-qlora-nf4")):
        train(a.runs, "qlora-nf4", a.steps, [])
    studio = Studio(runs_dir=a.runs)
    targets = {t.id: t for t in contestants(studio) if t.gguf is None}
    base = next(i for i, t in targets.items() if t.adapter is None)
    lora16 = next(i for i in targets if i.endswith("-lora16"))
    qlora = next(i for i in targets if i.endswith("-qlora-nf4"))
    assert targets[base].cfg.quantization.load_in_4bit, "the base contestant should answer in 4-bit"
    names = {base: "base (NF4)", lora16: "16-bit LoRA", qlora: "NF4 QLoRA"}
    settings = GenerationSettings(temperature=0.0, max_new_tokens=a.tokens, seed=0)
    # Each contestant answers every prompt with the same settings and seed, one contestant at a time: the chat engine
    # holds one base at a time, and battles between the 16-bit and the 4-bit base would load one per answer.
    answers = {}
    for cid in names:
        for prompt in STYLE_PROMPTS:
            answers[cid, prompt] = _answer(studio, targets[cid], [{"role": "user", "content": prompt}], settings)
        print(f"{names[cid]}: {len(STYLE_PROMPTS)} answers", flush=True)
    rng = random.Random(0)
    votes, shown = [], []
    for prompt in STYLE_PROMPTS:
        for pair in itertools.combinations(names, 2):
            x, y = rng.sample(pair, 2)  # the blind order: which one is shown as "A"
            winner = rule_winner(answers[x, prompt], answers[y, prompt])
            votes.append({"model_a": names[x], "model_b": names[y], "winner": winner,
                          "prompt_hash": prompt_hash([{"role": "user", "content": prompt}]), "session": "rule",
                          "source": "rule: pirate words, no loops"})
            shown.append({"prompt": prompt, "a": names[x], "b": names[y], "answer_a": answers[x, prompt],
                          "answer_b": answers[y, prompt], "winner": winner})
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    votes_path = out / "arena_example_votes.jsonl"
    votes_path.write_text("".join(json.dumps(v) + "\n" for v in votes))
    p = subprocess.run([*CLI, "arena", "elo", "--votes", str(votes_path), "--json"], cwd=ROOT, env=app_env(),
                       capture_output=True, text=True, check=True)
    elo = json.loads(p.stdout)
    from qlora_ui.evaluate.elo import compute, games_of

    board = compute(games_of(votes))
    result = {"steps": a.steps, "tokens": a.tokens, "battles": len(votes), "elo": elo["ratings"],
              "win_rate": board.win_rate, "battles_shown": shown}
    (out / "arena_example.json").write_text(json.dumps(result, indent=2))
    lines = ["| contestant | Elo (mean of 10,000 orderings) | 95% interval | games |", "|---|---|---|---|"]
    for m, r in sorted(elo["ratings"].items(), key=lambda kv: -kv[1]["elo"]):
        lines.append(f"| {m} | {r['elo']:.0f} | {r['low']:.0f} - {r['high']:.0f} | {r['games']} |")
    lines += ["", "win rate (row's score against column; ties count half):", ""]
    models = list(board.models)
    lines.append("| | " + " | ".join(models) + " |")
    lines.append("|---|" + "---|" * len(models))
    for m in models:
        cells = ["—" if board.win_rate[m].get(o) is None else f"{board.win_rate[m][o]:.2f}" for o in models]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    wins = {m: sum(v["winner"] == "tie" for v in votes if m in (v["model_a"], v["model_b"])) for m in names.values()}
    lines.append("")
    lines.append("ties per contestant: " + ", ".join(f"{m} {n}" for m, n in wins.items()))
    (out / "arena_example.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
