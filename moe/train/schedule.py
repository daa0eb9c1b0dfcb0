"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD) to a floor.

`lr_at(step, ...)` is a pure function of the 0-based step so a resumed run gets the same schedule.
A WSD run's stable phase is constant, so a cooldown branched from it at any step (docs/branches.md) has
the schedule of a WSD run of the branch's own length: `lr_at` serves both.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

ScheduleKind = Literal["cosine", "wsd", "constant"]
SCHEDULES = get_args(ScheduleKind)
# The WSD cooldown's shape (Hägele et al. 2024, arXiv 2405.18392: 1 - sqrt beats linear at equal length).
DecayShape = Literal["linear", "1-sqrt"]
DECAY_SHAPES = get_args(DecayShape)


def decay_done(progress: float, shape: DecayShape = "linear") -> float:
    """Fraction of the way from the peak down to the floor covered at `progress` in [0, 1] of the
    cooldown. linear: p; 1-sqrt: sqrt(p), so the LR (peak - (peak - floor) * sqrt(p), the "1 - sqrt"
    of the paper when the floor is 0) drops fast at first and flattens towards the floor."""
    if shape == "linear":
        return progress
    if shape == "1-sqrt":
        return math.sqrt(progress)
    raise ValueError(f"optim.decay_shape={shape!r} is not one of {', '.join(DECAY_SHAPES)}")


def lr_at(
    step: int,
    *,
    total_steps: int,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    kind: ScheduleKind = "cosine",
    decay_steps: int = 0,
    decay_shape: DecayShape = "linear",
) -> float:
    """Learning rate for 0-based `step` of `total_steps`.

    warmup: linear from peak_lr/warmup_steps up to peak_lr over the first warmup_steps steps
    (starting above zero so step 0 already trains).
    cosine: half-cosine from peak_lr at the end of warmup to min_lr at the last step.
    wsd: peak_lr until the last decay_steps steps, then down to min_lr in `decay_shape` (linear: Hu et
    al. 2024, MiniCPM; 1-sqrt: Hägele et al. 2024), reaching it at the last step.
    constant: peak_lr after warmup.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    last = max(total_steps - 1, 1)
    if kind == "cosine":
        span = max(last - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak_lr
        progress = min((step - decay_start + 1) / max(decay_steps, 1), 1.0)
        return peak_lr + (min_lr - peak_lr) * decay_done(progress, decay_shape)
    raise ValueError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
