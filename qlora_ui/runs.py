"""The run folder on disk is the truth: a page reload, an app restart or a crash loses nothing.

runs/<timestamp>-<name>/
  config.yaml      the RunConfig that made this run
  status.json      state (running/stopped/finished/failed/interrupted), message, pid, step   (atomic writes)
  metrics.jsonl    one JSON object per log step, append-only; eval rows carry eval_loss
  train.log        the log of the run
  dataset.json     the dataset it trained on: path, size, sha256, and whether data/ holds a copy
  data/            a copy of the dataset file when it is small (<= 50 MB; uploads are not left in a temp dir)
  checkpoints/     resumable Trainer checkpoints (checkpoint-<step>/)
  adapter/         the PEFT adapter (safetensors) + tokenizer
  tensorboard/     TensorBoard events (a copy of metrics.jsonl's scalars for `tensorboard --logdir runs`)
  export/          merged model folders, .gguf files and their Modelfiles (qlora_ui.export)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, load_yaml, save_yaml
from .errors import RunError

STATES = ("created", "running", "stopped", "finished", "failed", "interrupted")
MIN_FREE_BYTES = 200 * 1024 * 1024


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so a reader or a crash never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip(".-")[:64]
    return s or "run"


def check_runs_dir_writable(runs_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when the runs folder cannot hold a run."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        probe = runs_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError([f"runs_dir '{runs_dir}' is not writable ({e.strerror or e}). Choose another folder "
                           "with --runs-dir or fix its permissions."]) from None
    free = shutil.disk_usage(runs_dir).free
    if free < MIN_FREE_BYTES:
        raise ConfigError([f"runs_dir '{runs_dir}' has only {free / 1e6:.0f} MB free; a run needs at least "
                           f"{MIN_FREE_BYTES / 1e6:.0f} MB for checkpoints and the adapter. Free some space."])


@dataclass
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    # ---- config ----
    def config(self) -> RunConfig:
        return load_yaml(self.config_path)

    def reproducing_config(self) -> RunConfig:
        """The config with a Hub dataset pinned to the commit the run read (dataset.json): the command that
        reproduces the run reads the same rows even after the dataset moves on."""
        cfg = self.config()
        try:
            record = json.loads((self.path / "dataset.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return cfg
        if record.get("kind") == "hub" and record.get("revision"):
            cfg = cfg.updated(data_revision=record["revision"])
        return cfg

    def write_config(self, cfg: RunConfig) -> None:
        tmp = self.path / f".config.yaml.tmp{os.getpid()}"
        save_yaml(cfg, tmp)
        os.replace(tmp, self.config_path)

    # ---- status ----
    def write_status(self, state: str, message: str = "", **extra: Any) -> None:
        assert state in STATES, state
        st = self.read_status(raw=True)
        st.update(extra)
        st.update(state=state, message=message, updated=time.time())
        if state == "running":
            st["pid"] = os.getpid()
            st["pid_started"] = _process_start(os.getpid())
        atomic_write_text(self.status_path, json.dumps(st, indent=1))

    def read_status(self, raw: bool = False) -> dict[str, Any]:
        try:
            st = json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            st = {"state": "created", "message": ""}
        if not raw and st.get("state") == "running" and not _alive(st.get("pid"), st.get("pid_started")):
            # The process that was training is gone (kill -9, power loss): the run can be resumed.
            st["state"] = "interrupted"
            st["message"] = "The process running this training ended without saving a final state. " \
                            "Resume continues from the last checkpoint."
        return st

    @property
    def state(self) -> str:
        return self.read_status()["state"]

    # ---- metrics ----
    def append_metrics(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, allow_nan=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except OSError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, max_step: int) -> None:
        """On resume from checkpoint N, drop rows after N so the curve has no duplicate steps."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= max_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # ---- checkpoints / adapter ----
    @staticmethod
    def checkpoint_step(path: Path | None) -> int:
        """The step a Trainer checkpoint folder (checkpoint-<step>) was saved at; 0 for none or another name."""
        tail = Path(path).name.rpartition("-")[2] if path is not None else ""
        return int(tail) if tail.isdigit() else 0

    def checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        cps = [p for p in self.checkpoints_dir.glob("checkpoint-*")
               if p.is_dir() and p.name.rpartition("-")[2].isdigit() and (p / "trainer_state.json").is_file()]
        return sorted(cps, key=self.checkpoint_step)

    def last_checkpoint(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    def summary(self) -> dict[str, Any]:
        st = self.read_status()
        rows = self.read_metrics()
        losses = [r for r in rows if r.get("loss") is not None]
        evals = [r for r in rows if r.get("eval_loss") is not None]
        try:
            cfg = self.config()
            model, data = cfg.model.base_model, Path(cfg.data.data_path).name
            if cfg.data.data_path.startswith("hf://"):
                data = cfg.data.data_path  # 'name' alone would hide whose dataset it is
        except (OSError, ConfigError):
            model, data = "?", "?"
        return {
            "name": self.name,
            "model": model,
            "data": data,
            "status": st.get("state"),
            "step": max((r.get("step", 0) for r in rows), default=0),
            "max_steps": st.get("max_steps"),
            "final_loss": losses[-1]["loss"] if losses else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(st.get("created", self.path.stat().st_mtime))),
            "adapter": self.has_adapter(),
            "message": st.get("message", ""),
            "path": str(self.path),
        }

    # ---- files the UI hands out ----
    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the run's log (read from its last 16 KB; empty when there is none yet)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 16384))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def adapter_zip(self) -> Path:
        """The adapter as a zip in the temp folder, one per adapter version and reused by every later call: a zip
        per click filled the temp folder (20 clicks, 313 MB). Older versions of this run's zip are removed."""
        import hashlib
        import tempfile

        files = sorted(p for p in self.adapter_dir.rglob("*") if p.is_file())
        stamp = hashlib.sha1(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
        version = stamp.hexdigest()[:12]
        out_dir = Path(tempfile.gettempdir()) / f"qlora-studio-zips-{os.getuid()}"
        out_dir.mkdir(mode=0o700, exist_ok=True)
        target = out_dir / f"{self.name}-adapter-{version}.zip"
        if not target.is_file():
            for old in out_dir.glob(f"{self.name}-adapter-*.zip"):
                old.unlink(missing_ok=True)
            tmp = Path(shutil.make_archive(str(out_dir / f".{self.name}-{version}-{os.getpid()}"), "zip",
                                           root_dir=self.adapter_dir))
            tmp.replace(target)  # write, then rename: a download never gets a half-written zip
        return target

def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - psutil raises several types; a missing start time only weakens the check
        return None


def _alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return False
    import psutil

    try:
        p = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    # A reused pid belongs to another process: compare start times.
    return started is None or abs(p.create_time() - started) < 1.0


def create_run(cfg: RunConfig) -> RunDir:
    runs_dir = Path(cfg.runs_dir)
    check_runs_dir_writable(runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{safe_name(cfg.name)}"
    path = runs_dir / base
    i = 1
    while path.exists():
        i += 1
        path = runs_dir / f"{base}-{i}"
    path.mkdir(parents=True)
    run = RunDir(path)
    run.write_config(cfg)
    run.write_status("created", "", created=time.time())
    return run


COPY_DATA_MAX_BYTES = 50 * 1024 * 1024  # datasets up to this size are copied into the run folder


def copy_dataset_into(run: RunDir, cfg: RunConfig) -> RunConfig:
    """Record the dataset (path, size, sha256) in dataset.json, and keep a small one with the run: uploads live
    in a temp dir that Gradio cleans up. A big one is not copied into every run folder; the record says where it
    lives, and a resume checks that it is still the same file (`check_run_dataset`)."""
    from .data import file_digest, source_for

    source = source_for(cfg.data)
    if source is not None:
        atomic_write_text(run.path / "dataset.json", json.dumps(source_record(cfg), indent=1))
        return cfg
    src = Path(cfg.data.data_path)
    if not src.is_file():
        return cfg
    size = src.stat().st_size
    record = {"path": str(src.resolve()), "name": src.name, "size": size, "sha256": file_digest(src),
              "copied": size <= COPY_DATA_MAX_BYTES}
    if record["copied"]:
        run.data_dir.mkdir(exist_ok=True)
        dst = run.data_dir / safe_name(src.name)
        if src.resolve() != dst.resolve():
            tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        cfg = cfg.updated(data_path=str(dst.resolve()))
        record["copy"] = str(dst.resolve())
        run.write_config(cfg)
    atomic_write_text(run.path / "dataset.json", json.dumps(record, indent=1))
    return cfg


def source_record(cfg: RunConfig) -> dict[str, Any]:
    """dataset.json for a Hub dataset or a dataset folder: what was asked for, the commit (hub) or files' digest
    (folder) it resolved to, and the fingerprint of the rows read. The rows come from the data cache, which the
    preflight check has just filled, so this reads nothing twice."""
    from .data import load_rows, source_for

    source = source_for(cfg.data)
    raw = load_rows(cfg.data.data_path, cfg.data.max_rows, source=source)
    return {"kind": source.kind, "id" if source.kind == "hub" else "path": source.ref, "config": source.config,
            "split": source.split, "requested_revision": source.revision, "revision": raw.meta.get("revision"),
            "fingerprint": raw.meta.get("fingerprint"), "rows": raw.meta.get("rows")}


def check_run_dataset(run: RunDir, data_path: str) -> None:
    """Before a resume: the dataset must be the one the run started on (same sha256), or the run is refused."""
    try:
        record = json.loads((run.path / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # a run from before dataset.json: nothing to compare with
    if record.get("kind") in ("hub", "folder"):
        _check_source(run, record)
        return
    p = Path(data_path)
    where = f"{p}" + ("" if record.get("copied") else " (too big to copy into the run folder, so it is used "
                                                      "where it lies)")
    if not p.is_file():
        raise RunError(f"{run.name} trained on {where}, which no longer exists. Put the same file back there to "
                       "resume, or start a new run.")
    from .data import file_digest

    if p.stat().st_size != record.get("size") or file_digest(p) != record.get("sha256"):
        raise RunError(f"{run.name} cannot resume: its dataset {where} has changed since the run started (it was "
                       f"{record.get('size'):,} bytes, sha256 {str(record.get('sha256'))[:12]}..., now "
                       f"{p.stat().st_size:,} bytes). Resuming on other data would mix two trainings. Restore the "
                       "original file, or start a new run on the new one.")


def _check_source(run: RunDir, record: dict[str, Any]) -> None:
    """A Hub dataset or folder resolves again (the same revision the config names); a new commit or other rows
    refuse the resume, as a changed file does."""
    cfg = run.config()
    now = source_record(cfg)
    what = (f"hf://{record.get('id')}" if record["kind"] == "hub" else str(record.get("path")))
    what += f" [{record.get('split')}]"
    if now.get("revision") != record.get("revision"):
        pin = (f" To train on the data it started with, start a new run with --data-revision {record.get('revision')} "
               "(the Runs tab's command pins it)." if record["kind"] == "hub" else "")
        noun = "commit" if record["kind"] == "hub" else "files (sha256)"
        raise RunError(f"{run.name} cannot resume: its dataset {what} has changed since the run started ({noun} "
                       f"{str(record.get('revision'))[:12]}..., now {str(now.get('revision'))[:12]}...). Resuming on "
                       f"other data would mix two trainings.{pin}")
    if now.get("fingerprint") != record.get("fingerprint"):
        raise RunError(f"{run.name} cannot resume: the rows read from {what} differ from those the run started on "
                       "(another max_rows, or a changed cache). Resuming on other data would mix two trainings; "
                       "start a new run.")


def open_run(path: str | Path, runs_dir: str | Path | None = None) -> RunDir:
    """A run folder by path or by name inside runs_dir, confined to runs_dir when one is given."""
    p = Path(path)
    if runs_dir is not None and not p.is_absolute() and not p.exists():
        p = Path(runs_dir) / p
    p = p.resolve()
    if runs_dir is not None:
        root = Path(runs_dir).resolve()
        if root not in p.parents:
            raise RunError(f"'{path}' is not a run inside {root}.")
    if not (p / "config.yaml").is_file():
        raise RunError(f"'{path}' is not a run folder (no config.yaml). List runs with `python -m qlora_ui runs`.")
    return RunDir(p)


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: r.name, reverse=True)
