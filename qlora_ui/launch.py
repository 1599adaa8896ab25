"""Multi-process runs through accelerate, followed from the run folder.

With `processes` > 1 the training does not run in this process. jobs.create_job prepares the run folder exactly
like for a thread run (model and data checked first, dataset recorded); `LaunchedJob` then starts

    accelerate launch --num_processes N [--config_file presets/accelerate/NAME.yaml | --multi_gpu]
                      -m qlora_ui.launch RUN_DIR [--resume]

(DDP over gloo on CPUs, NCCL on GPUs; FSDP or DeepSpeed when a recipe is named) and follows the run the way the
UI follows any run: from metrics.jsonl and status.json, which rank 0 alone writes. The Trainer already knows DDP,
FSDP and DeepSpeed under `accelerate launch`; what is ours is only the run folder around it:

- Stop writes `stop.request` in the run folder. Every rank looks for it, and the ranks agree through one
  all-reduce per step to end at the same step (TrainingJob.should_stop), save a checkpoint and the adapter.
- A rank that dies (an exception, an out-of-memory kill, kill -9) ends the launch: torchrun stops the other
  ranks and reports the first failure, which becomes the run's failed message. The run stays resumable.
- The launcher's own output (every rank's warnings, torchrun's failure report) goes to launch.log.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .runs import RunDir
from .training import RankView, TrainingJob, failure_hint

log = logging.getLogger(__name__)

STOP_FILE = "stop.request"
LAUNCH_LOG = "launch.log"
RANK_ERROR = "QLORA_RANK_ERROR"  # the line a failing rank prints, found again in launch.log
POLL_S = 0.5


def global_batch(batch_size: int, grad_accum: int, processes: int) -> int:
    return batch_size * grad_accum * max(1, processes)


def batch_sentence(tr) -> str:
    """How many examples one optimizer step sees, in words (the UI and the CLI say it the same way)."""
    n = max(1, tr.processes)
    where = f" x {n} processes" if n > 1 else ""
    return (f"global batch {global_batch(tr.batch_size, tr.grad_accum, n)} = batch_size {tr.batch_size} x "
            f"grad_accum {tr.grad_accum}{where}")


def _free_port() -> int:
    # Two launches at once (two apps, a test beside a run) must not fight over torchrun's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(run_path: Path, processes: int, accelerate_config: str = "", resume: bool = False) -> list[str]:
    """The `accelerate launch` command line for one run (what the CLI would type)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(_free_port())]
    if accelerate_config:
        from .accelerate_configs import accelerate_config_path

        cmd += ["--config_file", str(accelerate_config_path(accelerate_config))]
    else:
        # Plain data parallel. accelerate's --cpu would start one process; --multi_gpu runs torchrun, which on a
        # machine without GPUs gives gloo DDP over CPU processes (NCCL where there are GPUs).
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "qlora_ui.launch", str(run_path)]
    if resume:
        cmd.append("--resume")
    return cmd


def launch_env(processes: int) -> dict[str, str]:
    env = dict(os.environ)
    # Each process gets its share of the cores: two processes with every core each are 15-30x slower on 2 cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, processes))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def failure_from_log(text: str) -> tuple[int | None, str]:
    """(rank, message) of the first failure in a launch log: our own rank line, else torchrun's root cause."""
    ours = re.findall(rf"{RANK_ERROR} rank (\d+): (.*)", text)
    root = text.rsplit("Root Cause", 1)[-1] if "Root Cause" in text else ""
    m_rank = re.search(r"rank\s*:\s*(\d+)", root)
    m_code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    m_trace = re.search(r"traceback\s*:\s*(.+)", root)
    root_rank = int(m_rank.group(1)) if m_rank else None
    for rank, msg in ours:
        if root_rank is None or int(rank) == root_rank:
            return int(rank), msg.strip()
    if root_rank is not None:
        code = int(m_code.group(1)) if m_code else None
        how = (f"ended by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0
               and -code in signal.Signals._value2member_map_ else f"exited with code {code}")
        trace = m_trace.group(1).strip() if m_trace else ""
        if trace.startswith(("To enable traceback", "Signal ")):
            trace = ""
        return root_rank, f"process {root_rank} {how}" + (f": {trace}" if trace else "")
    return None, ""


class LaunchedJob(TrainingJob):
    """A run of `processes` > 1, launched through accelerate and followed from its folder. Same surface as a
    thread run (start/stop/wait/alive/progress, metrics and status events) so the UI and CLI treat both alike."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._stop_written = False
        self.attached = False

    @classmethod
    def attach(cls, run: RunDir) -> LaunchedJob:
        """Follow a multi-process run that another process launched (an app restarted while its run went on):
        the same live view and the same Stop, through the run folder alone."""
        job = cls(run.config().validate(need_data=True), run)
        job.attached = True
        return job

    @property
    def stop_path(self) -> Path:
        return self.run.path / STOP_FILE

    def stop(self) -> None:
        self.stop_event.set()
        self._request_stop()

    def _request_stop(self) -> None:
        if not self._stop_written:
            self.stop_path.write_text(str(time.time()))
            self._stop_written = True

    @property
    def alive(self) -> bool:
        return (self.thread is not None and self.thread.is_alive()) or (
            self.proc is not None and self.proc.poll() is None)

    def run_blocking(self) -> str:
        if self.attached:
            return self._follow_attached()
        tr = self.cfg.training
        self.stop_path.unlink(missing_ok=True)
        cmd = launch_command(self.run.path, tr.processes, tr.accelerate_config, self.resume)
        self.state, self.phase = "running", f"launching {tr.processes} processes"
        self.run.write_status("running", self.phase, world_size=tr.processes, started=time.time())
        self._emit("status", {"state": "running", "message": f"{self.phase} ({batch_sentence(tr)})"})
        with open(self.run.path / LAUNCH_LOG, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            # Its own session: a Ctrl-C in the terminal reaches this follower, which stops the run cleanly.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=launch_env(tr.processes), start_new_session=True)
        interrupts = 0
        last_status: dict[str, Any] = {}
        while True:
            try:
                done = self.proc.poll() is not None
                if self.stop_event.is_set():
                    self._request_stop()
                last_status = self._follow(last_status)
                if done:
                    break
                time.sleep(POLL_S)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    print("stopping every process at the next step (Ctrl-C again to kill them)", file=sys.stderr)
                    self.stop()
                else:
                    self.kill()
        self.returncode = self.proc.returncode
        self._finish()
        return self.state

    def _follow_attached(self) -> str:
        self.state = "running"
        last: dict[str, Any] = {}
        while self.run.read_status()["state"] == "running":  # rank 0 alive and not done
            if self.stop_event.is_set():
                self._request_stop()
            last = self._follow(last)
            time.sleep(POLL_S)
        self._follow(last)
        st = self.run.read_status()
        self.stop_path.unlink(missing_ok=True)
        self.state = st["state"] if st["state"] in ("finished", "stopped") else "failed"
        self.error_message = st.get("message", "") if self.state == "failed" else ""
        self._emit("status", {"state": self.state, "message": st.get("message", "")})
        return self.state

    def kill(self) -> None:
        """End every process at once (no checkpoint): the launcher's whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _follow(self, last_status: dict[str, Any]) -> dict[str, Any]:
        rows = self.run.read_metrics()
        if len(rows) < len(self.metrics):  # a resume truncated the curve to its checkpoint
            self.metrics = []
        for row in rows[len(self.metrics):]:
            self.metrics.append(row)
            self.step = row.get("step", self.step)
            self.max_steps = row.get("max_steps") or self.max_steps
            self._emit("metrics", row)
        st = self.run.read_status(raw=True)
        self.max_steps = st.get("max_steps") or self.max_steps
        if st.get("message") != last_status.get("message") and st.get("state") == "running":
            self.phase = st.get("message") or self.phase
            self._emit("status", {"state": "running", "message": self.phase})
        return st

    def _finish(self) -> None:
        st = self.run.read_status(raw=True)
        self.stop_path.unlink(missing_ok=True)
        self.step = max(self.step, int(st.get("step") or 0))
        if self.returncode == 0 and st.get("state") in ("finished", "stopped"):
            self.state = st["state"]
            self._emit("status", {"state": self.state, "message": st.get("message", "")})
            return
        try:
            text = (self.run.path / LAUNCH_LOG).read_text(encoding="utf-8", errors="replace")[-200_000:]
        except OSError:
            text = ""
        rank, why = failure_from_log(text)
        if rank not in (None, 0) or st.get("state") != "failed":
            # Rank 0 either did not live to say why, or its message is the echo of another rank's death.
            why = why or f"the launcher exited with code {self.returncode}"
            if rank is None:
                why += f" (see {LAUNCH_LOG} in the run folder)"
            if "out of memory" in why.lower():
                hint = failure_hint(MemoryError())
            elif "SIGKILL" in why:
                hint = ("SIGKILL comes from kill -9 or from the system running out of memory; resume continues "
                        "from the last checkpoint (with a smaller batch_size if memory was short).")
            else:
                hint = "Resume continues from the last checkpoint."
            self.error_message = f"{why}\n{hint}"
            self.run.write_status("failed", self.error_message, step=self.step)
        else:
            self.error_message = st.get("message", "")
        self.state = "failed"
        log.error("multi-process run failed: %s", self.error_message)
        self._emit("status", {"state": "failed", "message": self.error_message})


# ---------------------------------------------------------------------------------------------------
# One rank: `accelerate launch ... -m qlora_ui.launch RUN_DIR [--resume]`
# ---------------------------------------------------------------------------------------------------

def _watch_stop(job: TrainingJob, path: Path, done: threading.Event) -> None:
    while not done.wait(POLL_S):
        if path.exists():
            job.stop_event.set()
            return


def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_ui.launch",
                                 description="One process of a multi-process run (started by accelerate launch).")
    ap.add_argument("run", help="Run folder prepared by the launcher.")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    for h in logging.getLogger().handlers:  # rank 0's progress goes to train.log; launch.log gets warnings only
        h.setLevel(logging.WARNING)
    run = RunDir(Path(a.run).resolve())
    # The launcher checked the model and the data and made the run folder; only rank 0 writes to it.
    cfg = run.config().validate(need_data=True)
    job = TrainingJob(cfg, run if rank == 0 else RankView(run.path), resume=a.resume, rank=rank)
    done = threading.Event()
    threading.Thread(target=_watch_stop, args=(job, job.run.path / STOP_FILE, done), daemon=True).start()
    try:
        state = job.run_blocking()
    finally:
        done.set()
    if state == "failed":
        first = (job.error_message or "failed").splitlines()[0]
        print(f"{RANK_ERROR} rank {rank}: {first}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
