"""A benchmark run through lm-evaluation-harness: a run's own 4-bit base with its adapter off and on (and other
runs' adapters), on lm-eval tasks whose data this machine has (the Hugging Face cache) and on the user's own JSONL
(local_tasks.py). lm-eval builds the prompts, runs the model through its HFLM wrapper and computes the metrics with
their standard errors; this module loads the models the way the app does, reports progress, and writes
RUN/eval/<timestamp>.json (bench_results.py).

The evaluated model is its own instance, loaded here and dropped afterwards: a model that generated is never
trained (modeling.mark_generated), and the training model is never touched.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import RunConfig
from ..runs import RunDir
from .bench_request import EvalRequest, check_lm_eval_tasks, check_request
from .bench_results import write_result
from .local_tasks import LocalTask, task_config

FORMAT = 1
# lm-eval bootstraps the stderr of a few metrics (f1, mcc, bleu...); a mean has a closed form and ignores this.
BOOTSTRAP_ITERS = 1000
FEWSHOT_SEED = 1234
LOAD_SHARE = 0.5  # a model load counts as half an evaluation in the progress fraction
# Rows per task whose answers are kept in the result file (which rows changed); MMLU's 14,000 would make megabytes.
MAX_SAMPLES_KEPT = 2000
VERSIONED = ("lm_eval", "transformers", "peft", "torch", "bitsandbytes", "datasets")

Progress = Callable[[float, str], None]


class BenchmarkStopped(Exception):
    """Stop was pressed: the evaluation ends at the next answered request and nothing is written."""


@dataclass
class Model:
    """One model evaluated: a base (adapters off) or one run's adapter on that base."""

    label: str
    role: Literal["base", "adapter"]
    cfg: RunConfig
    run: RunDir | None = None
    base_label: str | None = None  # an adapter's base, for the difference

    @property
    def adapter_name(self) -> str:
        return f"a_{self.run.name}" if self.run is not None else ""


# ---- the models ----

def base_key(cfg: RunConfig) -> tuple:
    m, q = cfg.model, cfg.quantization
    return (m.base_model.strip(), m.revision, q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype)


def plan_models(req: EvalRequest) -> list[tuple[Model, list[Model]]]:
    """(base, [adapters on it]) per distinct base: runs sharing a base and its quantization share one load."""
    groups: dict[tuple, list[RunDir]] = {}
    cfgs = {}
    for run in [req.run, *req.also]:
        cfgs[run.name] = run.config()
        groups.setdefault(base_key(cfgs[run.name]), []).append(run)
    out = []
    for runs in groups.values():
        label = "base" if len(groups) == 1 else f"base of {runs[0].name}"
        base = Model(label, "base", cfgs[runs[0].name])
        out.append((base, [Model(r.name, "adapter", cfgs[r.name], r, label) for r in runs]))
    return out


def _load(base: Model, adapters: list[Model]):
    """The run's base exactly as the run quantized it (modeling.load_base_model), with every adapter attached
    under its own name; returns (peft model, tokenizer)."""
    from ..imports import ml_libraries

    ml_libraries()  # a benchmark thread may be the first to import transformers (imports.py says why)
    from peft import PeftModel

    from ..chat import uses_dora
    from ..modeling import (
        keep_4bit_layout_trainable,
        load_base_model,
        load_tokenizer,
        mark_generated,
        resolve_model_path,
    )

    cfg = base.cfg
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    model = load_base_model(path, cfg.model, cfg.quantization)
    if any(uses_dora(a.run.adapter_dir) for a in adapters):
        # As in chat.py: DoRA dequantizes the 4-bit weight itself and misreads a repacked one.
        keep_4bit_layout_trainable(model)
    mark_generated(model)  # scored and generated with: never to be trained
    model.config.use_cache = True
    peft = None
    for a in adapters:
        if peft is None:
            peft = PeftModel.from_pretrained(model, str(a.run.adapter_dir), adapter_name=a.adapter_name)
        else:
            peft.load_adapter(str(a.run.adapter_dir), adapter_name=a.adapter_name)
    peft.eval()
    return peft, tok


def _counting_lm(model, tok, batch_size: int, on_answer: Callable[[int, int], None]):
    """lm-eval's HFLM over our loaded model, told how many requests each call has; lm-eval's cache hook is called
    once per answered request (HFLM's own progress bar counts the same), which gives the progress."""
    from lm_eval.models.huggingface import HFLM

    class CountingLM(HFLM):
        def _counted(self, n: int):
            self.total, self.done = n, 0
            on_answer(0, n)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._counted(len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._counted(len(requests))
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._counted(len(requests))
            return super().generate_until(requests, disable_tqdm=True)

    class Hook:
        def __init__(self, lm):
            self.lm = lm

        def add_partial(self, attr, req, res) -> None:
            self.lm.done += 1
            on_answer(self.lm.done, self.lm.total)

    # Log-softmax in fp32: with a bf16 compute dtype the scores came in steps of 0.5-1 nat (-141.0, -97.5), which
    # ties choices that differ by less.
    lm = CountingLM(pretrained=model, tokenizer=tok, batch_size=batch_size, softmax_dtype="float32")
    lm.total, lm.done = 0, 0
    lm.set_cache_hook(Hook(lm))
    return lm


def _specs(tasks: list[str | LocalTask]) -> list[str | dict]:
    # A fresh config per evaluation: lm-eval sets few-shot values on the task objects it builds.
    return [task_config(t) if isinstance(t, LocalTask) else t for t in tasks]


def _metrics(res: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's {"task": {"acc,none": v, "acc_stderr,none": s}} as {"task": {"acc": {"value", "stderr"}}}; a
    filter other than 'none' stays in the metric's name."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, row in {**res.get("results", {}), **res.get("groups", {})}.items():
        for key, v in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(v, (int, float)):
                continue
            se = row.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            out.setdefault(task, {})[name] = {"value": float(v),
                                              "stderr": float(se) if isinstance(se, (int, float)) else None}
    return out


def _samples(res: dict) -> dict[str, list[dict]]:
    """Each row's answer, compact: the log-likelihood of every choice (multiple choice) or the generated text."""
    out: dict[str, list[dict]] = {}
    for task, rows in (res.get("samples") or {}).items():
        kept = []
        for s in rows[:MAX_SAMPLES_KEPT]:
            resps = s.get("filtered_resps") or []
            target = s.get("target")
            item: dict[str, Any] = {"doc_id": s.get("doc_id"),
                                    "target": target if isinstance(target, (int, float, str)) else str(target)}
            if resps and isinstance(resps[0], (list, tuple)):  # loglikelihood requests: (log-likelihood, greedy)
                item["lls"] = [round(float(r[0]), 4) for r in resps]
            else:
                item["output"] = str(resps[0])[:1000] if resps else ""
            kept.append(item)
        out[task] = kept
    return out


def _difference(models: list[dict]) -> list[dict]:
    by_label = {m["label"]: m for m in models}
    rows = []
    for m in models:
        base = by_label.get(m.get("base_label") or "")
        if m["role"] != "adapter" or base is None:
            continue
        for task, metrics in m["metrics"].items():
            for metric, got in metrics.items():
                ref = base["metrics"].get(task, {}).get(metric)
                if ref is None:
                    continue
                ses = [got["stderr"], ref["stderr"]]
                # Both stderrs combined as if independent: the same rows make them correlated, so this is wide.
                se = math.sqrt(sum(s * s for s in ses)) if all(s is not None for s in ses) else None
                rows.append({"model": m["label"], "base": base["label"], "task": task, "metric": metric,
                             "base_value": ref["value"], "value": got["value"], "delta": got["value"] - ref["value"],
                             "stderr": se})
    return rows


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in VERSIONED:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "?"
    return out


def run_benchmarks(req: EvalRequest, progress: Progress | None = None,
                   stop: threading.Event | None = None) -> tuple[Path, dict]:
    """Evaluate, write RUN/eval/<timestamp>.json, return (its path, its content). Raises a UserError (nothing
    written) for a bad request, BenchmarkStopped when `stop` is set."""
    say = progress or (lambda f, m: None)
    t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tasks = check_request(req)  # before importing lm-eval (seconds): a broken file is refused at once
    from lm_eval import simple_evaluate

    say(0.0, "checking tasks")
    named = [t for t in tasks if isinstance(t, str)]
    tm = check_lm_eval_tasks(named, req.allowed_datasets)
    plan = plan_models(req)
    units = sum(LOAD_SHARE + 1 + len(adapters) for _, adapters in plan)
    done_units = 0.0
    models: list[dict] = []
    task_info = [t.describe() if isinstance(t, LocalTask) else {"name": t, "source": "lm-eval"} for t in tasks]
    n_samples: dict[str, Any] = {}
    load_seconds = 0.0
    current = {"label": ""}

    def on_answer(done: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise BenchmarkStopped("stopped")
        inner = done / total if total else 0.0
        say(min(0.99, (done_units + inner) / units), f"{current['label']}: {done}/{total} requests")

    for base, adapters in plan:
        # A local folder by its last part only: the message reaches every session of a shared app.
        shown = Path(base.cfg.model.base_model).name if Path(base.cfg.model.base_model).exists() else \
            base.cfg.model.base_model
        say(done_units / units, f"loading {shown} in 4-bit with {len(adapters)} adapter(s)")
        t_load = time.time()
        peft, tok = _load(base, adapters)
        load_seconds += time.time() - t_load
        done_units += LOAD_SHARE
        lm = _counting_lm(peft, tok, req.batch_size, on_answer)
        for m in [base, *adapters]:
            current["label"] = m.label if m.role == "adapter" else f"{m.label} (adapter off)"
            say(done_units / units, f"{current['label']}: building requests")
            t_model = time.time()
            kwargs = dict(tasks=_specs(tasks), num_fewshot=req.num_fewshot, limit=req.limit, task_manager=tm,
                          log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS, apply_chat_template=req.chat_template,
                          # The app's other threads keep their random state: greedy scoring needs no seed, the
                          # few-shot draw has its own.
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                          fewshot_random_seed=FEWSHOT_SEED)
            if m.role == "base":
                with peft.disable_adapter():
                    res = simple_evaluate(lm, **kwargs)
            else:
                peft.set_adapter(m.adapter_name)
                res = simple_evaluate(lm, **kwargs)
            n_samples = res.get("n-samples", n_samples)
            models.append({"label": m.label, "role": m.role, "run": m.run.name if m.run else None,
                           "base_label": m.base_label, "adapter": str(m.run.adapter_dir) if m.run else None,
                           "base_model": m.cfg.model.base_model,
                           "quantization": {"load_in_4bit": m.cfg.quantization.load_in_4bit,
                                            "quant_type": m.cfg.quantization.quant_type,
                                            "double_quant": m.cfg.quantization.double_quant,
                                            "compute_dtype": m.cfg.quantization.compute_dtype},
                           "metrics": _metrics(res), "n_shot": res.get("n-shot", {}), "samples": _samples(res),
                           "seconds": round(time.time() - t_model, 2)})
            done_units += 1
        del lm, peft  # this group's model goes before the next one loads

    record = {
        "format": FORMAT, "run": req.run.name, "created": started,
        "tasks": task_info, "limit": req.limit, "num_fewshot": req.num_fewshot,
        "chat_template": req.chat_template, "batch_size": req.batch_size, "n_samples": n_samples,
        "models": models, "difference": _difference(models), "versions": versions(),
        "timing": {"seconds": round(time.time() - t0, 2), "load_seconds": round(load_seconds, 2),
                   "threads": _threads()},
    }
    path = write_result(req.run, record)
    say(1.0, f"done in {time.time() - t0:.0f} s")
    return path, record


def _threads() -> int:
    import torch

    return torch.get_num_threads()
