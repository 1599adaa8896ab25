"""Benchmarks through lm-evaluation-harness: a run's own 4-bit base with its adapter off and on (and other runs'
adapters), on lm-eval tasks whose data this machine has (the Hugging Face cache) and on the user's own JSONL
(local_tasks.py). lm-eval builds the prompts, runs the model through its HFLM wrapper and computes the metrics with
their standard errors; this module loads the models the way the app does, reports progress, and writes
RUN/eval/<timestamp>.json.

The evaluated model is its own instance, loaded here and dropped afterwards: a model that generated is never
trained (modeling.mark_generated), and the training model is never touched.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, RunConfig
from ..errors import BusyError, RunError, UserError
from ..runs import RunDir, atomic_write_text
from .local_tasks import LocalTask, looks_like_file, read_task_file, task_config

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
FORMAT = 1
DEFAULT_BATCH_SIZE = 16
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
class EvalRequest:
    run: RunDir
    tasks: list[str]  # lm-eval task names, or paths of JSONL task files
    limit: int | None = None  # rows per task (None: all)
    num_fewshot: int | None = None  # None: the task's own default (0 for files)
    also: list[RunDir] = field(default_factory=list)  # other runs whose adapters are evaluated too
    chat_template: bool = False  # lm-eval's apply_chat_template: prompts rendered as a chat
    batch_size: int = DEFAULT_BATCH_SIZE


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


# ---- checking a request (before any model loads) ----

def _int_or_none(value: Any, name: str, low: int, problems: list[str], fix: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
        if not f.is_integer():
            raise ValueError
        n = int(f)
    except (TypeError, ValueError):
        problems.append(f"{name}: '{value}' is not a whole number. {fix}")
        return None
    if n < low:
        problems.append(f"{name}: {n} is below {low}. {fix}")
        return None
    return n


def split_tasks(text: str | list[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return [t.strip() for t in items if t and t.strip()]


def check_request(req: EvalRequest) -> list[str | LocalTask]:
    """Every problem a request has that can be seen without lm-eval's task index, at once. A broken task file
    alone raises its own DataError (lines named); several problems come as one ConfigError."""
    problems: list[UserError] = []
    loose: list[str] = []
    limit = _int_or_none(req.limit, "limit", 1, loose, "Give how many rows per task to score, or leave it empty "
                                                       "for all.")
    shots = _int_or_none(req.num_fewshot, "num_fewshot", 0, loose, "Give 0 or more examples, or leave it empty "
                                                                   "for the task's default.")
    batch = _int_or_none(req.batch_size, "batch_size", 1, loose, "Give 1 or more.")
    req.limit, req.num_fewshot, req.batch_size = limit, shots, batch or DEFAULT_BATCH_SIZE
    for run in [req.run, *req.also]:
        if not run.has_adapter():
            loose.append(f"run {run.name} has no adapter yet (a run saves one when it stops or finishes). Wait for "
                         "it, or pick another run.")
    if len({r.path.resolve() for r in [req.run, *req.also]}) < 1 + len(req.also):
        loose.append("runs: a run is listed twice. Pick each run once.")
    specs: list[str | LocalTask] = []
    if not req.tasks:
        loose.append("tasks: none given. Pick the example task, upload a JSONL file, or type an lm-eval task name "
                     "such as arc_easy.")
    for t in req.tasks:
        if looks_like_file(t):
            try:
                specs.append(read_task_file(t))
            except UserError as e:
                problems.append(e)
        else:
            specs.append(t)
    names = [s.name if isinstance(s, LocalTask) else s for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        loose.append(f"tasks: {', '.join(dupes)} listed twice. Give each task once (two files need two names).")
    if problems and not loose and len(problems) == 1:
        raise problems[0]
    if problems or loose:
        raise ConfigError(loose + [str(p) for p in problems])
    return specs


def check_lm_eval_tasks(names: list[str]):
    """lm-eval's task index (include_defaults only when a named task needs it: building the index takes ~10 s),
    with every named task loaded once, so an unknown name or data this machine lacks is refused before a model
    loads."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=bool(names))
    problems = []
    for n in names:
        if n not in tm.all_tasks:
            import difflib

            near = difflib.get_close_matches(n, tm.all_tasks, n=3, cutoff=0.75)
            hint = f"Did you mean {', '.join(near)}? " if near else ""
            problems.append(f"tasks: '{n}' is not an lm-eval task. {hint}`.venv/bin/lm-eval ls tasks` lists them; a "
                            "file of your own needs its path ending in .jsonl.")
            continue
        try:
            tm.load([n])
        except (ConnectionError, OSError, ValueError, KeyError) as e:
            # datasets raises ConnectionError offline ("Couldn't reach 'cais/mmlu' on the Hub"); the repo is named.
            problems.append(f"tasks: '{n}' needs its dataset, which is not in this machine's Hugging Face cache and "
                            f"cannot be downloaded ({str(e)[:200]}). Load it once where there is internet "
                            f"(`lm-eval run --model dummy --tasks {n} --limit 1`) and copy ~/.cache/huggingface "
                            "here (see docs/evaluation.md).")
    if problems:
        raise ConfigError(problems)
    return tm


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
    tm = check_lm_eval_tasks(named)
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


# ---- results on disk ----

def eval_dir(run: RunDir) -> Path:
    return run.path / EVAL_DIR


def write_result(run: RunDir, record: dict) -> Path:
    """RUN/eval/<timestamp>.json, written then renamed (a reader never sees half a result)."""
    d = eval_dir(run)
    d.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = d / f"{stamp}.json", 1
    while path.exists():  # two evaluations in one second
        n += 1
        path = d / f"{stamp}-{n}.json"
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def list_results(run: RunDir) -> list[Path]:
    """A run's saved evaluations, newest first."""
    d = eval_dir(run)
    return sorted(d.glob("*.json"), key=lambda p: p.name, reverse=True) if d.is_dir() else []


def read_result(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{Path(path).name} is not a readable evaluation result ({e}). Delete it or run the "
                       "evaluation again.") from None
    if not isinstance(record, dict) or not isinstance(record.get("models"), list):
        raise RunError(f"{Path(path).name} is not an evaluation result. Delete it or run the evaluation again.")
    return record


COLUMNS = ("model", "task", "metric", "value", "stderr", "delta")
HEADERS = ("Model", "Task", "Metric", "Value", "± stderr", "Δ vs base")


def result_rows(record: dict) -> list[dict]:
    """One row per model, task and metric: base first, then each adapter with its difference from its base."""
    delta = {(d["model"], d["task"], d["metric"]): d["delta"] for d in record.get("difference", [])}
    rows = []
    for m in record["models"]:
        for task, metrics in m.get("metrics", {}).items():
            for metric, got in metrics.items():
                rows.append({"model": m["label"], "task": task, "metric": metric, "value": got["value"],
                             "stderr": got["stderr"], "delta": delta.get((m["label"], task, metric))})
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def table_lines(record: dict) -> list[list[str]]:
    """The result table as text cells (the CLI prints it, the tab shows it)."""
    return [[r["model"], r["task"], r["metric"], _fmt(r["value"]), _fmt(r["stderr"]), _fmt(r["delta"], True)]
            for r in result_rows(record)]


def format_table(record: dict) -> str:
    lines = [list(HEADERS), *table_lines(record)]
    widths = [max(len(row[i]) for row in lines) for i in range(len(HEADERS))]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


# ---- in the background (the app) ----

class BenchmarkJob:
    """One evaluation in a thread: progress, the result or the caught error; Stop ends it at the next request."""

    def __init__(self, req: EvalRequest):
        self.req = req
        self.run = req.run
        self.fraction, self.message = 0.0, "waiting"
        self.state: Literal["running", "finished", "failed", "stopped"] = "running"
        self.path: Path | None = None
        self.record: dict | None = None
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self.started = time.time()
        self.thread = threading.Thread(target=self._work, daemon=True, name=f"benchmark-{req.run.name}")

    def _progress(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message
        log.info("benchmark %s: %3.0f%% %s", self.run.name, 100 * fraction, message)

    def _work(self) -> None:
        try:
            self.path, self.record = run_benchmarks(self.req, self._progress, self.stop_event)
            self.state = "finished"
        except BenchmarkStopped:
            self.state, self.message = "stopped", "stopped: nothing was written"
        except BaseException as e:  # noqa: BLE001 - shown to the user; the app keeps serving
            self.error = e
            self.state = "failed"
            self.message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e)[:400]}"
            if not isinstance(e, UserError):
                log.exception("benchmark of %s failed", self.run.name)

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


class BenchmarkJobs:
    """The app's evaluations: one at a time (each loads its own 4-bit base and takes every core), the last one per
    run kept so a page reload finds it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, BenchmarkJob] = {}

    def running(self) -> BenchmarkJob | None:
        return next((j for j in self.jobs.values() if j.alive), None)

    def start(self, req: EvalRequest) -> BenchmarkJob:
        with self.lock:
            busy = self.running()
            if busy is not None:
                raise BusyError(f"An evaluation of {busy.run.name} is running ({busy.message}). Wait for it or "
                                "stop it: one evaluation at a time.")
            check_request(req)  # a broken file or value is refused at the click, not in the thread
            job = BenchmarkJob(req)
            self.jobs[req.run.name] = job
            job.thread.start()
            return job

    def get(self, run_name: str | None) -> BenchmarkJob | None:
        return self.jobs.get(run_name) if run_name else None
