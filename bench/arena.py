"""One arena battle on the bundled model: the base against an adapter of it, two answers of up to 64 tokens with the
same settings and seed (qlora_ui/evaluate/arena.py), time until both answers are there. Against the same two answers
asked one after the other in this process (the batch server then cannot share a forward pass between them).

The adapter is a fresh LoRA nudged off its no-op start (a trained one answers at the same speed).

    .venv/bin/python bench/arena.py [--battles 3] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import meets, table

from qlora_ui.chat import GenerationSettings
from qlora_ui.config import BUNDLED_MODEL, RunConfig
from qlora_ui.evaluate.arena import _answer, _targets
from qlora_ui.studio import Studio

GOAL_S = 5.0
PROMPTS = ["How are you today?", "What is a ship?", "Tell me about the sea.", "Why is the sky blue?"]


def make_run(runs: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_ui.modeling import ensure_bundled_model
    from qlora_ui.runs import create_run

    run = create_run(RunConfig().updated(base_model=BUNDLED_MODEL, runs_dir=str(runs), name="arena-bench"))
    model = AutoModelForCausalLM.from_pretrained(ensure_bundled_model(), dtype=torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.01)
    peft.save_pretrained(run.adapter_dir)
    run.write_status("finished")
    return run.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--battles", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="arena-bench-"))
    run = make_run(runs)
    studio = Studio(runs)
    names = [run, BUNDLED_MODEL]
    # Greedy would let both answers stop at the same token; sampling at the tab's default is the usual battle.
    settings = GenerationSettings(temperature=0.7, max_new_tokens=args.max_new_tokens, seed=0)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]

    t0 = time.perf_counter()
    studio.arena.new_battle(studio, names, prompts[:1], settings, random.Random(0))
    first = time.perf_counter() - t0  # includes loading the 4-bit base and the adapter

    together, apart, tokens = [], [], []
    tok = studio.tokenizer_for(BUNDLED_MODEL)
    targets = _targets(studio, names)
    for i in range(args.battles):
        msgs = prompts[(i + 1) % len(prompts)]
        t0 = time.perf_counter()
        b = studio.arena.new_battle(studio, names, [msgs], settings, random.Random(i))
        together.append(time.perf_counter() - t0)
        tokens += [len(tok(b.answer_a)["input_ids"]), len(tok(b.answer_b)["input_ids"])]
        t0 = time.perf_counter()
        for n in names:
            _answer(studio, targets[n], msgs, settings)
        apart.append(time.perf_counter() - t0)

    warm, base = statistics.median(together), statistics.median(apart)
    print(table(["measure", "value", "goal", "met"], [
        [f"one battle, two answers of up to {args.max_new_tokens} tokens (median of {args.battles})", f"{warm:.2f} s",
         f"<= {GOAL_S:g} s", meets(warm, "<=", GOAL_S)],
        ["the same two answers one after the other", f"{base:.2f} s", "", ""],
        ["speed-up of answering them in one batch", f"{base / warm:.2f}x", "", ""],
        ["first battle (loads the 4-bit base and the adapter)", f"{first:.1f} s", "", ""],
        ["tokens per answer (median)", f"{statistics.median(tokens):.0f}", "", ""],
    ]))


if __name__ == "__main__":
    main()
