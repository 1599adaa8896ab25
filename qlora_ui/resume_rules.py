"""Which runs can be resumed, and how a run that ran out of memory is retried: rules the Train tab, the Runs tab
and scripts share (no UI here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .runs import RunDir
    from .studio import Studio

RESUMABLE = ("stopped", "interrupted", "failed")


def resumable_runs(studio: Studio) -> list[str]:
    """Runs that ended before their last step. A finished run is complete: resuming it trained past its
    limit. A run with no checkpoint is offered too; resuming it starts over, and says so."""
    return [r.name for r in studio.runs() if r.state in RESUMABLE and not studio.in_use(r)]


def ran_out_of_memory(run: RunDir) -> bool:
    st = run.read_status()
    return st.get("state") == "failed" and "out of memory" in (st.get("message") or "").lower()


def smaller_batch(training: TrainConfig) -> dict[str, int]:
    """Half the per-device batch, twice the accumulation: the same global batch in less memory."""
    if training.batch_size <= 1:
        raise UserError("This run already trains with batch_size 1. To use less memory, turn on "
                        "gradient_checkpointing or lower max_length in a new run.")
    half = training.batch_size // 2
    return {"batch_size": half, "grad_accum": training.grad_accum * training.batch_size // half}
