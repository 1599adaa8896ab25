"""TensorBoard event files inside each run folder (RUN/tensorboard/), so `tensorboard --logdir runs` shows every run.

metrics.jsonl stays the truth the app reads; these events are a copy for the tool people already use. Each logged
row becomes one scalar per tag at its step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUBDIR = "tensorboard"
# metrics.jsonl key -> TensorBoard tag
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s",
              # DPO / ORPO (preference_training.METRIC_KEYS): TRL's own names under train/ and eval/
              "reward_chosen": "train/rewards/chosen", "reward_rejected": "train/rewards/rejected",
              "reward_margin": "train/rewards/margins", "reward_accuracy": "train/rewards/accuracies",
              "nll_loss": "train/nll_loss", "log_odds_ratio": "train/log_odds_ratio"}
EVAL_TAGS = {"eval_loss": "eval/loss", "eval_reward_accuracy": "eval/rewards/accuracies",
             "eval_reward_margin": "eval/rewards/margins"}


class TensorBoardLog:
    """Writes each metrics row as scalars. A missing tensorboard package or a failing write never stops training."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.dir = Path(run_dir) / SUBDIR
        self.resume_step = resume_step
        self.writer = None
        self.broken = False

    def _open(self):
        from torch.utils.tensorboard import SummaryWriter

        # On resume, purge_step drops events after the checkpoint, as metrics.jsonl drops its rows.
        return SummaryWriter(log_dir=str(self.dir), purge_step=self.resume_step, flush_secs=5)

    def write(self, row: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            if self.writer is None:
                self.writer = self._open()
            step = int(row["step"])
            for key, tag in {**TRAIN_TAGS, **EVAL_TAGS}.items():
                v = row.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(tag, float(v), step)
            self.writer.flush()
        except Exception as e:  # noqa: BLE001 - TensorBoard is a copy; metrics.jsonl already holds the row
            self.broken = True
            log.warning("TensorBoard events are not written for this run: %s", e)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read with TensorBoard's own reader: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / SUBDIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
