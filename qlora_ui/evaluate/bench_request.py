"""A benchmark request and its checks, all made before any model loads: the runs (each with an adapter), the
tasks (JSONL files read and checked line by line, lm-eval names looked up in lm-eval's index with the data this
machine has, and, in the app, held to --allowed-datasets), rows per task and few-shot examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..errors import UserError
from ..runs import RunDir
from .local_tasks import LocalTask, looks_like_file, read_task_file
from .task_datasets import refused_tasks

DEFAULT_BATCH_SIZE = 16


@dataclass
class EvalRequest:
    run: RunDir
    tasks: list[str]  # lm-eval task names, or paths of JSONL task files
    limit: int | None = None  # rows per task (None: all)
    num_fewshot: int | None = None  # None: the task's own default (0 for files)
    also: list[RunDir] = field(default_factory=list)  # other runs whose adapters are evaluated too
    chat_template: bool = False  # lm-eval's apply_chat_template: prompts rendered as a chat
    batch_size: int = DEFAULT_BATCH_SIZE
    # Hub dataset ids (fnmatch patterns) the named lm-eval tasks may read: the app's --allowed-datasets, so a shared
    # link's visitor cannot make the app download any dataset by naming a task. None (the CLI): any.
    allowed_datasets: list[str] | None = None


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


def check_lm_eval_tasks(names: list[str], allowed_datasets: list[str] | None = None):
    """lm-eval's task index (include_defaults only when a named task needs it: building the index takes ~10 s),
    with every named task loaded once, so an unknown name or data this machine lacks is refused before a model
    loads. With `allowed_datasets` (the app's --allowed-datasets), a task reading another dataset is refused first:
    loading it would download that dataset."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=bool(names))
    refused = refused_tasks(tm.task_index, names, allowed_datasets)
    if refused:
        raise ConfigError(refused)  # before tm.load below, which downloads what a task reads
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
