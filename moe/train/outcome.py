"""How a training call ends: the `TrainResult` it returns, or the exceptions that stop it early (a
non-finite loss, a requested stop). The orchestration records each (studies.job.record)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moe.train.evaluation import EvalResult


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    flops: float
    final_train_loss: float
    final_val_loss: float
    wall_s: float
    tokens_per_s: float
    eval_s: float
    """Wall time spent evaluating (included in wall_s)."""
    log_s: float
    """Wall time spent collecting diagnostics and inside the logger (included in wall_s)."""
    final_eval: EvalResult | None = None
    """The evaluation on train.final_eval_tokens after the last step (None: not asked for, or this call
    trained no step)."""
    train_s: float = math.nan
    """Training-only wall seconds over the whole run, resumed parts included (metric `time/train_s`:
    no evaluation, logging, checkpointing or compilation; moe.train.evaluation.TrainClock)."""
    resumed_from: int = 0
    """Step of the checkpoint this call resumed from (0: trained from initialisation)."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf: training stops (a diverged run is a result, not a crash to retry)."""

    def __init__(self, metric: str, step: int, value: float):
        super().__init__(f"{metric} is {value} at step {step}")
        self.metric, self.step, self.value = metric, step, value


class TrainingInterrupted(Exception):
    """`stop_requested` said stop (preemption): a checkpoint of `step` was written, resume from it."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training stopped at step {step} on request; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint
