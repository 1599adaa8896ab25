"""The model ids /v1 answers to: the base models, every run with a saved adapter, and a run's exported GGUFs.

GET /v1/models lists them; a request's 'model' is looked up here (`Models.find`) and answered by the target it
names: a base, a run's latest adapter (the final one, or the newest checkpoint of a run still training), or an
exported GGUF answered by llama.cpp.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat import adapter_choices
from ..config import BUNDLED_MODEL, RunConfig
from ..errors import UserError
from .requests import ApiError

log = logging.getLogger(__name__)


@dataclass
class Target:
    """What a model id answers with: a base (adapter None) or a run's latest saved adapter."""

    id: str
    cfg: RunConfig
    adapter: Path | None
    created: int
    parent: str | None = None
    fingerprint: str = "base"
    gguf: Path | None = None  # answered by llama.cpp from this exported file instead

    def card(self) -> dict:
        card = {"id": self.id, "object": "model", "created": self.created, "owned_by": "qlora-studio"}
        if self.parent:
            card["parent"] = self.parent
        return card


def latest_adapter(run) -> Path | None:
    """The adapter saved last: a finished run's final adapter, or a training run's newest checkpoint (its final
    adapter, if any, is from before a resume)."""
    found = adapter_choices(run.path)
    if not found:
        return None
    return max(found, key=lambda p: (p / "adapter_config.json").stat().st_mtime)


class Models:
    """Model ids -> targets: every run with a saved adapter (id = the run folder's name) and their base models
    (id = the hub id or bundled name, or a local model folder's name), plus the bundled base."""

    def __init__(self, studio, runs: list[str] | None = None):
        self.studio, self.only = studio, (set(runs) if runs else None)
        self.started = int(time.time())
        self._llama_cpp: bool | None = None

    def base_id(self, name: str) -> str:
        name = name.strip()
        return name if name == BUNDLED_MODEL or self.studio.is_hub_id(name) else Path(name).name

    def _runs(self):
        for run in self.studio.runs():
            if self.only is not None and run.name not in self.only:
                continue
            try:
                cfg = run.config()
                adapter = latest_adapter(run)
            except (UserError, OSError, ValueError):
                continue
            if adapter is not None:
                yield run, cfg, adapter

    def _run_target(self, run, cfg, adapter) -> Target:
        state = run.read_status()
        # Which adapter answered: the final one, or checkpoint-N (the step) of a run that may still be training.
        fp = f"{run.name}/{adapter.name}" + (" (still training)" if state.get("state") == "running" else "")
        return Target(run.name, cfg, adapter, int(state.get("created") or run.path.stat().st_mtime),
                      parent=self.base_id(cfg.model.base_model), fingerprint=fp)

    def _gguf_targets(self, run, cfg, parent: str) -> list[Target]:
        """A run's exported GGUFs (id RUN/FILE.gguf), when llama.cpp runs on this machine."""
        from ..export import ggufs

        found = ggufs(run)
        if not found or not self.llama_cpp_ok():
            return []
        return [Target(f"{run.name}/{g.name}", cfg, None, int(g.stat().st_mtime), parent=parent,
                       fingerprint=f"{run.name}/export/{g.name} (llama.cpp)", gguf=g) for g in found]

    def llama_cpp_ok(self) -> bool:
        """The once-per-machine probe (a child evaluates a few tokens), asked once: its answer is kept."""
        if self._llama_cpp is None:
            from ..native.client import probe

            try:
                self._llama_cpp = bool(probe()[0])
            except Exception:  # noqa: BLE001 - no llama.cpp here: the GGUFs are simply not offered
                log.info("api: llama.cpp is not available; exported GGUFs are not listed", exc_info=True)
                self._llama_cpp = False
        return self._llama_cpp

    def all(self) -> list[Target]:
        runs, bases = [], {}
        for run, cfg, adapter in self._runs():
            target = self._run_target(run, cfg, adapter)
            runs.append(target)
            runs += self._gguf_targets(run, cfg, target.parent)
            # A base answers with the quantization of its newest run, so it shares that run's loaded model.
            bases.setdefault(target.parent, Target(target.parent, cfg, None, self.started))
        if self.only is None:
            bases.setdefault(BUNDLED_MODEL, Target(BUNDLED_MODEL, RunConfig().updated(base_model=BUNDLED_MODEL),
                                                   None, self.started))
        return list(bases.values()) + runs

    def find(self, model_id: Any) -> Target:
        if not isinstance(model_id, str) or not model_id.strip():
            raise ApiError(400, "'model' is required: one of the ids GET /v1/models lists.", param="model",
                           code="missing_model")
        for run, cfg, adapter in self._runs():
            if run.name == model_id:
                return self._run_target(run, cfg, adapter)
            if model_id.startswith(f"{run.name}/"):
                for t in self._gguf_targets(run, cfg, self.base_id(cfg.model.base_model)):
                    if t.id == model_id:
                        return t
        for t in self.all():
            if t.id == model_id:
                return t
        raise ApiError(404, f"The model '{model_id[:200]}' does not exist here. GET /v1/models lists the base models "
                       "and every run with a saved adapter.", param="model", code="model_not_found")
