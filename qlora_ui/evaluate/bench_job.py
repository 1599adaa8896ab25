"""A benchmark in the background, for the app: one job object owns the thread, the stop event, the progress and
the caught error; the app runs one evaluation at a time and keeps each run's last one for a page reload."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Literal

from ..errors import BusyError, UserError
from .bench_request import EvalRequest, check_request
from .bench_run import BenchmarkStopped, run_benchmarks

log = logging.getLogger(__name__)


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
