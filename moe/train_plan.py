"""What a training run is asked to do and how its token budget becomes steps and batch shapes.

Typed configs (OptimConfig, TrainConfig) and `plan_training`, which validates them against the model
and the data-parallel world size before anything is built. `moe.train` re-exports all of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe.config import ModelConfig
from moe.schedule import SCHEDULES, ScheduleKind

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of lr (paper 1: 2e-4 -> 2e-5, i.e. 0.1)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (ndim >= 2); norms and biases are not decayed."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: ScheduleKind = "cosine"
    """cosine (to the floor), wsd (warmup-stable-decay) or constant."""
    warmup_frac: float = 0.02
    """Linear warmup length as a fraction of the total steps (at least one step)."""
    decay_frac: float = 0.2
    """wsd only: fraction of the total steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""


@dataclass
class TrainConfig:
    tokens: int = 2_000_000
    """Training budget in tokens; steps = ceil(tokens / batch_tokens), so at least `tokens` are seen."""
    batch_tokens: int = 8192
    """Tokens per optimiser step (sequences per step = batch_tokens // model.seq_len)."""
    micro_batch_tokens: int | None = None
    """Tokens per forward/backward on one rank; batch_tokens / (micro_batch_tokens * ranks) micro-batches are
    accumulated per step. None: one pass per rank (batch_tokens / ranks)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    eval_every: int = 100
    """Evaluate on the fixed validation set every this many steps (and always at the end); 0: end only."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation (the same tokens every time and for every sweep point)."""
    log_every: int = 10
    """Log train metrics and router diagnostics every this many steps."""
    progress_every: int = 25
    """Print a progress line every this many steps; 0 disables."""
    device: Device = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: Precision = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (when a checkpoint folder is given); 0: never."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a new one is written)."""


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    """Optimiser steps."""
    batch_size: int
    """Sequences per optimiser step."""
    micro_batch_size: int
    """Sequences per forward/backward."""
    accum: int
    """Micro-batches per step on each rank."""
    batch_tokens: int
    """Tokens per step actually used (batch_size * seq_len)."""
    warmup_steps: int
    """Warmup steps of the schedule."""
    decay_steps: int
    """wsd decay steps (0 for other schedules)."""
    world_size: int = 1
    """Data-parallel ranks sharing each step."""


def plan_training(
    model_cfg: ModelConfig, optim: OptimConfig, train: TrainConfig, world_size: int = 1
) -> TrainPlan:
    """Derive steps and batch shapes from the token budget; ValueError naming the keys if impossible."""
    seq = model_cfg.seq_len
    if train.batch_tokens < seq or train.batch_tokens % seq:
        raise ValueError(
            f"train.batch_tokens={train.batch_tokens} must be a positive multiple of model.seq_len={seq}"
        )
    if world_size < 1 or train.batch_tokens % (seq * world_size):
        raise ValueError(
            f"train.batch_tokens={train.batch_tokens} must split into whole sequences of model.seq_len={seq} "
            f"over {world_size} data-parallel ranks"
        )
    micro_tokens = train.micro_batch_tokens or train.batch_tokens // world_size
    if micro_tokens <= 0 or micro_tokens % seq or train.batch_tokens % (micro_tokens * world_size):
        raise ValueError(
            f"train.micro_batch_tokens={train.micro_batch_tokens} must be a multiple of model.seq_len={seq} "
            f"that divides train.batch_tokens={train.batch_tokens}"
            + (f" / {world_size} ranks" if world_size > 1 else "")
        )
    if train.tokens < train.batch_tokens:
        raise ValueError(
            f"train.tokens={train.tokens} is smaller than one batch (train.batch_tokens={train.batch_tokens})"
        )
    for key in ("eval_every", "log_every", "progress_every", "checkpoint_every"):
        if getattr(train, key) < 0:
            raise ValueError(f"train.{key}={getattr(train, key)} must be >= 0")
    if train.log_every == 0:
        raise ValueError("train.log_every=0 must be >= 1")
    if train.keep_last < 1:
        raise ValueError(f"train.keep_last={train.keep_last} must be >= 1")
    if train.eval_tokens < seq:
        raise ValueError(f"train.eval_tokens={train.eval_tokens} is smaller than model.seq_len={seq}")
    if train.device not in DEVICES or train.precision not in PRECISIONS:
        raise ValueError(f"train.device={train.device!r} / train.precision={train.precision!r} unknown")
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not one of {SCHEDULES}")
    if optim.lr <= 0 or not 0 <= optim.min_lr_ratio <= 1:
        raise ValueError(
            f"optim.lr={optim.lr} must be > 0 and optim.min_lr_ratio={optim.min_lr_ratio} in [0, 1]"
        )
    if not 0 <= optim.warmup_frac < 1 or not 0 <= optim.decay_frac <= 1:
        raise ValueError(
            f"optim.warmup_frac={optim.warmup_frac} must be in [0, 1) and optim.decay_frac={optim.decay_frac} in [0, 1]"
        )
    steps = -(-train.tokens // train.batch_tokens)
    decay = round(optim.decay_frac * steps) if optim.schedule == "wsd" else 0
    return TrainPlan(
        steps=steps,
        batch_size=train.batch_tokens // seq,
        micro_batch_size=micro_tokens // seq,
        accum=train.batch_tokens // (micro_tokens * world_size),
        batch_tokens=train.batch_tokens,
        warmup_steps=max(1, round(optim.warmup_frac * steps)),
        decay_steps=decay,
        world_size=world_size,
    )
