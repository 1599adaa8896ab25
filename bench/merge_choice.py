"""Which 16-bit weights should the adapter be merged into? Measured against what was trained: the 4-bit base + adapter.

    python bench/merge_choice.py --run runs/<a run on the bundled model> [--rows 36]

For each candidate, on the run's held-out rows (the eval split its training never saw): next-token top-1 agreement
with the 4-bit base + adapter, and mean KL(4-bit+adapter || candidate) in nats per position, over every position and
over the trained (assistant) positions only. Candidates:
  merged into dequantized NF4   W = dequant(NF4(W0)) + BA   (what the adapter was trained against)
  merged into original 16-bit   W = W0 + BA
  original 16-bit, no adapter   the base alone: how big the adapter's effect is, for scale
Runs in about a minute on 2 CPU cores for the bundled model.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - the repository root on sys.path, offline


def held_out(run, tok, n: int):
    from qlora_ui.data import prepare_dataset

    cfg = run.config()
    prepared = prepare_dataset(cfg.data, tok, seed=cfg.training.seed)
    rows = prepared.eval if len(prepared.eval) else prepared.train
    rows = [rows[i] for i in range(min(n, len(rows)))]  # a datasets.Dataset: rows[:n] would be columns
    return rows, "eval split" if len(prepared.eval) else "train rows (the run had no eval split)"


def logits_of(model, rows):
    import torch

    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            out.append(model(input_ids=ids).logits[0].float())
    return out


def compare(ref, cand, rows) -> dict[str, float]:
    import torch

    agree = kl = n = agree_t = kl_t = n_t = 0.0
    for lr, lc, r in zip(ref, cand, rows):
        lp, lq = torch.log_softmax(lr[:-1], -1), torch.log_softmax(lc[:-1], -1)
        k = (lp.exp() * (lp - lq)).sum(-1)
        same = (lr[:-1].argmax(-1) == lc[:-1].argmax(-1)).float()
        trained = torch.tensor([lab != -100 for lab in r["labels"][1:]])
        agree += same.sum().item()
        kl += k.sum().item()
        n += len(k)
        agree_t += same[trained].sum().item()
        kl_t += k[trained].sum().item()
        n_t += trained.sum().item()
    return {"agree": agree / n, "kl": kl / n, "agree_trained": agree_t / max(n_t, 1), "kl_trained": kl_t / max(n_t, 1),
            "positions": n, "trained_positions": n_t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--rows", type=int, default=36)
    args = p.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_ui.export import merge_model
    from qlora_ui.modeling import load_base_model, load_tokenizer, resolve_model_path
    from qlora_ui.runs import open_run

    torch.manual_seed(0)
    run = open_run(args.run)
    cfg = run.config()
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(str(run.adapter_dir), cfg.model)
    rows, what = held_out(run, tok, args.rows)
    t0 = time.time()

    ref = PeftModel.from_pretrained(load_base_model(path, cfg.model, cfg.quantization), str(run.adapter_dir)).eval()
    ref_logits = logits_of(ref, rows)
    del ref
    results = {}
    for name, into in (("merged into dequantized NF4", "dequantized"), ("merged into original 16-bit", "base")):
        model, _ = merge_model(run, into)
        results[name] = compare(ref_logits, logits_of(model.eval(), rows), rows)
        del model
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    results["original 16-bit, no adapter"] = compare(ref_logits, logits_of(base, rows), rows)

    first = next(iter(results.values()))
    print(f"run {run.name}: {len(rows)} {what}, {first['positions']:.0f} positions "
          f"({first['trained_positions']:.0f} trained); reference = 4-bit {cfg.quantization.quant_type} base + adapter")
    print(f"{'candidate (16-bit)':32} {'top-1 agree':>11} {'KL nats':>9} {'agree (trained)':>16} {'KL (trained)':>13}")
    for name, r in results.items():
        print(f"{name:32} {100 * r['agree']:10.2f}% {r['kl']:9.5f} {100 * r['agree_trained']:15.2f}% "
              f"{r['kl_trained']:13.5f}")
    a, b = results["merged into dequantized NF4"], results["merged into original 16-bit"]
    print(f"KL ratio original/dequantized: {b['kl'] / max(a['kl'], 1e-12):.1f}x   ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
