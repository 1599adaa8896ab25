"""Starting a run: the one way in for the UI (Studio), the CLI, the tests and the benches.

`create_job(cfg)` starts a new run, `resume_job(run, ...)` continues one. Each runs its checks as named steps,
all before anything changes on disk, then returns a job that is ready and not yet running: `.start()` runs it in a
thread (the UI), `.run_blocking()` here (the CLI). The job is picked by the number of processes: one trains in this
process (training.TrainingJob), several are launched through accelerate and followed from the run folder
(launch.LaunchedJob); both have the same surface.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import FIELD_INDEX, RunConfig, coerce
from .errors import RunError
from .launch import LaunchedJob
from .runs import RunDir, check_run_dataset, copy_dataset_into, create_run
from .training import TrainingJob

log = logging.getLogger(__name__)

# Settings a resume may change: how many processes, and a smaller per-device batch after running out of memory.
RESUME_OVERRIDES = ("processes", "batch_size", "grad_accum", "accelerate_config")


def job_class(processes: int) -> type[TrainingJob]:
    return LaunchedJob if processes > 1 else TrainingJob


def create_job(cfg: RunConfig, **job_kw: Any) -> TrainingJob:
    """A new run: checked, its folder made, its dataset recorded. `job_kw` (listener=, extra_callbacks=) go to the
    job as they are."""
    cfg.validate(need_data=True)
    preflight(cfg)
    run = create_run(cfg)
    cfg = copy_dataset_into(run, cfg)
    return job_class(cfg.training.processes)(cfg, run, **job_kw)


def resume_job(run: RunDir, *, extend_to: int | None = None, overrides: dict[str, Any] | None = None,
               **job_kw: Any) -> TrainingJob:
    """Continue `run` from its last checkpoint, to `extend_to` steps in all when given, with the `overrides` a resume
    may change (RESUME_OVERRIDES). A refused resume leaves the run folder as it was."""
    check_resumable(run, extend_to)
    cfg, changed = resumed_config(run, extend_to, overrides)
    cfg.validate(need_data=True)
    check_run_dataset(run, cfg.data.data_path)  # resuming on changed data is refused, clearly
    if changed:
        run.write_config(cfg)  # only once the resume is accepted: a refused one changes nothing
    return job_class(cfg.training.processes)(cfg, run, resume=True, **job_kw)


def preflight(cfg: RunConfig) -> None:
    """A bad model or a bad file is refused before a run folder exists, with the message the data panel shows
    (not a failed run with a traceback in its log)."""
    from .data import check_file
    from .modeling import preflight as check_model
    from .modeling import resolve_init_adapter

    check_model(cfg.model)
    resolve_init_adapter(cfg.lora.init_adapter, cfg.runs_dir)
    if cfg.training.method == "sft":
        from .errors import DataError

        try:
            check_file(cfg.data)
        except DataError as e:
            from .data.preference import holds_pairs

            if holds_pairs(cfg.data):
                raise DataError(f"{e} This file holds preference pairs ('chosen' and 'rejected' columns): to "
                                "train on them, set method dpo or orpo (--method dpo).") from None
            raise
    else:
        from .data.preference import check_preference_file

        check_preference_file(cfg.data, method=cfg.training.method)


def check_resumable(run: RunDir, extend_to: int | None = None) -> None:
    """A finished run has nothing left to resume: resuming it used to train past its limit ("step 6/5") and
    replace its adapter without a word. Continuing it is an explicit choice of a new, higher step count."""
    if run.state != "finished":
        return
    done = max((r.get("step", 0) for r in run.read_metrics()), default=0)
    if extend_to is not None and extend_to > done:
        return
    how = (f"To train it further, continue it to a higher step count (its adapter is replaced at the end): "
           f"python -m qlora_ui train --resume {run.path.name} --max-steps {done + max(done, 10)}; or raise Max "
           "steps in the form and start a new run.")
    if extend_to is not None:
        raise RunError(f"{run.name} already trained {done} steps; --max-steps {extend_to} adds none. {how}")
    raise RunError(f"{run.name} finished all {done} steps, so there is nothing to resume. {how}")


def resumed_config(run: RunDir, extend_to: int | None = None,
                   overrides: dict[str, Any] | None = None) -> tuple[RunConfig, bool]:
    """The run's config as this resume changes it, and whether it changes it (then it is written once accepted)."""
    cfg = run.config()
    if extend_to is not None and extend_to != cfg.training.max_steps:
        log.info("continuing %s to %d steps", run.name, extend_to)
        cfg = cfg.updated(max_steps=extend_to)
    wanted = {k: coerce(FIELD_INDEX[k][1], v) for k, v in (overrides or {}).items()
              if k in RESUME_OVERRIDES and v is not None}
    changes = {k: v for k, v in wanted.items() if v != cfg.get(k)}
    if changes:
        log.info("resuming %s with %s", run.name, ", ".join(f"{k}={v}" for k, v in changes.items()))
        cfg = cfg.updated(**changes)
    return cfg, extend_to is not None or bool(changes)
