"""What a training run is asked to do and how its token budget becomes steps and batch shapes.

Typed configs (OptimConfig, TrainConfig), each validating its own values when it is made (ValueError
naming `optim.<key>` / `train.<key>`), and `plan_training`, which checks them against the model and the
data-parallel world size before anything is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from moe.data.loader import VAL_WINDOWS
from moe.model.config import ModelConfig
from moe.train.schedule import DECAY_SHAPES, SCHEDULES, DecayShape, ScheduleKind

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
DEVICES = get_args(Device)
PRECISIONS = get_args(Precision)


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
    """wsd only: fraction of the total steps spent in the final decay (the cooldown)."""
    decay_shape: DecayShape = "linear"
    """wsd only: the cooldown's shape, linear or 1-sqrt (arXiv 2405.18392: 1-sqrt ends lower)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("schedule", "decay_shape") and not (
                isinstance(value, (int, float)) and math.isfinite(value)
            ):
                raise ValueError(f"optim.{f.name}={value!r} must be a finite number")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"optim.decay_shape={self.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}"
            )
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        for name in ("beta1", "beta2"):  # AdamW needs them below 1: 1 never forgets, torch refuses it
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be > 0 (it keeps AdamW's update finite)")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 0 (0 disables it)")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"optim.warmup_frac={self.warmup_frac} must be in [0, 1)")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"optim.decay_frac={self.decay_frac} must be in [0, 1]")


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
    eval_early: bool = True
    """Also evaluate at the log-spaced steps 1, 2, 4, ... below eval_every, where the curve falls fastest
    (the savings interpolation and the curve fits need points there)."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation (the same tokens every time and for every sweep point)."""
    final_eval_tokens: int | None = None
    """Validation tokens of one more evaluation after the last step (windows spread over the whole val
    split, capped by its size), logged as val/loss_final with its window-level standard error
    val/loss_final_se: a final loss precise enough to compare single runs, which the frequent cheap
    evaluations of the curve are not. None: none."""
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
    """Write a resumable checkpoint every this many steps and at the last one (when a checkpoint folder is
    given), so a finished run keeps its final weights; 0: never."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a new one is written); those `train`
    was asked to keep for branches (its `keep` argument) are never deleted."""
    branch_from: int | None = None
    """A cooldown branch (docs/branches.md): the token budget of the warmup-stable-decay run with
    otherwise the same config that this run branches from. It starts from that run's checkpoint at
    step steps - decay_steps (its branch point, in that run's constant phase), with that run's warmup,
    and decays over its own last decay_frac. None: an ordinary run."""

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_tokens", "eval_tokens", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "progress_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0 (0: never)")
        if self.final_eval_tokens is not None and self.final_eval_tokens < 1:
            raise ValueError(f"train.final_eval_tokens={self.final_eval_tokens} must be >= 1 or null")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"train.micro_batch_tokens={self.micro_batch_tokens} must be >= 1 or null")
        if self.device not in DEVICES:
            raise ValueError(f"train.device={self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.branch_from is not None and self.branch_from <= self.tokens:
            raise ValueError(
                f"train.tokens={self.tokens} is not below train.branch_from={self.branch_from}: "
                "a branch is shorter than the run it branches from"
            )


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
    val_windows: str = VAL_WINDOWS
    """Where the validation windows sit in the val split (moe.data.loader.VAL_WINDOWS): a checkpoint of
    another placement is refused on resume, so one run's val curve is measured on one set of tokens."""
    branch_step: int = 0
    """A branch (train.branch_from): the step of the parent run it starts from, steps - decay_steps;
    0: not a branch."""


def is_eval_step(train: TrainConfig, step: int, steps: int) -> bool:
    """Whether 1-based `step` of `steps` evaluates: every eval_every, the log-spaced early steps
    (eval_early), and always the last."""
    if step == steps or (train.eval_every and step % train.eval_every == 0):
        return True
    return train.eval_early and step < (train.eval_every or steps) and step & (step - 1) == 0


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
    for key in ("eval_tokens", "final_eval_tokens"):
        if (getattr(train, key) or seq) < seq:
            raise ValueError(f"train.{key}={getattr(train, key)} is smaller than model.seq_len={seq}")
    steps = -(-train.tokens // train.batch_tokens)
    decay = round(optim.decay_frac * steps) if optim.schedule == "wsd" else 0
    warmup, branch_step = max(1, round(optim.warmup_frac * steps)), 0
    if train.branch_from is not None:
        warmup, branch_step = _branch(optim, train, steps, decay)
    return TrainPlan(
        steps=steps,
        batch_size=train.batch_tokens // seq,
        micro_batch_size=micro_tokens // seq,
        accum=train.batch_tokens // (micro_tokens * world_size),
        batch_tokens=train.batch_tokens,
        warmup_steps=warmup,
        decay_steps=decay,
        world_size=world_size,
        branch_step=branch_step,
    )


def _branch(optim: OptimConfig, train: TrainConfig, steps: int, decay: int) -> tuple[int, int]:
    """(warmup steps, branch step) of a cooldown branch: the parent's warmup, and the step where this
    run's decay starts, which must lie after the parent's warmup (and so in its constant phase)."""
    parent_steps = -(-train.branch_from // train.batch_tokens)
    if optim.schedule != "wsd":
        raise ValueError(
            f"train.branch_from={train.branch_from} needs optim.schedule=wsd, not "
            f"{optim.schedule}: a branch decays from the constant phase of a warmup-stable-decay run"
        )
    if parent_steps <= steps:
        raise ValueError(
            f"train.tokens={train.tokens} ({steps} steps) is not below train.branch_from="
            f"{train.branch_from} ({parent_steps} steps of train.batch_tokens={train.batch_tokens})"
        )
    if decay < 1:
        raise ValueError(
            f"optim.decay_frac={optim.decay_frac} gives the branch of train.tokens={train.tokens} "
            f"no decay step ({steps} steps): a branch is a cooldown"
        )
    warmup = max(1, round(optim.warmup_frac * parent_steps))
    if steps - decay < warmup:
        raise ValueError(
            f"optim.decay_frac={optim.decay_frac} puts the branch point of train.tokens={train.tokens} at step "
            f"{steps - decay}, before the warmup of the run it branches from ends (step {warmup}: "
            f"optim.warmup_frac={optim.warmup_frac} of its {parent_steps} steps)"
        )
    return warmup, steps - decay


# Plan fields a resumed run may change: how the global batch is spread over ranks, not what it is.
_LAYOUT_FIELDS = ("world_size", "accum")
# Plan fields added later, at the value that checkpoints written before them had.
_PLAN_DEFAULTS = {"branch_step": 0}
# What a branch shares with the run it branches from (the parent's steps and decay differ).
_BRANCH_FIELDS = ("batch_size", "batch_tokens", "warmup_steps")


def _flat(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def check_resume(
    resume: Mapping[str, Any], plan: TrainPlan, model_cfg: ModelConfig, optim: OptimConfig | None = None
) -> None:
    """ValueError naming the key when a checkpoint was written by a run with a different model,
    optimiser or training plan. The world size and the split into micro-batches per rank may differ
    (resharding). A branch (plan.branch_step) also starts from its parent's checkpoint of that step."""
    step = resume["step"]
    if optim is not None and "optim" in resume:  # checkpoints before branches lack it
        for key, value in asdict(optim).items():
            if resume["optim"].get(key) != value:
                raise ValueError(
                    f"checkpoint of step {step} has optim.{key}={resume['optim'].get(key)!r}, "
                    f"this run optim.{key}={value!r}"
                )
    if "model_config" in resume:  # checkpoints before the sharded format lack it
        have = _flat(resume["model_config"], "model.")
        want = _flat(asdict(model_cfg), "model.")
        for key in sorted(set(have) | set(want)):
            if have.get(key) != want.get(key):
                raise ValueError(
                    f"checkpoint of step {step} has {key}={have.get(key)!r}, this run "
                    f"{key}={want.get(key)!r}: it is a different model"
                )
    saved, now = {**_PLAN_DEFAULTS, **resume["plan"]}, asdict(plan)
    if saved.get("micro_batch_size") != now["micro_batch_size"]:
        raise ValueError(
            f"checkpoint of step {step} was written with {saved.get('micro_batch_size')} sequences per "
            f"micro-batch, this run has {now['micro_batch_size']} (train.micro_batch_tokens): the data "
            "position would not carry over"
        )
    if saved.get("val_windows", "first") != now["val_windows"]:
        raise ValueError(
            f"checkpoint of step {step} was evaluated on the {saved.get('val_windows', 'first')!r} validation "
            f"windows, this run uses {now['val_windows']!r} (moe.data.loader.validation_batches): its val curve "
            "would mix two sets of tokens; train the point again from the start"
        )
    if plan.branch_step and step == plan.branch_step and saved["steps"] != plan.steps:
        _check_parent(saved, plan, step)
        return
    for key in sorted(set(saved) | set(now)):
        if key not in _LAYOUT_FIELDS and saved.get(key) != now.get(key):
            raise ValueError(
                f"checkpoint of step {step} was written for plan {key}={saved.get(key)!r}, "
                f"this run has {key}={now.get(key)!r}"
            )


def _check_parent(saved: Mapping[str, Any], plan: TrainPlan, step: int) -> None:
    """The checkpoint a branch starts from: its parent's, of the branch step, in the parent's constant
    phase, with the same batches and warmup."""
    for key in _BRANCH_FIELDS:
        if saved[key] != getattr(plan, key):
            raise ValueError(
                f"checkpoint of step {step} was written for plan {key}={saved[key]!r}, this branch "
                f"has {key}={getattr(plan, key)!r}: it is not the run this branch branches from"
            )
    if saved["branch_step"] or saved["steps"] <= plan.steps or saved["steps"] - saved["decay_steps"] < step:
        raise ValueError(
            f"checkpoint of step {step} (a run of {saved['steps']} steps decaying over the last "
            f"{saved['decay_steps']}) is not in the constant phase of a longer run: "
            "a branch cannot start from it"
        )
