"""Training speed and memory: this project's engine against a plain HF Trainer + peft + bitsandbytes script.

    python bench/speed.py --quick          # 12 steps each (about 3 minutes on 2 CPU cores)
    python bench/speed.py                  # 30 steps each, the issue's setting
    python bench/speed.py --steps 20 --data my_alpaca.json --device cuda
    python bench/speed.py --peer llamafactory   # LLaMA-Factory 0.9.5 as a third column (its own venv, cached)

One invocation trains, each in its own subprocess (so neither's memory or threads leak into the other):
  (a) baseline: the way the common tools write it: NF4 + double quant through BitsAndBytesConfig,
      prepare_model_for_kbit_training, get_peft_model on all linear layers, HF Trainer with
      DataCollatorForSeq2Seq padding, bf16 autocast (also on CPU), gradient checkpointing;
  (b) ours: qlora_ui.training.TrainingJob (padding-free batches, labelled-positions head, bf16 autocast with
      frozen weights in bf16);
  (c) with --peer llamafactory: LLaMA-Factory 0.9.5 itself, installed into its own venv under the cache (never
      into this project's), trained through its `run_exp` (what `llamafactory-cli train` calls) from a YAML
      written with the same settings;
on the same model, the same tokenized rows in the same order (the peer tokenizes the same alpaca file with its
smollm2 template and draws its own order), and the same hyperparameters (rows per step,
LoRA r/alpha/dropout, cutoff, lr and schedule, optimizer, clipping, checkpointing). It prints median s/step,
non-padding tokens/s, peak RSS (peak GPU memory on a GPU), the loss of the last step, the ratios ours/baseline
and whether each goal is met. Run it alone on the machine: two CPU-heavy jobs on 2 cores slow each other 15-30x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PIRATE_DATA, ROOT, chatterbot_alpaca_rows, meets, table

GOALS = {"tokens_per_s": (">=", 1.5), "peak_rss": ("<=", 1.0), "last_loss": ("within", 0.02)}
# Second table: each side's own defaults. The plain script as the QLoRA examples write it (batch 4, cutoff 512,
# r 8 / alpha 16 / dropout 0.05, lr 2e-4, gradient checkpointing on as prepare_model_for_kbit_training sets it);
# ours is the cpu-quickstart preset. The losses are of different recipes, so they are shown, not compared.
BASELINE_DEFAULTS = {"batch": 4, "cutoff": 512, "r": 8, "alpha": 16, "dropout": 0.05, "lr": 2e-4,
                     "gradient_checkpointing": True}
DEFAULTS_GOALS = {"tokens_per_s": (">=", 2.0), "peak_rss": ("<=", 1.0)}
# Against LLaMA-Factory itself at the same settings (issue 28). Its loss is not compared: it tokenizes with its own
# template and draws its own order.
PEER_GOALS = {"tokens_per_s": (">=", 1.5), "peak_rss": ("<=", 0.9)}


# ---------------------------------------------------------------- children

class StepTimer:
    """A TrainerCallback recording each optimizer step's end time and the non-padding tokens seen so far."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self.tokens, self.losses = [], [], {}

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter())
                self.tokens.append(int(state.num_input_tokens_seen))

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses[state.global_step] = float(logs["loss"])

        return _Timer()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child_result(timer, t_start: float) -> dict:
    import torch

    times = [t_start] + timer.times
    step_s = [b - a for a, b in zip(times, times[1:])]
    tokens = [b - a for a, b in zip([0] + timer.tokens, timer.tokens)]
    warm = 2 if len(step_s) > 4 else 0  # the first steps allocate the optimizer state and warm the kernels
    out = {"step_s": step_s, "tokens": tokens, "median_s_per_step": statistics.median(step_s[warm:]),
           "tokens_per_s": sum(tokens[warm:]) / sum(step_s[warm:]), "losses": timer.losses,
           "last_loss": timer.losses[max(timer.losses)] if timer.losses else None, "peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def run_baseline(spec: dict) -> dict:
    """The plain script, as the common tools write it."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(spec["seed"])
    on_gpu = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0} if on_gpu else {"": "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"],
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = json.loads(Path(spec["rows"]).read_text())
    ds = datasets.Dataset.from_list(rows)
    args = TrainingArguments(output_dir=spec["workdir"] + "/baseline", max_steps=spec["steps"],
                             per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
                             lr_scheduler_type="cosine", optim="adamw_torch", max_grad_norm=1.0, seed=spec["seed"],
                             data_seed=spec["seed"], logging_steps=1, save_strategy="no", report_to="none",
                             bf16=True, use_cpu=not on_gpu, disable_tqdm=True, dataloader_num_workers=0,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
                             gradient_checkpointing=False)  # already on through prepare_model_for_kbit_training
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    return child_result(timer, t0)


def run_ours(spec: dict) -> dict:
    import torch

    from qlora_ui.config import RunConfig
    from qlora_ui.jobs import create_job

    if spec.get("preset"):  # the project's own defaults: the preset as a user starts it, no eval or saving
        from qlora_ui.config import load_preset

        cfg = load_preset(spec["preset"]).updated(
            base_model=spec["model"], data_path=spec["data"], max_steps=spec["steps"], eval_fraction=0.0,
            eval_steps=0, save_steps=100_000,
            seed=spec["seed"], runs_dir=spec["workdir"] + "/runs", name="speed-defaults", **spec.get("ours", {}))
    else:
        cfg = RunConfig().updated(
            base_model=spec["model"], data_path=spec["data"], max_length=spec["cutoff"], eval_fraction=0.0,
            max_steps=spec["steps"], batch_size=spec["batch"], grad_accum=1, learning_rate=spec["lr"],
            lr_scheduler="cosine", warmup_ratio=0.0, optimizer="adamw_torch", max_grad_norm=1.0,
            gradient_checkpointing=spec["gradient_checkpointing"], group_by_length=False, lora_r=spec["r"],
            lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], seed=spec["seed"], save_steps=100_000,
            eval_steps=0, runs_dir=spec["workdir"] + "/runs", name="speed",
            **{k: v for k, v in spec.get("ours", {}).items()})
    torch.manual_seed(spec["seed"])
    timer = StepTimer()
    job = create_job(cfg, extra_callbacks=[timer])
    t0 = [None]

    class Start:  # the clock starts when training starts, as the baseline's does (not at model load)
        def __new__(cls):
            from transformers import TrainerCallback

            class _S(TrainerCallback):
                def on_train_begin(self, *a, **k):
                    t0[0] = time.perf_counter()
            return _S()

    job.extra_callbacks.insert(0, Start())
    state = job.run_blocking()
    if state != "finished":
        raise SystemExit(f"our run ended {state}: {job.error_message}")
    return child_result(timer, t0[0])


LLAMAFACTORY = "0.9.5"
PEER_DIR = Path(os.environ.get("QLORA_STUDIO_CACHE", Path.home() / ".cache" / "qlora-studio")) / "peers"


def llamafactory_yaml(spec: dict) -> dict:
    """The peer's own YAML for the same settings (what a user would pass to `llamafactory-cli train`)."""
    data_dir = Path(spec["workdir"]) / "llamafactory-data"
    data_dir.mkdir(exist_ok=True)
    shutil.copy(spec["data"], data_dir / "rows.json")
    (data_dir / "dataset_info.json").write_text(json.dumps({"speed": {"file_name": "rows.json"}}))
    return {
        "model_name_or_path": spec["model"], "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": spec["r"], "lora_alpha": spec["alpha"], "lora_dropout": spec["dropout"], "lora_target": "all",
        "quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "nf4",
        "double_quantization": True, "dataset": "speed", "dataset_dir": str(data_dir), "template": "smollm2",
        "cutoff_len": spec["cutoff"], "overwrite_cache": True, "output_dir": spec["workdir"] + "/llamafactory",
        "overwrite_output_dir": True, "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1, "learning_rate": spec["lr"], "max_steps": spec["steps"],
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "optim": "adamw_torch", "max_grad_norm": 1.0,
        "bf16": True, "use_cpu": spec.get("device", "cpu") == "cpu", "seed": spec["seed"], "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
        "disable_gradient_checkpointing": not spec["gradient_checkpointing"],
        "include_num_input_tokens_seen": "non_padding",
    }


def run_llamafactory(spec: dict) -> dict:
    """Runs inside the peer's venv."""
    from llamafactory.train.tuner import run_exp

    args = llamafactory_yaml(spec)
    (Path(spec["workdir"]) / "llamafactory.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n"
                                                                    for k, v in args.items()))
    timer, t0 = StepTimer(), [None]

    class Start:
        def __new__(cls):
            from transformers import TrainerCallback

            class _S(TrainerCallback):
                def on_train_begin(self, *a, **k):
                    t0[0] = time.perf_counter()
            return _S()

    run_exp(args, callbacks=[Start(), timer])
    return child_result(timer, t0[0])


def ensure_llamafactory() -> tuple[Path, dict]:
    """LLaMA-Factory's own venv under the cache, made once: the same torch and bitsandbytes as this project's,
    then llamafactory. Two things a CPU machine needs: PyPI's torchvision is built for CUDA torch and breaks
    transformers' import (`torchvision::nms does not exist`), so it is removed (text SFT never uses it); and
    LLaMA-Factory imports torchaudio at module level (for audio datasets only) while no torchaudio release loads
    against this torch, so a stub module stands in for it on the peer's path."""
    import bitsandbytes
    import torch

    venv = PEER_DIR / f"llamafactory-{LLAMAFACTORY}"
    py = venv / "bin" / "python"
    stubs = venv / "stubs"
    if not (venv / ".ready").exists():
        print(f"installing LLaMA-Factory {LLAMAFACTORY} into {venv} (once; a few minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}",
                              f"bitsandbytes=={bitsandbytes.__version__}", f"llamafactory=={LLAMAFACTORY}"],
                       check=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True)
        (stubs / "torchaudio").mkdir(parents=True, exist_ok=True)
        (stubs / "torchaudio" / "__init__.py").write_text(
            '"""Stand-in: LLaMA-Factory imports torchaudio for audio datasets only."""\n')
        (venv / ".ready").write_text(LLAMAFACTORY + "\n")
    return py, {"PYTHONPATH": str(stubs)}


def child_main(which: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    run = {"baseline": run_baseline, "ours": run_ours, "llamafactory": run_llamafactory}[which]
    res = run(spec)
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- parent

def run_child(which: str, spec: dict) -> dict:
    path = Path(spec["workdir"]) / f"spec-{which}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    python = sys.executable
    if which == "llamafactory":
        python, extra = ensure_llamafactory()
        env.update(extra)
    t0 = time.time()
    p = subprocess.run([str(python), __file__, "--child", which, str(path)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=3600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{which} failed:\n{p.stderr[-3000:]}")
    res = json.loads(line[7:])
    res["wall_s"] = time.time() - t0
    return res


def prepared_rows(data: Path, model: str, cutoff: int, seed: int) -> list[dict]:
    """The rows our engine trains on, in its order: the baseline is given exactly these."""
    from qlora_ui.config import DataConfig, ModelConfig
    from qlora_ui.data import prepare_dataset
    from qlora_ui.modeling import load_tokenizer

    tok = load_tokenizer(model, ModelConfig(base_model=model))
    prep = prepare_dataset(DataConfig(data_path=str(data), max_length=cutoff, eval_fraction=0.0), tok, seed=seed)
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": r["attention_mask"]}
            for r in prep.train]


def matmul_ceiling(threads: int) -> dict:
    """GFLOP/s of bf16 and fp32 matmuls at this model's shapes (a packed batch of ~1,000 tokens through a
    576 x 1536 projection), on `threads` threads: the most a training step could reach."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        for _ in range(3):
            a @ b
        n, t0 = 30, time.perf_counter()
        for _ in range(n):
            a @ b
        out[name] = 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9
    return out


def train_flops_per_token(model: str) -> float:
    """Matmul FLOPs per trained token with a frozen base and gradient checkpointing: forward (2N), the forward
    again in the recompute (2N) and the input gradients in backward (2N) over the N non-embedding weights; the
    frozen weights get no weight gradients (LoRA's own are negligible), the output layer runs on labelled tokens
    only and is left out."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return 6 * per_layer * n_layers


def table_md(base: dict, ours: dict, title: str, goals: dict | None = None, compare_loss: bool = True,
             base_name: str = "baseline") -> str:
    goals = goals or GOALS
    rows = [("median s/step", "median_s_per_step", None), ("non-padding tokens/s", "tokens_per_s", "tokens_per_s"),
            ("peak RSS GB", "peak_rss_gb", "peak_rss"), ("loss at the last step", "last_loss", "last_loss")]
    if "peak_gpu_gb" in base:
        rows.append(("peak GPU GB", "peak_gpu_gb", None))
    goal_text = {k: (f"within ±{g:.0%}" if op == "within" else f"{op} {g}x") for k, (op, g) in goals.items()}
    if not compare_loss:
        rows = [(label, key, goal if goal != "last_loss" else None) for label, key, goal in rows]
    body = []
    for label, key, goal in rows:
        b, o = base.get(key), ours.get(key)
        if b is None or o is None:
            body.append((label, str(b), str(o), "–", "", ""))
            continue
        ratio = o / b if b else None
        met = meets(ratio, *goals[goal]) if goal else ""
        body.append((label, f"{b:.3f}", f"{o:.3f}", f"{ratio:.2f}x", goal_text.get(goal, ""), met))
    head = ["measure", base_name, "ours", f"ours / {base_name}", "goal", "met"]
    return f"### {title}\n\n" + table(head, body, unmeasured="–")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="12 steps each")
    p.add_argument("--data", help="an alpaca-style file (default: 300 rows built from chatterbot-corpus)")
    p.add_argument("--model", default=None, help="a local model folder (default: the bundled SmolLM2-135M)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--peer", choices=["llamafactory"], help="also train with LLaMA-Factory 0.9.5 (installed once "
                   "into its own venv under the cache) at the same settings: a third column")
    p.add_argument("--skip-parts", action="store_true", help="no run per fast-path part switched off")
    p.add_argument("--skip-defaults", action="store_true", help="no second table (each side's own defaults)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from qlora_ui.modeling import ensure_bundled_model

    model = args.model or str(ensure_bundled_model())
    steps = 12 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="qlora-speed-") as work:
        data = Path(args.data) if args.data else Path(work) / "alpaca300.json"
        if not args.data:
            data.write_text(json.dumps(chatterbot_alpaca_rows(300)))
        rows = prepared_rows(data, model, args.cutoff, seed=42)
        (Path(work) / "rows.json").write_text(json.dumps(rows))
        lengths = sorted(len(r["input_ids"]) for r in rows)
        spec = dict(model=model, data=str(data), rows=str(Path(work) / "rows.json"), steps=steps, batch=args.batch,
                    cutoff=args.cutoff, lr=2e-4, r=8, alpha=16, dropout=0.0, gradient_checkpointing=True, seed=42,
                    threads=args.threads, workdir=work)
        print(f"{len(rows)} rows, {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}); "
              f"{steps} steps of {args.batch} rows; r 8, alpha 16, dropout 0, cutoff {args.cutoff}, lr 2e-4 cosine, "
              f"adamw_torch, clip 1.0, gradient checkpointing on, no length grouping, NF4 + double quant; "
              f"{args.threads} threads", flush=True)
        base = run_child("baseline", spec)
        print(f"baseline: {base['median_s_per_step']:.2f} s/step", flush=True)
        ours = run_child("ours", spec)
        print(f"ours: {ours['median_s_per_step']:.2f} s/step", flush=True)
        peer = None
        if args.peer:
            peer = run_child(args.peer, {**spec, "device": args.device})
            print(f"{args.peer}: {peer['median_s_per_step']:.2f} s/step", flush=True)
        parts = {}
        for name, off in [("without padding-free", {"padding_free": False}),
                          ("without the labelled-positions head", {"labelled_head": False}),
                          ("without mixed precision", {"mixed_precision": False}),
                          ("without fused LoRA layers", {"fused_lora": False}),
                          ("without the recompute cache", {"checkpoint_cache_mb": 0})]:
            if args.quick or args.skip_parts:
                break
            parts[name] = run_child("ours", {**spec, "ours": off})
            print(f"ours {name}: {parts[name]['median_s_per_step']:.2f} s/step", flush=True)
        base_def = ours_def = None
        if not args.skip_defaults:  # second table: each side as its user would start it, on the pirate data
            pirate = PIRATE_DATA
            (Path(work) / "pirate-rows.json").write_text(json.dumps(prepared_rows(pirate, model, 512, seed=42)))
            base_spec = {**spec, **BASELINE_DEFAULTS, "data": str(pirate),
                         "rows": str(Path(work) / "pirate-rows.json")}
            base_def = run_child("baseline", base_spec)
            print(f"baseline, its defaults: {base_def['median_s_per_step']:.2f} s/step", flush=True)
            ours_def = run_child("ours", {**spec, "data": str(pirate), "preset": "cpu-quickstart"})
            print(f"ours, cpu-quickstart: {ours_def['median_s_per_step']:.2f} s/step", flush=True)
    print()
    print(table_md(base, ours, "Same hyperparameters: ours vs the plain Trainer + peft + bitsandbytes script"))
    if peer:
        print()
        print(table_md(peer, ours, "Same hyperparameters: ours vs LLaMA-Factory " + LLAMAFACTORY, goals=PEER_GOALS,
                       compare_loss=False, base_name="LLaMA-Factory"))
    if base_def:
        print()
        title = ("Each side's defaults on the pirate data: ours (cpu-quickstart preset) vs the plain script ("
                 + ", ".join(f"{k} {v}" for k, v in BASELINE_DEFAULTS.items()) + ")")
        print(table_md(base_def, ours_def, title, goals=DEFAULTS_GOALS, compare_loss=False))
    if parts:
        print("\n### Each part switched off (ours), tokens/s and peak RSS against the baseline\n")
        print("| ours | tokens/s | x baseline | peak RSS GB | x baseline |\n|---|---|---|---|---|")
        for name, r in [("all on", ours)] + list(parts.items()):
            print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
                  f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / base['peak_rss_gb']:.2f} |")
    ceiling = matmul_ceiling(args.threads)
    fpt = train_flops_per_token(model)
    reached = ours["tokens_per_s"] * fpt / 1e9
    print(f"\nCeiling: {fpt / 1e9:.2f} GFLOP per trained token (frozen base, checkpointing); ours reaches "
          f"{reached:.0f} GFLOP/s = {100 * reached / ceiling['bf16']:.0f}% of this CPU's bf16 matmul rate "
          f"({ceiling['bf16']:.0f} GFLOP/s; fp32 {ceiling['fp32']:.0f}), the baseline "
          f"{100 * base['tokens_per_s'] * fpt / 1e9 / ceiling['bf16']:.0f}%.")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "ours": ours, "peer": peer, "parts": parts,
                                               "steps": steps,
                                               "baseline_defaults": base_def, "ours_defaults": ours_def,
                                               "ceiling_gflops": ceiling, "flops_per_token": fpt}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
