"""Exports in the background (the app): one thread per export, one export at a time per run."""

from __future__ import annotations

import logging
import threading
from typing import Literal

from ..errors import ExportError
from ..runs import RunDir
from .merge import DEFAULT_MERGE_INTO, require_adapter
from .modelfile import check_modelfile_text
from .write import ExportResult, export_run

log = logging.getLogger(__name__)


class ExportJob:
    """One export in a thread: progress, the result or the caught error. The app stays usable meanwhile."""

    def __init__(self, run: RunDir, fmt: str, quant: str, merge_into: str = DEFAULT_MERGE_INTO):
        self.run, self.fmt, self.quant, self.merge_into = run, fmt, quant, merge_into
        self.fraction, self.message = 0.0, "waiting"
        self.state: Literal["running", "finished", "failed"] = "running"
        self.result: ExportResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name=f"export-{run.name}")

    def _progress(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message
        log.info("export %s: %3.0f%% %s", self.run.name, 100 * fraction, message)

    def _work(self) -> None:
        try:
            self.result = export_run(self.run, self.fmt, self.quant, merge_into=self.merge_into,
                                     progress=self._progress)
            self.state = "finished"
        except BaseException as e:  # noqa: BLE001 - shown to the user; the app keeps serving
            self.error = e
            self.state = "failed"
            self.message = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {str(e)[:400]}"
            if not isinstance(e, ExportError):
                log.exception("export of %s failed", self.run.name)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


class ExportJobs:
    """The app's exports, one at a time per run (two exports writing one folder would race)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, ExportJob] = {}

    def start(self, run: RunDir, fmt: str, quant: str) -> ExportJob:
        with self.lock:
            old = self.jobs.get(run.name)
            if old is not None and old.alive:
                raise ExportError(f"{run.name} is already being exported ({old.message}). Wait for it to finish.")
            require_adapter(run)
            if fmt == "gguf":  # refused at the click, not after minutes of converting
                check_modelfile_text(run.config().data.system_prompt or "")
            job = ExportJob(run, fmt, quant)
            self.jobs[run.name] = job
            job.thread.start()
            return job

    def get(self, run_name: str) -> ExportJob | None:
        return self.jobs.get(run_name)
