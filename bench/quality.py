"""The seed's claim, measured: NF4 QLoRA matches 16-bit LoRA, NF4 beats FP4, and the adapter visibly learned.

On the bundled SmolLM2-135M-Instruct and the bundled pirate dataset (presets/cpu-quickstart.yaml), with one
held-out split, one seed, one step count and one LoRA setting, train four variants that differ only in how
the frozen base is stored:

    (a) 16-bit LoRA on the bf16 base          the baseline every ratio is taken against (same process)
    (b) QLoRA NF4 + double quant              the paper's recipe
    (c) QLoRA FP4                             same as (d) but the FP4 data type
    (d) QLoRA NF4 without double quant

then measure
    - eval loss of each at the end (and during, for the curves) and its ratio to (a); goals: NF4 within 2%
      of (a), NF4 no worse than FP4;
    - the quantization error of every linear weight of the real model (relative L2 of the dequantized
      NF4/FP4 weight against bf16) and the output KL(p_bf16 || p_4bit) on the held-out rows;
    - a visible change: held-out prompts answered greedily by the NF4 base and by the NF4 adapter, scored for
      the pirate format the dataset teaches ("Arr! ... Yo-ho-ho!", pirate words).

    python bench/quality.py --quick      # ~10 min on 2 CPU cores: 40 steps per variant, 12 prompts
    python bench/quality.py              # the full run recorded in docs/quality.md

Writes quality.json, report.md, answers.md and eval_loss.png to bench/results/quality/ (quick: .../quick/);
run folders go to runs/quality-bench/ (git-ignored), where the app's Runs tab can overlay them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, table

# Sleep, not spin, while waiting at OpenMP barriers (set before torch loads libgomp): on a CPU shared with other
# jobs a spinning thread burns the timeslice its partner needs, and a step took 40 s instead of 1.5 s here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qlora_ui.config import QuantConfig, RunConfig, load_preset  # noqa: E402

log = logging.getLogger("bench.quality")

RESULTS_DIR = ROOT / "bench" / "results" / "quality"
GOAL_RATIO = 1.02  # NF4 eval loss at most 2% above 16-bit LoRA


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    overrides: dict[str, Any]
    steps_factor: int = 1


VARIANTS = (
    Variant("lora16", "(a) 16-bit LoRA, bf16 base", {"load_in_4bit": False}),
    Variant("nf4_dq", "(b) QLoRA NF4 + double quant", {"load_in_4bit": True, "quant_type": "nf4",
                                                        "double_quant": True}),
    # FP4 without double quant, so that (c) and (d) differ only in the data type.
    Variant("fp4", "(c) QLoRA FP4", {"load_in_4bit": True, "quant_type": "fp4", "double_quant": False}),
    Variant("nf4", "(d) QLoRA NF4, no double quant", {"load_in_4bit": True, "quant_type": "nf4",
                                                       "double_quant": False}),
    # What closes the gap to (a)? Each is (b) with one change.
    Variant("nf4_loftq", "(e) NF4 + DQ, LoftQ init", {"load_in_4bit": True, "quant_type": "nf4",
                                                      "double_quant": True, "lora_init": "loftq"}),
    Variant("nf4_dora", "(f) NF4 + DQ, DoRA", {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                               "use_dora": True}),
    Variant("nf4_fp32", "(g) NF4 + DQ, fp32 compute", {"load_in_4bit": True, "quant_type": "nf4",
                                                       "double_quant": True, "compute_dtype": "fp32"}),
    # Twice the steps: not at the same step count, so it has no goal; it shows whether NF4 only learns slower.
    Variant("nf4_2x", "(h) NF4 + DQ, twice the steps", {"load_in_4bit": True, "quant_type": "nf4",
                                                        "double_quant": True}, steps_factor=2),
)
BASELINE = VARIANTS[0].key
NF4_KEYS = ("nf4_dq", "nf4", "nf4_loftq", "nf4_dora", "nf4_fp32")  # NF4 at the same step count as (a)
# Variants whose LoRA A starts from the same random draw as (a) (LoftQ sets A and B; DoRA adds magnitudes;
# fp32 compute draws the same values without rounding them to bf16, and the hash rounds them).
SAME_INIT = ("lora16", "nf4_dq", "fp4", "nf4", "nf4_fp32", "nf4_2x")


# ---------------------------------------------------------------------------------------------------
# Training the four variants
# ---------------------------------------------------------------------------------------------------

@dataclass
class VariantResult:
    key: str
    label: str
    eval_loss: float
    eval_curve: list[tuple[int, float]]
    train_curve: list[tuple[int, float]]
    run_dir: str
    train_seconds: float
    load_seconds: float
    footprint_mb: float
    eval_rows: int
    eval_hash: str
    lora_init_hash: str
    adapter_trained: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _tensor_hash(tensors) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        # Rounded to bf16 first: an fp32-compute variant draws the same values without the bf16 rounding.
        h.update(t.detach().cpu().to(torch.bfloat16).float().numpy().tobytes())
    return h.hexdigest()[:16]


def _probe_callback(record: dict[str, Any], eval_on_start: bool):
    """Records what must be equal across variants: the LoRA init and the held-out rows the Trainer evaluates."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            record["lora_init_hash"] = _tensor_hash(
                (n, p) for n, p in sorted(model.named_parameters()) if "lora_A" in n)
            # TrainingJob has no eval-on-start setting; the Trainer reads this flag right after this event.
            # The step-0 eval is the quantized base's own loss: where each curve starts.
            args.eval_on_start = eval_on_start

        def on_evaluate(self, args, state, control, eval_dataloader=None, **kw):
            if "eval_hash" not in record and eval_dataloader is not None:
                ds = eval_dataloader.dataset
                record["eval_rows"] = len(ds)
                record["eval_hash"] = hashlib.sha256(
                    json.dumps([list(ds["input_ids"]), list(ds["labels"])]).encode()).hexdigest()[:16]

    return Probe()


def _adapter_trained(adapter_dir: Path) -> bool:
    """lora_B starts at zero: a non-zero lora_B in the saved adapter means the optimizer really moved it."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    bs = [t for n, t in weights.items() if "lora_B" in n]
    return bool(bs) and all(float(t.abs().max()) > 0 for t in bs)


def train_variant(base: RunConfig, v: Variant, *, eval_on_start: bool = True) -> VariantResult:
    from qlora_ui.jobs import create_job

    cfg = base.updated(name=f"quality-{v.key}", **v.overrides)
    if v.steps_factor != 1:
        cfg = cfg.updated(max_steps=cfg.training.max_steps * v.steps_factor)
    record: dict[str, Any] = {}
    log.info("training %s: %d steps", v.label, cfg.training.max_steps)
    t0 = time.time()
    job = create_job(cfg, extra_callbacks=[_probe_callback(record, eval_on_start)])
    if job.run_blocking() != "finished":
        raise RuntimeError(f"{v.label} did not finish: {job.error_message}")
    seconds = time.time() - t0
    rows = job.run.read_metrics()
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not evals or evals[-1][0] != job.step:
        raise RuntimeError(f"{v.label}: no eval loss at the last step {job.step}; make max_steps a multiple "
                           "of the eval interval")
    return VariantResult(
        key=v.key, label=v.label, eval_loss=evals[-1][1], eval_curve=evals,
        train_curve=[(r["step"], r["loss"]) for r in rows if r.get("loss") is not None],
        run_dir=str(job.run.path), train_seconds=round(seconds, 1), load_seconds=round(job.load_seconds, 1),
        footprint_mb=round(job.footprint_bytes / 1e6, 1), eval_rows=record.get("eval_rows", 0),
        eval_hash=record.get("eval_hash", ""), lora_init_hash=record.get("lora_init_hash", ""),
        adapter_trained=_adapter_trained(job.run.adapter_dir),
        extra={"base_eval_loss": evals[0][1] if evals[0][0] == 0 else None,
               "final_train_loss": _tail_mean([r["loss"] for r in rows if r.get("loss") is not None], 5),
               "metrics_rows": rows})


def _tail_mean(xs: list[float], n: int) -> float | None:
    return sum(xs[-n:]) / len(xs[-n:]) if xs else None


def train_all(base: RunConfig, variants=VARIANTS, *, eval_on_start: bool = True) -> list[VariantResult]:
    if variants[0].key != BASELINE:
        raise ValueError(f"the first variant must be the baseline '{BASELINE}'")
    results = [train_variant(base, v, eval_on_start=eval_on_start) for v in variants]
    check_same_conditions(results)
    return results


def check_same_conditions(results: list[VariantResult]) -> None:
    """Same seed must mean same held-out rows and same LoRA init; otherwise the ratios compare nothing."""
    problems = []
    for attr in ("eval_hash", "lora_init_hash", "eval_rows"):
        vals = {r.key: getattr(r, attr) for r in results if attr != "lora_init_hash" or r.key in SAME_INIT}
        if len(set(vals.values())) != 1 or not next(iter(vals.values())):
            problems.append(f"{attr} differs between variants: {vals}")
    for r in results:
        if not r.adapter_trained:
            problems.append(f"{r.label}: the saved adapter's lora_B is still zero (nothing was trained)")
    if problems:
        raise RuntimeError("; ".join(problems))


def comparison_rows(results: list[VariantResult], goal_ratio: float = GOAL_RATIO) -> list[dict[str, Any]]:
    """variant | eval loss | ratio to 16-bit | goal | met, every ratio against the baseline run of this process."""
    by_key = {r.key: r for r in results}
    if BASELINE not in by_key:
        raise ValueError(f"no baseline '{BASELINE}' among the results")
    base = by_key[BASELINE].eval_loss
    nf4_losses = [by_key[k].eval_loss for k in NF4_KEYS if k in by_key]
    rows = []
    for r in results:
        ratio = r.eval_loss / base
        if r.key == BASELINE:
            goal, met = "baseline", None
        elif r.key in NF4_KEYS:
            goal, met = f"<= {goal_ratio:.2f}", ratio <= goal_ratio
        elif r.key == "fp4":
            plain_nf4 = [by_key[k].eval_loss for k in ("nf4_dq", "nf4") if k in by_key]
            goal, met = "NF4 <= FP4", bool(plain_nf4) and all(x <= r.eval_loss for x in plain_nf4)
        else:
            goal, met = "-", None
        rows.append({"key": r.key, "variant": r.label, "eval_loss": r.eval_loss, "ratio": ratio,
                     "pct_vs_16bit": 100 * (ratio - 1), "goal": goal, "met": met})
    if len(nf4_losses) > 1:  # the goal: the best NF4 configuration at the same step count
        best = min((by_key[k] for k in NF4_KEYS if k in by_key), key=lambda r: r.eval_loss)
        ratio = best.eval_loss / base
        rows.append({"key": "best_nf4", "variant": f"best NF4 at the same steps: {best.label}",
                     "eval_loss": best.eval_loss, "ratio": ratio, "pct_vs_16bit": 100 * (ratio - 1),
                     "goal": f"<= {goal_ratio:.2f}", "met": ratio <= goal_ratio, "best": best.key,
                     "best_label": best.label})
    return rows


def loftq_error(model_path: str, cfg: RunConfig) -> dict[str, Any]:
    """Relative L2 error of each 4-bit layer against its bf16 weight: plain NF4 (the adapter at zero) and with
    the LoftQ-initialised adapter (quantized weight + B·A·scaling), by layer type."""
    from qlora_ui.loftq import apply_loftq
    from qlora_ui.modeling import load_for_training

    c = cfg.updated(load_in_4bit=True, quant_type="nf4", double_quant=True, lora_init="default", use_dora=False)
    model = load_for_training(c.model, c.quantization, c.lora, False).model
    rep = apply_loftq(model, model_path)
    by_type: dict[str, list[tuple[float, float]]] = {}
    for name, errs in rep.errors.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(errs)
    del model
    return {"seconds": round(rep.seconds, 1), "rank": c.lora.lora_r, "n_layers": rep.layers,
            "mean": {"nf4_dq": rep.mean_before, "loftq": rep.mean_after},
            "by_type": {t: {"layers": len(v), "nf4_dq": sum(b for b, _ in v) / len(v),
                            "loftq": sum(a for _, a in v) / len(v)} for t, v in sorted(by_type.items())}}


def loftq_table(e: dict[str, Any], markdown: bool = False) -> str:
    head = ["layer type", "layers", "NF4 + DQ", f"NF4 + DQ + LoftQ adapter (r {e['rank']})", "LoftQ / plain"]
    body = [[t, str(v["layers"]), f"{v['nf4_dq']:.4f}", f"{v['loftq']:.4f}", f"{v['loftq'] / v['nf4_dq']:.3f}"]
            for t, v in e["by_type"].items()]
    m = e["mean"]
    body.append(["mean of all", str(e["n_layers"]), f"{m['nf4_dq']:.4f}", f"{m['loftq']:.4f}",
                 f"{m['loftq'] / m['nf4_dq']:.3f}"])
    return table(head, body, "markdown" if markdown else "grid")


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["variant", "eval loss", "ratio to 16-bit", "goal", "met"]
    body = [[r["variant"], f"{r['eval_loss']:.4f}", f"{r['ratio']:.4f} ({r['pct_vs_16bit']:+.2f}%)", r["goal"],
             r["met"]] for r in rows]
    return table(head, body, "markdown" if markdown else "grid", no="NO", unmeasured="-")


# ---------------------------------------------------------------------------------------------------
# Quantization error of the real weights, and the output KL of the 4-bit models
# ---------------------------------------------------------------------------------------------------

QUANT_SETTINGS = {  # name -> (quant_type, compress_statistics = double quant)
    "nf4_dq": ("nf4", True), "nf4": ("nf4", False), "fp4_dq": ("fp4", True), "fp4": ("fp4", False),
}


def _rel_l2(w, quant_type: str, double_quant: bool, blocksize: int = 64) -> float:
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    d = bnbf.dequantize_4bit(q, state).float()
    wf = w.float()
    return float((d - wf).norm() / wf.norm())


def weight_error(model_path: str, cfg: RunConfig) -> dict[str, Any]:
    """Relative L2 ||deq(q(W)) - W|| / ||W|| of every linear weight but lm_head (the layers QLoRA quantizes)."""
    import torch

    from qlora_ui.modeling import load_base_model

    t0 = time.time()
    model = load_base_model(model_path, cfg.model, QuantConfig(load_in_4bit=False, compute_dtype="bf16"))
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            w = mod.weight.detach()
            row = {"layer": name, "type": name.split(".")[-1], "shape": list(w.shape)}
            row.update({s: _rel_l2(w, qt, dq) for s, (qt, dq) in QUANT_SETTINGS.items()})
            layers.append(row)
    del model
    by_type: dict[str, dict[str, float]] = {}
    for t in dict.fromkeys(r["type"] for r in layers):
        rs = [r for r in layers if r["type"] == t]
        by_type[t] = {"layers": len(rs), **{s: sum(r[s] for r in rs) / len(rs) for s in QUANT_SETTINGS}}
    mean = {s: sum(r[s] for r in layers) / len(layers) for s in QUANT_SETTINGS}
    # The same measurement on Gaussian weights of one MLP's shape: the paper's premise (NF4 is made for normals).
    g = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    gaussian = {s: _rel_l2(g, qt, dq) for s, (qt, dq) in QUANT_SETTINGS.items()}
    return {"mean": mean, "by_type": by_type, "gaussian": gaussian, "layers": layers, "n_layers": len(layers),
            "fp4_over_nf4": mean["fp4"] / mean["nf4"], "seconds": round(time.time() - t0, 1)}


KL_PARTS = ("all", "preamble", "text", "response")


def _common_prefix(rows: list[dict]) -> int:
    first = rows[0]["input_ids"]
    n = min(len(r["input_ids"]) for r in rows)
    for i in range(n):
        if any(r["input_ids"][i] != first[i] for r in rows):
            return i
    return n


def output_kl(model_path: str, cfg: RunConfig, rows: list[dict], batch_size: int = 8) -> dict[str, Any]:
    """Token-averaged KL(p_bf16 || p_4bit) of the next-token distributions on the held-out rows, by part:

    `preamble`: the prefix every row shares (SmolLM2's template injects a fixed system prompt), which the bf16
    model predicts almost by heart; `text`: every position after it (the held-out prompts and answers);
    `response`: the positions that predict assistant tokens (what the eval loss scores); `all`: everything.
    Also the base models' response NLL and how often their top-1 token agrees with bf16 on `text`.
    """
    import torch

    from qlora_ui.modeling import load_base_model

    t0 = time.time()
    dtype = cfg.quantization.compute_dtype
    models = {"bf16": load_base_model(model_path, cfg.model, QuantConfig(load_in_4bit=False, compute_dtype=dtype))}
    for s, (qt, dq) in (("nf4_dq", ("nf4", True)), ("fp4", ("fp4", False)), ("nf4", ("nf4", False))):
        models[s] = load_base_model(model_path, cfg.model, QuantConfig(load_in_4bit=True, quant_type=qt,
                                                                       double_quant=dq, compute_dtype=dtype))
    for m in models.values():
        m.eval()
    prefix = _common_prefix(rows) if len(rows) > 1 else 0
    sums = {s: dict.fromkeys([*KL_PARTS, "nll", "top1"], 0.0) for s in models}
    counts = dict.fromkeys(KL_PARTS, 0)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            length = max(len(r["input_ids"]) for r in chunk)
            ids = torch.tensor([r["input_ids"] + [0] * (length - len(r["input_ids"])) for r in chunk])
            att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in chunk])
            lab = torch.tensor([r["labels"] + [-100] * (length - len(r["labels"])) for r in chunk])
            # Position t predicts token t+1: score positions whose next token is real (resp. a response token).
            real = att[:, 1:].bool()
            in_preamble = (torch.arange(length - 1) < prefix - 1).expand_as(real)
            masks = {"all": real, "preamble": real & in_preamble, "text": real & ~in_preamble,
                     "response": lab[:, 1:] != -100}
            target = lab[:, 1:].clamp(min=0)
            logp = {s: torch.log_softmax(m(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
                    for s, m in models.items()}
            ref = logp["bf16"]
            for s, lp in logp.items():
                kl = (ref.exp() * (ref - lp)).sum(-1)
                for part, mask in masks.items():
                    sums[s][part] += float(kl[mask].sum())
                nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                sums[s]["nll"] += float(nll[masks["response"]].sum())
                sums[s]["top1"] += float((lp.argmax(-1) == ref.argmax(-1))[masks["text"]].sum())
            for part, mask in masks.items():
                counts[part] += int(mask.sum())
    del models
    out = {s: {**{f"kl_{p}": v[p] / max(counts[p], 1) for p in KL_PARTS},
               "nll_response": v["nll"] / max(counts["response"], 1),
               "top1_agree_text": v["top1"] / max(counts["text"], 1)} for s, v in sums.items()}
    return {"models": out, "tokens": counts, "preamble_tokens": prefix, "rows": len(rows),
            "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------
# The visible change: held-out prompts, base vs adapter, scored for the pirate format
# ---------------------------------------------------------------------------------------------------

# Words the dataset's rewrite (presets/data/make_pirate_chat.py) puts in, minus ones plain English uses too
# ("be", "me", "reckon").
PIRATE_WORDS = {"arr", "ye", "yer", "th'", "o'", "ahoy", "matey", "hearties", "aye", "avast", "doubloons",
                "yo-ho-ho"}
_WORD = re.compile(r"[a-z]+(?:['’](?:[a-z]+)?)?(?:-[a-z]+)*", re.IGNORECASE)


def style_score(answer: str) -> dict[str, Any]:
    """Does one answer follow the taught format: starts with "Arr", ends with "Yo-ho-ho", pirate words."""
    a = answer.strip()
    words = [w.lower().replace("’", "'") for w in _WORD.findall(a)]
    starts = bool(re.match(r"arr\b", a, re.IGNORECASE))
    ends = bool(re.search(r"yo-ho-ho[!.]*$", a, re.IGNORECASE))
    return {"starts_arr": starts, "ends_yohoho": ends, "format": starts and ends,
            "pirate_words": sum(w in PIRATE_WORDS for w in words), "words": len(words)}


def style_summary(answers: list[str]) -> dict[str, float]:
    scores = [style_score(a) for a in answers]
    n = max(len(scores), 1)
    words = sum(s["words"] for s in scores)
    return {"answers": len(scores),
            "starts_arr": sum(s["starts_arr"] for s in scores) / n,
            "ends_yohoho": sum(s["ends_yohoho"] for s in scores) / n,
            "format": sum(s["format"] for s in scores) / n,
            "pirate_words_per_100": 100 * sum(s["pirate_words"] for s in scores) / max(words, 1)}


def heldout_conversations(cfg: RunConfig, tokenizer) -> tuple[list[list[dict]], list[dict]]:
    """The eval split's conversations and tokenized rows, exactly as TrainingJob splits them (same seed)."""
    import random

    from qlora_ui.data import prepare_dataset

    prepared = prepare_dataset(cfg.data, tokenizer, seed=cfg.training.seed)
    order = list(range(len(prepared.conversations)))
    random.Random(cfg.training.seed).shuffle(order)  # the shuffle prepare_dataset applies before splitting
    convs = [prepared.conversations[i] for i in order[:len(prepared.eval)]]
    for conv, row in zip(convs, prepared.eval):  # guard: the conversation really is the tokenized eval row
        user = next(m["content"] for m in conv if m["role"] == "user")
        if user.strip() not in tokenizer.decode(row["input_ids"]):
            raise RuntimeError("could not match the eval rows to their conversations; data.py's split changed")
    return convs, list(prepared.eval)  # rows as dicts (a Dataset slice would be columns)


def compare_answers(cfg: RunConfig, adapter_dir: str, convs: list[list[dict]], n_prompts: int,
                    max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of the base and of the adapter (one fresh ChatEngine, after all training) to held-out prompts."""
    from qlora_ui.chat import ChatEngine, GenerationSettings

    t0 = time.time()
    engine = ChatEngine()  # its own model instance: a model that generated is never trained
    engine.load(cfg)
    name = engine.load(cfg, adapter_dir)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens, seed=cfg.training.seed)
    items = []
    for conv in convs[:n_prompts]:
        first_answer = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        user = conv[:first_answer]  # the prompt (and a system turn, if the row has one)
        reference = next(m["content"] for m in conv if m["role"] == "assistant")
        base = engine.reply(user, settings, None)
        tuned = engine.reply(user, settings, name)
        items.append({"prompt": user[-1]["content"], "reference": reference, "base": base, "adapter": tuned})
        log.info("prompt %d/%d: %r -> %r", len(items), min(n_prompts, len(convs)), user[-1]["content"], tuned)
    return {"items": items, "base": style_summary([i["base"] for i in items]),
            "adapter": style_summary([i["adapter"] for i in items]),
            "reference": style_summary([i["reference"] for i in items]),
            "max_new_tokens": max_new_tokens, "seconds": round(time.time() - t0, 1)}


def answers_markdown(style: dict[str, Any]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| # | held-out prompt | base (NF4, no adapter) | NF4 QLoRA adapter |", "|---|---|---|---|"]
    for i, it in enumerate(style["items"], 1):
        lines.append(f"| {i} | {cell(it['prompt'])} | {cell(it['base'])} | {cell(it['adapter'])} |")
    return "\n".join(lines)


def style_table(style: dict[str, Any], markdown: bool = False) -> str:
    head = ["answers by", "format (Arr! ... Yo-ho-ho!)", "starts 'Arr'", "ends 'Yo-ho-ho'", "pirate words/100"]
    body = [[who, f"{s['format']:.0%}", f"{s['starts_arr']:.0%}", f"{s['ends_yohoho']:.0%}",
             f"{s['pirate_words_per_100']:.1f}"]
            for who, s in (("base", style["base"]), ("adapter", style["adapter"]),
                           ("dataset reference", style["reference"]))]
    return table(head, body, "markdown" if markdown else "grid")


# ---------------------------------------------------------------------------------------------------
# Chart, report, CLI
# ---------------------------------------------------------------------------------------------------

def eval_figure(curves: dict[str, list[tuple[int, float]]], title: str):
    """The eval-loss curves on one chart: the Runs tab's overlay, eval rows only, log scale so that the
    gaps after training are not flattened by the step-0 losses of the bases."""
    from qlora_ui.plots import overlay_figure

    fig = overlay_figure({name: [{"step": s, "eval_loss": x} for s, x in curve] for name, curve in curves.items()},
                         title=title)
    for trace, symbol in zip(fig.data, ("circle", "square", "diamond", "x")):
        trace.marker.symbol = symbol
        trace.marker.size = 8
    fig.update_layout(yaxis_title="eval loss on the held-out rows (log scale)", yaxis_type="log", width=900,
                      height=520)
    return fig


def save_figure(fig, out: Path) -> Path:
    if not os.environ.get("BROWSER_PATH") and not shutil.which("chromium") and Path("/usr/bin/chromium").exists():
        os.environ["BROWSER_PATH"] = "/usr/bin/chromium"  # kaleido 1.x drives a Chrome; Debian's is here
    try:
        fig.write_image(str(out), width=900, height=520, scale=1)
        return out
    except Exception as e:  # noqa: BLE001 - no Chrome: keep the numbers, write the interactive chart instead
        html = out.with_suffix(".html")
        fig.write_html(str(html), include_plotlyjs="cdn")
        log.warning("PNG export failed (%s); wrote %s instead", e, html)
        return html


def detail_table(results: list[VariantResult], markdown: bool = False) -> str:
    head = ["variant", "eval loss at step 0 (base)", "final train loss (last 5)", "base footprint MB", "train s"]
    body = [[r.label, _f(r.extra.get("base_eval_loss")), _f(r.extra.get("final_train_loss")),
             f"{r.footprint_mb:.0f}", f"{r.train_seconds:.0f}"] for r in results]
    return table(head, body, "markdown" if markdown else "grid")


def detail_table_from(out: dict[str, Any]) -> str:
    head = ["variant", "eval loss at step 0 (base)", "final train loss (last 5)", "train s"]
    body = [[v["label"], _f(v.get("base_eval_loss")), _f(v.get("final_train_loss")), f"{v['train_seconds']:.0f}"]
            for v in out["variants"]]
    return table(head, body, "grid")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def weight_tables(w: dict[str, Any], markdown: bool = False) -> str:
    head = ["layer type", "layers", "NF4", "NF4+DQ", "FP4", "FP4+DQ", "FP4/NF4"]
    body = [[t, str(v["layers"]), f"{v['nf4']:.4f}", f"{v['nf4_dq']:.4f}", f"{v['fp4']:.4f}", f"{v['fp4_dq']:.4f}",
             f"{v['fp4'] / v['nf4']:.2f}"] for t, v in w["by_type"].items()]
    m, g = w["mean"], w["gaussian"]
    body.append(["mean of all", str(w["n_layers"]), f"{m['nf4']:.4f}", f"{m['nf4_dq']:.4f}", f"{m['fp4']:.4f}",
                 f"{m['fp4_dq']:.4f}", f"{m['fp4'] / m['nf4']:.2f}"])
    body.append(["Gaussian 1536x576", "1", f"{g['nf4']:.4f}", f"{g['nf4_dq']:.4f}", f"{g['fp4']:.4f}",
                 f"{g['fp4_dq']:.4f}", f"{g['fp4'] / g['nf4']:.2f}"])
    return table(head, body, "markdown" if markdown else "grid")


def kl_table(kl: dict[str, Any], markdown: bool = False) -> str:
    head = ["base model", "KL all tokens", f"KL fixed preamble ({kl['preamble_tokens']} tok)", "KL held-out text",
            "KL responses", "response NLL", "top-1 = bf16 (text)"]
    names = {"bf16": "bf16", "nf4_dq": "NF4 + DQ", "fp4": "FP4", "nf4": "NF4"}
    body = [[names[s]] + [f"{v[f'kl_{p}']:.4f}" for p in KL_PARTS] +
            [f"{v['nll_response']:.4f}", f"{v['top1_agree_text']:.1%}"] for s, v in kl["models"].items()]
    return table(head, body, "markdown" if markdown else "grid")


def base_config(args) -> RunConfig:
    cfg = load_preset("cpu-quickstart")
    over = dict(max_steps=args.steps, eval_steps=args.eval_every, save_steps=args.steps, save_total_limit=1,
                eval_fraction=args.eval_fraction, seed=args.seed, runs_dir=args.runs_dir,
                compute_dtype=args.compute_dtype)
    for k in ("learning_rate", "lora_r", "lora_alpha", "max_rows", "batch_size"):
        if getattr(args, k, None) is not None:
            over[k] = getattr(args, k)
    if args.model:
        over["base_model"] = args.model
    return cfg.updated(**over).validate(need_data=True)


def run(args) -> dict[str, Any]:
    import torch

    from qlora_ui.modeling import load_tokenizer, resolve_model_path

    t_start = time.time()
    cfg = base_config(args)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    convs, eval_rows = heldout_conversations(cfg, tok)
    log.info("held-out rows: %d (eval_fraction %.3f, seed %d)", len(eval_rows), cfg.data.eval_fraction,
             cfg.training.seed)
    out: dict[str, Any] = {
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("quality.py")
        else " ".join(sys.argv), "quick": args.quick,
        "config": {k: cfg.flat()[k] for k in ("base_model", "data_path", "max_length", "eval_fraction", "seed",
                                              "max_steps", "eval_steps", "batch_size", "learning_rate",
                                              "lr_scheduler", "lora_r", "lora_alpha", "lora_dropout",
                                              "target_modules", "compute_dtype", "optimizer")},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(), **_versions()},
    }
    out["config"]["data_path"] = os.path.relpath(out["config"]["data_path"], ROOT)

    if not args.skip_analysis:
        log.info("quantization error of every linear weight")
        out["weights"] = weight_error(path, cfg)
        log.info("output KL of the 4-bit base models on the held-out rows")
        out["kl"] = output_kl(path, cfg, eval_rows)
        log.info("LoftQ: error of each layer with the initialised adapter")
        out["loftq"] = loftq_error(path, cfg)

    t0 = time.time()
    keys = set(args.variants.split(",")) | {BASELINE} if args.variants else {v.key for v in VARIANTS}
    results = train_all(cfg, tuple(v for v in VARIANTS if v.key in keys))
    out["train_seconds"] = round(time.time() - t0, 1)
    out["table"] = comparison_rows(results)
    out["variants"] = [{k: v for k, v in asdict(r).items() if k != "extra"}
                       | {k: v for k, v in r.extra.items() if k != "metrics_rows"} for r in results]

    if args.prompts > 0 and "nf4_dq" in keys:
        nf4 = next(r for r in results if r.key == "nf4_dq")
        style_cfg = cfg.updated(**next(v for v in VARIANTS if v.key == "nf4_dq").overrides)
        out["style"] = compare_answers(style_cfg, str(Path(nf4.run_dir) / "adapter"), convs, args.prompts,
                                       args.max_new_tokens)
    out["total_seconds"] = round(time.time() - t_start, 1)
    write_outputs(out, results, Path(args.out))
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("transformers", "peft", "bitsandbytes")}


def write_outputs(out: dict[str, Any], results: list[VariantResult], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    steps = out["config"]["max_steps"]
    fig = eval_figure({r.label: r.eval_curve for r in results},
                      f"Eval loss on {results[0].eval_rows} held-out rows, {steps} steps, same seed")
    png = save_figure(fig, folder / "eval_loss.png")
    out["chart"] = os.path.relpath(png, ROOT)
    (folder / "quality.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    if "style" in out:
        (folder / "answers.md").write_text(
            f"# Held-out prompts: base vs NF4 QLoRA adapter\n\nGreedy, {out['style']['max_new_tokens']} new "
            f"tokens at most, seed {out['config']['seed']}; `{out['command']}`.\n\n"
            + answers_markdown(out["style"]) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(report_markdown(out, results), encoding="utf-8")


def report_markdown(out: dict[str, Any], results: list[VariantResult]) -> str:
    c = out["config"]
    parts = [f"# QLoRA quality bench{' (quick)' if out['quick'] else ''}", "",
             f"`{out['command']}`: {c['max_steps']} steps per variant, batch {c['batch_size']}, lr "
             f"{c['learning_rate']:g}, LoRA r={c['lora_r']} alpha={c['lora_alpha']}, compute dtype "
             f"{c['compute_dtype']}, seed {c['seed']}, {results[0].eval_rows} held-out rows; "
             f"{out['total_seconds'] / 60:.1f} min in all.", "",
             "## Eval loss", "", format_table(out["table"], markdown=True), "",
             detail_table(results, markdown=True), "", f"![eval loss]({Path(out['chart']).name})", ""]
    if "weights" in out:
        parts += ["## Quantization error of the weights (relative L2 vs bf16, blocksize 64)", "",
                  weight_tables(out["weights"], markdown=True), "",
                  "## Output KL of the 4-bit base models vs bf16 on the held-out rows", "",
                  kl_table(out["kl"], markdown=True), ""]
    if "loftq" in out:
        parts += ["## LoftQ: relative L2 error of the 4-bit layers vs bf16, before and after its initialisation",
                  "", loftq_table(out["loftq"], markdown=True), "",
                  f"LoftQ initialised {out['loftq']['n_layers']} layers in {out['loftq']['seconds']} s.", ""]
    if "style" in out:
        parts += ["## Style: held-out prompts, base vs adapter", "", style_table(out["style"], markdown=True), "",
                  "Answers: [answers.md](answers.md)", ""]
    return "\n".join(parts)


def print_summary(out: dict[str, Any], results_dir: Path) -> None:
    print()
    print(format_table(out["table"]))
    print()
    print(detail_table_from(out))
    if "weights" in out:
        print()
        print(weight_tables(out["weights"]))
        print()
        print(kl_table(out["kl"]))
    if "loftq" in out:
        print()
        print(loftq_table(out["loftq"]))
    if "style" in out:
        print()
        print(style_table(out["style"]))
    print(f"\n{out['total_seconds'] / 60:.1f} min; results in {os.path.relpath(results_dir, Path.cwd())}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 steps per variant and 12 prompts (< 15 min on 2 cores).")
    p.add_argument("--steps", type=int, help="Steps per variant (default 150, quick 40).")
    p.add_argument("--eval-every", type=int, help="Eval interval in steps; divides --steps (default 25, quick 10).")
    p.add_argument("--eval-fraction", type=float, default=0.08,
                   help="Held-out share (0.08: 56 of the 702 rows that fit max_length).")
    p.add_argument("--prompts", type=int, help="Held-out prompts answered by base and adapter "
                   "(default all held-out rows, quick 12; 0 = skip).")
    p.add_argument("--max-new-tokens", type=int, default=80, help="Longest generated answer (default 80).")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", dest="learning_rate", type=float, help="Learning rate (default: the preset's).")
    p.add_argument("--rank", dest="lora_r", type=int, help="LoRA rank (default: the preset's).")
    p.add_argument("--alpha", dest="lora_alpha", type=int, help="LoRA alpha (default: the preset's).")
    p.add_argument("--compute-dtype", default="bf16", choices=("bf16", "fp32"),
                   help="Dtype of the 16-bit base and of the 4-bit matmuls, the same for all variants.")
    p.add_argument("--variants", help="Comma-separated subset to train, e.g. lora16,nf4_dq (the 16-bit baseline "
                   "is always trained); for quick what-ifs.")
    p.add_argument("--skip-analysis", action="store_true", help="Skip the weight-error and KL measurements.")
    p.add_argument("--model", help="Base model folder (default: the bundled SmolLM2-135M-Instruct).")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "quality-bench"))
    p.add_argument("--replot", metavar="FOLDER", help="Only redraw FOLDER/eval_loss.png from FOLDER/quality.json.")
    p.add_argument("--out", help="Results folder (default bench/results/quality, quick: .../quality/quick).")
    args = p.parse_args(argv)
    if args.replot:
        folder = Path(args.replot)
        out = json.loads((folder / "quality.json").read_text(encoding="utf-8"))
        v = out["variants"]
        fig = eval_figure({r["label"]: r["eval_curve"] for r in v}, f"Eval loss on {v[0]['eval_rows']} held-out "
                          f"rows, {out['config']['max_steps']} steps, same seed")
        print(save_figure(fig, folder / "eval_loss.png"))
        return 0
    args.steps = args.steps or (40 if args.quick else 150)
    args.eval_every = args.eval_every or (10 if args.quick else 25)
    if args.steps % args.eval_every:
        p.error(f"--eval-every {args.eval_every} must divide --steps {args.steps} (the last step is evaluated)")
    if args.prompts is None:
        args.prompts = 12 if args.quick else 1000
    # Only a full run of all four variants replaces the committed results that docs and the UI cite.
    partial = args.quick or args.variants or args.skip_analysis
    args.out = args.out or str(RESULTS_DIR / ("quick" if args.quick else "partial") if partial else RESULTS_DIR)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load buries the step lines
    out = run(args)
    print_summary(out, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
