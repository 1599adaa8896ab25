"""Chat speed on this CPU: llama.cpp on the run's exported GGUF files vs transformers on the 4-bit base + adapter.

    python bench/chat_speed.py --run runs/<run> [--tokens 128]

The same user message, greedy, after one warm-up call each; the time covers prompt processing and generation (what
a chat user waits for). transformers ignores end-of-turn, so it generates exactly --tokens tokens. llama.cpp runs
as the app runs it, in a child process (qlora_ui.native: a fault there ends the child, not this bench) that
applies the GGUF's chat template and may stop at end-of-turn before --tokens; its tokens are the pieces it
streamed, one per token, and tokens/s is taken over those.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - the repository root on sys.path, offline

PROMPT = "Tell me about your ship and your crew."


def llama_cpp_once(child, messages: list[dict], n: int) -> int:
    """One greedy chat reply of at most `n` tokens from the llama.cpp child: the number of tokens it streamed."""
    got = 0
    for msg in child.request("chat", messages=messages, max_tokens=n, temperature=0.0, top_p=1.0, seed=0):
        got += "delta" in msg
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()

    import torch

    from qlora_ui.chat import ChatEngine
    from qlora_ui.data import render_chat
    from qlora_ui.export import ggufs
    from qlora_ui.native.client import LlamaCppProcess
    from qlora_ui.runs import open_run

    run = open_run(args.run)
    eng = ChatEngine()
    name = eng.load(run.config(), run.adapter_dir)
    tok = eng.tokenizer
    messages = [{"role": "user", "content": PROMPT}]
    text = render_chat(tok, messages, add_generation_prompt=True)
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

    for gguf in sorted(ggufs(run)):
        child = LlamaCppProcess(gguf, n_ctx=1024)
        child.start()
        try:
            llama_cpp_once(child, messages, n)
            t = time.time()
            got = llama_cpp_once(child, messages, n)
            results.append((f"llama.cpp, {gguf.name.rsplit('-', 1)[-1]}", got, time.time() - t))
        finally:
            child.close()

    base = results[0][1] / results[0][2]
    print(f"run {run.name}, prompt {ids.shape[1]} tokens, {torch.get_num_threads()} threads")
    print(f"{'backend':38} {'tokens':>6} {'seconds':>8} {'tokens/s':>9} {'vs transformers':>16}")
    for label, k, s in results:
        print(f"{label:38} {k:6d} {s:8.2f} {k / s:9.1f} {k / s / base:15.1f}x")


if __name__ == "__main__":
    main()
