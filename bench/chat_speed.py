"""Chat speed on this CPU: llama.cpp on the run's exported GGUF files vs transformers on the 4-bit base + adapter.

    python bench/chat_speed.py --run runs/<run> [--tokens 128]

The same rendered prompt, greedy, end-of-turn ignored so every backend generates exactly --tokens tokens; the
time covers prompt processing and generation (what a chat user waits for), after one warm-up call each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Tell me about your ship and your crew."


def ll_once(llm, prompt: list[int], n: int) -> int:
    # logit_bias on EOS: generate the full length, like min_new_tokens on the transformers side
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, logit_bias={llm.token_eos(): -100.0})
    return out["usage"]["completion_tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()

    import torch

    from qlora_ui.chat import ChatEngine
    from qlora_ui.data import render_chat
    from qlora_ui.export import ggufs
    from qlora_ui.runs import open_run

    run = open_run(args.run)
    eng = ChatEngine()
    name = eng.load(run.config(), run.adapter_dir)
    tok = eng.tokenizer
    text = render_chat(tok, [{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = args.tokens
    results = []

    def hf_once(adapter_on: bool):
        import contextlib

        eng.model.set_adapter(name)
        with torch.no_grad(), contextlib.nullcontext() if adapter_on else eng.model.disable_adapter():
            out = eng.model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    for adapter_on, label in ((True, "transformers, NF4 base + adapter"), (False, "transformers, NF4 base alone")):
        hf_once(adapter_on)
        t = time.time()
        got = hf_once(adapter_on)
        results.append((label, got, time.time() - t))

    from llama_cpp import Llama

    for gguf in sorted(ggufs(run)):
        llm = Llama(model_path=str(gguf), n_ctx=1024, verbose=False)
        prompt = ids[0].tolist()
        ll_once(llm, prompt, n)
        t = time.time()
        got = ll_once(llm, prompt, n)
        results.append((f"llama.cpp, {gguf.name.rsplit('-', 1)[-1]}", got, time.time() - t))
        del llm

    base = results[0][1] / results[0][2]
    print(f"run {run.name}, prompt {ids.shape[1]} tokens, {torch.get_num_threads()} threads")
    print(f"{'backend':38} {'tokens':>6} {'seconds':>8} {'tokens/s':>9} {'vs transformers':>16}")
    for label, k, s in results:
        print(f"{label:38} {k:6d} {s:8.2f} {k / s:9.1f} {k / s / base:15.1f}x")


if __name__ == "__main__":
    main()
