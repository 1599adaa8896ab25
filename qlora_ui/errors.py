"""One family for "a problem the user can fix": caught once in the UI (a gr.Error toast) and once in the CLI
(one message, exit 2). Every message names the problem and the fix; anything else is a bug and keeps its traceback.

A leaf module (imports nothing of the project), so every layer can raise these without an import cycle.

Not in the family, on purpose: `training.TrainingDiverged` (a run that failed while training: it ends in the run's
status with a hint, like running out of memory, not as a refused request) and `native.client.BackendStopped`
(llama.cpp's child process ended: the chat answers with transformers instead).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, with what to do about it."""


class ConfigError(UserError, ValueError):
    """Every problem found in a config, reported at once: one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems))


class DataError(UserError, ValueError):
    """A dataset that cannot be used, as one paragraph: what is wrong and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ModelError(UserError, ValueError):
    """A model that cannot be loaded, with what to do about it."""


class LoftQError(ModelError):
    """LoftQ cannot start this model's adapter (no 16-bit safetensors weights, no 4-bit layers): pick another
    lora_init or model."""


class ShapeError(ModelError):
    """A model name the memory planner cannot turn into a shape, with the names it knows."""


class RunError(UserError, ValueError):
    """A run folder that cannot be used for what was asked: not a run, nothing left to resume, its data changed."""


class ChatError(UserError, ValueError):
    """A chat request that cannot be answered as sent: a message too long, no model loaded for the backend."""


class ExportError(UserError, ValueError):
    """An export that cannot be done, with what to do about it."""


class BuildError(UserError, RuntimeError):
    """The llama.cpp build or its check failed, with what to do about it (a missing compiler or tool)."""


class BusyError(UserError, RuntimeError):
    """Something is already using what was asked for; try again later (a training running, a full chat queue)."""


class StudioBusy(BusyError):
    """One training at a time per app."""


class ChatBusy(BusyError):
    """A chat request refused right away: the queue is full, or this session already has one running."""


class ArenaError(UserError, ValueError):
    """An arena request that cannot be done: a malformed votes file (its line named), a battle already voted on in
    this session, too few contestants, a judge endpoint that cannot be reached."""
