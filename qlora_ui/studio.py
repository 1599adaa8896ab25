"""App-wide state shared by every browser session: the one training job and the chat engine.

Created once in app.py and handed to the tab builders (never a module global): Gradio serves many
sessions from one process, and one training at a time per app is a rule of the app, not of a tab.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from .chat import ChatEngine
from .chat_llama import LlamaCppEngine
from .config import ConfigError, RunConfig
from .errors import BusyError, DataError, StudioBusy, UserError
from .jobs import create_job, resume_job
from .launch import LaunchedJob
from .runs import RunDir, list_runs, open_run
from .training import TrainingJob

log = logging.getLogger(__name__)

__all__ = ("Studio", "StudioBusy")  # StudioBusy: the error family's, importable from here as before


class Studio:
    def __init__(self, runs_dir: str | Path = "runs", model_roots: list[str | Path] | None = None,
                 presets_dir: str | Path | None = None, allow_remote_code: bool = False,
                 allowed_models: list[str] | None = None, chat_max_new_tokens: int | None = None,
                 chat_max_waiting: int = 32, chat_max_batch: int = 16, data_roots: list[str | Path] | None = None,
                 allowed_datasets: list[str] | None = None, shared: bool = True):
        from .config import PRESETS_DIR

        # Whether strangers can reach this app (--share or a non-loopback --host): then server paths outside the
        # app's folder are shown by their last part only. Hiding is the default, so a caller that does not say
        # (an embedding, a test) never reveals the host's layout; app.py says False on loopback.
        self.shared = shared

        self.presets_dir = Path(presets_dir) if presets_dir else PRESETS_DIR
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        # Folders a user may type model paths from; a typed path outside these is refused.
        self.model_roots = [Path(p).resolve() for p in (model_roots or [])]
        # Folders whose dataset files the Model & Data tab lists (--data-root): big files used in place, no upload.
        self.data_roots = [Path(p).resolve() for p in (data_roots or [])]
        # Running a model's own Python (auto_map) or unpickling its weights is the operator's decision at launch
        # (--allow-remote-code), never a form value: anyone on a shared link can post any form value.
        self.allow_remote_code = allow_remote_code
        # Hub ids a request may name (fnmatch patterns); None = any.
        self.allowed_models = list(allowed_models) if allowed_models else None
        # Hub dataset ids a request may download (fnmatch patterns); None = any, [] = none (app.py: none when shared).
        self.allowed_datasets = list(allowed_datasets) if allowed_datasets is not None else None
        self._lock = threading.Lock()
        self.job: TrainingJob | None = None
        self.chat = ChatEngine()
        # Shared-link limits: replies no longer than this (None = the form's own maximum), and at most this many
        # chat requests waiting (more are refused with a message) or decoded together.
        self.chat_max_new_tokens = chat_max_new_tokens
        self.chat.server.max_waiting, self.chat.server.max_batch = chat_max_waiting, chat_max_batch
        self.gguf_chat = LlamaCppEngine()  # the llama.cpp backend: chat from a run's exported GGUF
        from .evaluate.arena import Arena

        self.arena = Arena(self.runs_dir)  # battles and votes under runs/arena/, one vote per battle per session
        from .evaluate.bench_job import BenchmarkJobs

        self.benchmarks = BenchmarkJobs()  # lm-eval runs in the background, one at a time per app
        self._tokenizers: dict[str, object] = {}
        # Data inspections per user (or browser session): one running and one waiting each (see `inspection`).
        self._inspect = threading.Condition()
        self._inspecting: set[str] = set()
        self._inspect_waiting: set[str] = set()
        self._reattach()

    def _reattach(self) -> None:
        """A multi-process run outlives the app that launched it (its processes have their own session): an app
        started on the same runs folder follows it again, with Stop, instead of showing it as someone else's."""
        for run in self.runs():
            st = run.read_status()
            if st.get("state") == "running" and (st.get("world_size") or 1) > 1:
                try:
                    self.job = LaunchedJob.attach(run).start()
                    log.info("following %s, still training in %d processes", run.name, st["world_size"])
                except (UserError, OSError) as e:
                    log.warning("could not follow %s: %s", run.name, e)
                return

    # ---- training ----
    def busy(self) -> bool:
        return self.job is not None and self.job.alive

    def start(self, cfg: RunConfig) -> TrainingJob:
        with self._lock:
            if self.busy():
                raise StudioBusy(f"A training run is already in progress ({self.job.run.name}, step "
                                 f"{self.job.step}/{self.job.max_steps or '?'}). Stop it first: one run at a time.")
            self.check_model(cfg.model)
            self.check_data(cfg.data)
            self.check_recipe(cfg.training.accelerate_config)
            cfg = cfg.updated(runs_dir=str(self.runs_dir))
            if cfg.lora.init_adapter:
                # A request names one of this app's runs, confined to runs_dir like Resume (never a path of its own).
                cfg = cfg.updated(init_adapter=str(self.open(cfg.lora.init_adapter).path))
            # processes > 1: launched through accelerate and followed from the run folder, same job surface.
            self.job = create_job(cfg).start()
            return self.job

    def resume(self, run_name: str, overrides: dict | None = None) -> TrainingJob:
        with self._lock:
            if self.busy():
                raise StudioBusy("A training run is already in progress. Stop it before resuming another.")
            run = self.open(run_name)
            if run.state == "running":
                raise StudioBusy(f"{run.name} is running in another process.")
            self.check_model(run.config().model)
            self.job = resume_job(run, overrides=overrides).start()
            return self.job

    @staticmethod
    def check_recipe(name: str) -> None:
        """A request names a shipped accelerate recipe or none; a file path is for the command line only."""
        from .accelerate_configs import list_accelerate_configs

        if name and name not in list_accelerate_configs():
            raise ConfigError([f"accelerate_config '{name}': pick one of {', '.join(list_accelerate_configs())}. "
                               "Your own accelerate config file can be used from the command line."])

    def cap_new_tokens(self, n) -> int:
        n = int(n or 1)
        return min(n, self.chat_max_new_tokens) if self.chat_max_new_tokens else n

    def chat_threads(self) -> int | None:
        """Chat beside a running training gets one CPU thread; on a GPU, or with no training, no cap."""
        import torch

        return 1 if self.busy() and not torch.cuda.is_available() else None

    def stop(self) -> bool:
        job = self.job
        if job is None or not job.alive:
            return False
        job.stop()
        return True

    # ---- runs ----
    def open(self, run_name: str) -> RunDir:
        """A run by name, confined to runs_dir (no ../ escapes from a typed or posted name)."""
        return open_run(Path(run_name).name, self.runs_dir)

    def runs(self) -> list[RunDir]:
        return list_runs(self.runs_dir)

    @contextlib.contextmanager
    def inspection(self, who: str | None, wait_s: float = 300.0) -> Iterator[None]:
        """One data inspection at a time per user (`who`: the login, else the browser session; None: unlimited).
        A second one waits for the first: the page itself sends two close together (an upload, then a changed
        setting) and the later one must show. A third is refused at once, so one client sending many cannot
        fill every inspection lane with its own requests while other users wait behind them."""
        if who is None:
            yield
            return
        with self._inspect:
            if who in self._inspecting:
                if who in self._inspect_waiting:
                    raise BusyError("Busy: your previous data inspections are still running (one at a time per "
                                    "user, one more may wait). This one was not started; wait for them to "
                                    "finish, then change a setting or upload again.")
                self._inspect_waiting.add(who)
                try:
                    if not self._inspect.wait_for(lambda: who not in self._inspecting, wait_s):
                        raise BusyError("Busy: your previous data inspection is still running after "
                                        f"{wait_s:.0f} s. Wait for it to finish, then try again.")
                finally:
                    self._inspect_waiting.discard(who)
            self._inspecting.add(who)
        try:
            yield
        finally:
            with self._inspect:
                self._inspecting.discard(who)
                self._inspect.notify_all()

    def files_in_use(self) -> set[str]:
        """Dataset files that must outlive the upload purge (--upload-max-age): the running job's, and those runs
        use where they lie (too big to copy into the run folder; dataset.json says so): a resume reads them again.
        Resolved paths."""
        import json

        keep = set()
        job = self.job
        if job is not None and job.alive and job.cfg.data.data_path:
            keep.add(str(Path(job.cfg.data.data_path).resolve()))
        for record in self.runs_dir.glob("*/dataset.json"):
            try:
                d = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and d.get("path") and not d.get("copied"):
                keep.add(str(Path(d["path"]).resolve()))
        return keep

    def in_use(self, run: RunDir) -> bool:
        return self.busy() and self.job.run.path.resolve() == run.path.resolve()

    def delete(self, run_name: str) -> None:
        import shutil

        run = self.open(run_name)
        if self.in_use(run) or run.state == "running":
            raise StudioBusy(f"{run.name} is training right now; stop it before deleting it.")
        shutil.rmtree(run.path)

    # ---- models ----
    def check_model(self, m) -> None:
        """Everything a request may not decide about a model: remote code, pickles, paths, hub ids."""
        problems = []
        if not self.allow_remote_code:
            if m.trust_remote_code:
                problems.append("trust_remote_code: this app was started without --allow-remote-code, so a request "
                                "cannot make it run Python code shipped with a model. Turn the option off; whoever "
                                "runs the app can restart it with --allow-remote-code for models they trust.")
            if m.allow_pickle:
                problems.append("allow_pickle: this app was started without --allow-remote-code, so a request cannot "
                                "make it unpickle model weights (a pickle can run code). Turn the option off and use "
                                "a model with .safetensors weights.")
        if problems:
            raise ConfigError(problems)
        self.check_model_path(m.base_model)

    def is_hub_id(self, name: str) -> bool:
        from .config import BUNDLED_MODEL

        # The same rule as modeling.resolve_model_path: 'org/name' that is not a local path.
        return (name != BUNDLED_MODEL and name.count("/") == 1 and not name.startswith((".", "/", "~"))
                and not Path(name).expanduser().exists())

    def check_model_path(self, name: str) -> None:
        """Typed local paths must sit under an allowed root (the app may be shared over a public link)."""
        from fnmatch import fnmatchcase

        from .config import BUNDLED_MODEL

        # The name as the loader will read it (modeling.resolve_model_path strips it): checking the raw text let
        # ' ~/x' pass as a hub id and then load ~/x.
        name = name.strip()
        if name == BUNDLED_MODEL:
            return
        if self.is_hub_id(name):
            if self.allowed_models is not None and not any(fnmatchcase(name, pat) for pat in self.allowed_models):
                raise ConfigError([f"base model '{name}' is not one of the hub models this app may load "
                                   f"({', '.join(self.allowed_models)}). Whoever runs the app sets them with "
                                   "--allowed-models."])
            return
        p = Path(name).expanduser().resolve()
        if self.model_roots and not any(p == r or r in p.parents for r in self.model_roots):
            raise ConfigError([f"model path '{name}' is outside the folders this app may read "
                               f"({', '.join(self.shown_path(r) for r in self.model_roots)}). Put the model in one "
                               "of them, or start the app with --model-root."])

    def shown_path(self, p: Path) -> str:
        """A server path as users see it: relative to the app's folder when inside it (runnable from there), else
        absolute on a local app (its user sits at this machine: a cut path can be neither copied nor opened), else
        its last part only (absolute paths tell a stranger on a shared link how the host is laid out)."""
        full = Path(p).resolve()
        try:
            return str(full.relative_to(Path.cwd()))
        except ValueError:
            return f".../{full.name}" if self.shared else str(full)

    def tokenizer_for(self, base_model: str):
        """Tokenizers are small and slow to build: cache one per base model for the data preview."""
        from .config import ModelConfig
        from .modeling import load_tokenizer, resolve_model_path

        if base_model not in self._tokenizers:
            m = ModelConfig(base_model=base_model)
            self._tokenizers[base_model] = load_tokenizer(resolve_model_path(m), m)
        return self._tokenizers[base_model]

    def data_files(self, limit: int = 500) -> list[tuple[str, str]]:
        """(shown name, path) of the dataset files under the --data-root folders (three levels deep at most)."""
        from .data import EXTENSIONS

        out = []
        for root in self.data_roots:
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root)
                if len(rel.parts) <= 3 and p.suffix.lower() in EXTENSIONS and p.is_file():
                    out.append((f"{root.name}/{rel}", str(p)))
                    if len(out) >= limit:
                        return out
        return out

    def check_data_file(self, path: str) -> Path:
        """A server-side dataset path a request names: only inside a --data-root folder."""
        p = Path(path).expanduser().resolve()
        if not any(r in p.parents for r in self.data_roots):
            raise DataError(f"'{Path(path).name}' is not in a folder this app serves datasets from (--data-root). "
                            "Upload the file instead.")
        return p

    def check_data(self, data) -> None:
        """What a request may name as a dataset beyond an upload: a Hub id matching --allowed-datasets, a dataset
        folder under --data-root (a typed path reads the server's disk, so it is confined like a model path)."""
        from fnmatch import fnmatchcase

        from .data import hub_repo

        repo = hub_repo(data.data_path)
        if repo is not None:
            if self.allowed_datasets is not None and not any(fnmatchcase(repo, p) for p in self.allowed_datasets):
                allowed = ", ".join(self.allowed_datasets) or "none on this shared app"
                raise DataError(f"Hub dataset '{repo}' is not one this app may download (allowed: {allowed}). "
                                "Upload the data as a file instead; whoever runs the app sets the ids with "
                                "--allowed-datasets.")
            return
        if data.data_path and Path(data.data_path).expanduser().is_dir():
            self.check_data_file(data.data_path)

    def local_models(self) -> list[str]:
        out = []
        for root in self.model_roots:
            if (root / "config.json").is_file():
                out.append(str(root))
            elif root.is_dir():
                out += sorted(str(p) for p in root.iterdir() if (p / "config.json").is_file())
        return out
