"""SFT -> DPO on the bundled model and the bundled pirate preference pairs, run alone:
`python bench/preference.py [--sft-steps N] [--dpo-steps N] [--dpo-lr LR[,LR...]]`.

Each stage is the project's own CLI in a child process (so each peak RSS is that stage's alone): SFT with the
cpu-quickstart recipe on the pirate chat rows at batch B, then DPO with the cpu-dpo preset from that run's adapter
(one DPO run per learning rate given), B pairs a step (2B sequences), evaluated on its held-out pairs at the end.
Reports the held-out reward accuracy and margin, and the peak RSS of each stage (the largest rss_gb of its metrics
rows) and their ratio.

The style table: prompts written for this bench (none is in the corpus) answered greedily by the SFT adapter and by
each DPO adapter on one 4-bit base in this process; a reply counts as "in the preferred style" when it has the pirate
markers every chosen answer of the data has and no rejected one does ("Arr", "Yo-ho-ho") or the corpus's pirate
words ("ye", "yer", "th'", "matey", "ahoy"). Writes bench/results/preference.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

from common import CLI, ROOT, app_env

from qlora_ui.runs import open_run


def stage(args: list[str], runs: Path) -> tuple[Path, float]:
    before = set(runs.glob("*")) if runs.exists() else set()
    t0 = time.time()
    p = subprocess.run([*CLI, "train", *args, "--runs-dir", str(runs)], cwd=ROOT, env=app_env(),
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"stage failed ({p.returncode}): {' '.join(args)}\n{p.stderr[-3000:]}")
    (run,) = set(runs.glob("*")) - before
    return run, time.time() - t0


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# Held-out prompts: not in the chatterbot corpus the pairs come from (checked by main against the data file).
STYLE_PROMPTS = [
    "What is your favourite colour?", "How do I bake bread?", "Tell me about the ocean.",
    "Can you help me with my homework?", "What should I eat for breakfast?", "Why is the sky blue?",
    "Recommend a good book.", "How do I learn to swim?", "What is the capital of France?",
    "Do you like music?", "How can I sleep better?", "How do volcanoes work?", "Tell me about your day.",
    "How do plants grow?", "What makes a good friend?", "Where do you live?", "How cold is the moon?",
    "What is your name?", "Give me some advice.", "Do you know any games?",
]
def loops(reply: str) -> bool:
    """A degenerate reply: some word pair three times or more ("o' o' o'", "th' game o' th' game")."""
    words = re.findall(r"[\w']+", reply.lower())
    pairs = list(zip(words, words[1:]))
    return any(pairs.count(p) >= 3 for p in set(pairs))


PIRATE = re.compile(r"\b(arr+|yo-ho|ye|yer|th'|matey|ahoy)\b", re.IGNORECASE)


def style_table(runs: dict[str, Path], max_new_tokens: int) -> list[dict]:
    """Each prompt answered by each run's adapter (greedy), on one base loaded once."""
    from qlora_ui.chat import ChatEngine, GenerationSettings
    engine = ChatEngine()
    names = {label: engine.load(open_run(run).config(), open_run(run).adapter_dir) for label, run in runs.items()}
    settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    table = []
    for q in STYLE_PROMPTS:
        row = {"prompt": q}
        for label, name in names.items():
            reply = engine.reply([{"role": "user", "content": q}], settings, name)
            row[label] = reply
            row[label + "_pirate"] = bool(PIRATE.search(reply))
            row[label + "_markers"] = len(PIRATE.findall(reply))
            row[label + "_loops"] = loops(reply)
            # The whole shape of every chosen answer in the data: opens with "Arr!", closes with "Yo-ho-ho!".
            row[label + "_shape"] = reply.startswith("Arr") and reply.rstrip().endswith("Yo-ho-ho!")
        table.append(row)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dpo-lr", default="", help="DPO learning rates to compare, comma-separated (default: the "
                                                  "cpu-dpo preset's)")
    ap.add_argument("--style-tokens", type=int, default=40, help="new tokens per style-table reply")
    ap.add_argument("--tag", default="", help="suffix of the result files (preference-TAG.json/.txt)")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/qlora-bench-preference"))
    a = ap.parse_args()
    b = str(a.batch_size)
    corpus = (ROOT / "presets" / "data" / "pirate-preferences.jsonl").read_text().lower()
    leaked = [q for q in STYLE_PROMPTS if json.dumps(q.lower())[1:-1] in corpus]
    assert not leaked, f"style prompts found in the training data: {leaked}"
    sft, sft_s = stage(["--preset", "cpu-quickstart", "--max-steps", str(a.sft_steps), "--batch-size", b,
                        "--name", "bench-sft", "--save-steps", str(a.sft_steps)], a.runs)
    s_rows = rows(sft)
    sft_peak = max(r["rss_gb"] for r in s_rows)
    result = {
        "sft_steps": a.sft_steps, "dpo_steps": a.dpo_steps, "batch_size": a.batch_size,
        "sft_seconds": round(sft_s, 1),
        "sft_s_per_step": round(max(r["elapsed_s"] for r in s_rows) / a.sft_steps, 2),
        "sft_peak_rss_gb": round(sft_peak, 3), "sft_run": str(sft), "dpo": [],
    }
    dpo_runs = {}
    for lr in [x for x in a.dpo_lr.split(",") if x.strip()] or [None]:
        extra = ["--learning-rate", lr] if lr else []
        dpo, dpo_s = stage(["--preset", "cpu-dpo", "--init-adapter", str(sft), "--max-steps", str(a.dpo_steps),
                            "--batch-size", b, "--name", f"bench-dpo-{lr or 'preset'}", "--eval-steps",
                            str(a.dpo_steps), "--save-steps", str(a.dpo_steps), "--eval-fraction", "0.05", *extra],
                           a.runs)
        d_rows = rows(dpo)
        ev = [r for r in d_rows if "eval_reward_accuracy" in r][-1]
        tr = [r for r in d_rows if "loss" in r]
        dpo_peak = max(r["rss_gb"] for r in d_rows)
        lr_used = open_run(dpo).config().training.learning_rate
        result["dpo"].append({
            "learning_rate": lr_used, "dpo_seconds": round(dpo_s, 1),
            "dpo_s_per_step": round(max(r["elapsed_s"] for r in d_rows) / a.dpo_steps, 2),
            "heldout_reward_accuracy": round(ev["eval_reward_accuracy"], 3),
            "heldout_reward_margin": round(ev.get("eval_reward_margin", float("nan")), 3),
            "dpo_loss_first_last": [round(tr[0]["loss"], 4), round(tr[-1]["loss"], 4)],
            "train_reward_accuracy_last": round(tr[-1].get("reward_accuracy", float("nan")), 3),
            "dpo_peak_rss_gb": round(dpo_peak, 3), "dpo_over_sft_rss": round(dpo_peak / sft_peak, 3),
            "dpo_run": str(dpo),
        })
        dpo_runs[f"dpo lr {lr_used:g}"] = dpo
    table = style_table({"sft": sft, **dpo_runs}, a.style_tokens)
    labels = ["sft", *dpo_runs]
    result["style"] = {label: sum(r[label + "_pirate"] for r in table) for label in labels}
    result["style_shape"] = {label: sum(r[label + "_shape"] for r in table) for label in labels}
    result["style_markers_per_reply"] = {label: round(sum(r[label + "_markers"] for r in table) / len(table), 2)
                                         for label in labels}
    result["style_loops"] = {label: sum(r[label + "_loops"] for r in table) for label in labels}
    result["style_prompts"] = len(table)
    result["style_table"] = table
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = f"preference-{a.tag}" if a.tag else "preference"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"{k}: {v}" for k, v in result.items() if k not in ("dpo", "style_table")]
    for d in result["dpo"]:
        lines.append("dpo: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    lines.append("")
    lines.append("| prompt | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    for r in table:
        cells = [("**pirate** " if r[k + "_pirate"] else "") + r[k].replace("\n", " ").replace("|", "/")[:90]
                 for k in labels]
        lines.append(f"| {r['prompt']} | " + " | ".join(cells) + " |")
    lines.append("| in the pirate voice | " + " | ".join(f"{result['style'][k]} / {len(table)}" for k in labels)
                 + " |")
    lines.append("| opens with Arr!, ends with Yo-ho-ho! (every chosen answer's shape) | "
                 + " | ".join(f"{result['style_shape'][k]} / {len(table)}" for k in labels) + " |")
    lines.append("| replies repeating a word pair 3+ times | "
                 + " | ".join(f"{result['style_loops'][k]} / {len(table)}" for k in labels) + " |")
    lines.append("| pirate words per reply | " + " | ".join(str(result["style_markers_per_reply"][k]) for k in labels)
                 + " |")
    (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
