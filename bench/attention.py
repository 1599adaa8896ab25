"""Per-row attention on a CPU: PyTorch's sdpa (its flash-attention CPU kernel) against the matmul form the engine
uses for short rows under gradient checkpointing (qlora_ui.batching.causal_matmul_attention).

    python bench/attention.py                  # the bundled model's heads (9 query, 3 key/value, 64 wide), bf16

For each row length: the best of 7 rounds of 5 forward and 5 forward+backward passes, on the configured threads,
and the ratio sdpa / matmul (above 1: the matmul form is faster). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the repository root on sys.path)


def best_ms(fn, rounds: int = 7, n: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from qlora_ui.batching import causal_matmul_attention

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="64,128,256,512,1024")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.heads} query heads, {args.kv_heads} key/value heads of {args.head_dim}, bf16, causal, "
          f"{args.threads} threads")
    print("| row tokens | sdpa fwd ms | matmul fwd ms | sdpa fwd+bwd ms | matmul fwd+bwd ms | fwd+bwd sdpa / matmul |")
    print("|---|---|---|---|---|---|")
    for t in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, args.heads, t, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, args.kv_heads, t, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, args.kv_heads, t, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        ways = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True),
                "matmul": lambda q=q, k=k, v=v: causal_matmul_attention(q, k, v)}
        res = {}
        for name, f in ways.items():
            for _ in range(2):
                f().sum().backward()
            res[name] = (best_ms(f), best_ms(lambda f=f: f().sum().backward()))
        print(f"| {t} | {res['sdpa'][0]:.2f} | {res['matmul'][0]:.2f} | {res['sdpa'][1]:.2f} | "
              f"{res['matmul'][1]:.2f} | {res['sdpa'][1] / res['matmul'][1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
