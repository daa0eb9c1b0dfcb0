"""The training loop: one function that reads top to bottom.

build -> resume -> loop {lr, forward/backward (+ aux losses), clip, step, balancing update, non-finite
check, log, eval, checkpoint} -> final eval.
Side effects leave through a `Logger` (anything with `log_metrics(metrics, step)`); the MLflow logger
lives in `studies/`, so this module imports no orchestration code. Metric names follow docs/outputs.md.
Resume is exact: a checkpoint (moe.checkpoint) holds model, optimiser, data position and RNG states, and
everything else (lr, metrics, eval points) is a function of the step, so a resumed run logs bit for bit
what an uninterrupted one would (CPU fp32; throughput `tokens_per_s` is wall-clock and differs).
Shape suffixes: B = sequences in a micro-batch, S = sequence length.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from moe.accounting import flops_per_token
from moe.checkpoint import capture_rng, restore_rng, save_checkpoint
from moe.config import ModelConfig
from moe.data import PreparedData, TokenLoader, validation_batches
from moe.model import Transformer
from moe.schedule import SCHEDULES, ScheduleKind, lr_at

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
    """Tokens per forward/backward; smaller than batch_tokens means gradient accumulation. None: one pass."""
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
    """Micro-batches per step."""
    batch_tokens: int
    """Tokens per step actually used (batch_size * seq_len)."""
    warmup_steps: int
    """Warmup steps of the schedule."""
    decay_steps: int
    """wsd decay steps (0 for other schedules)."""


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


class Logger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


def plan_training(model_cfg: ModelConfig, optim: OptimConfig, train: TrainConfig) -> TrainPlan:
    """Derive steps and batch shapes from the token budget; ValueError naming the keys if impossible."""
    seq = model_cfg.seq_len
    if train.batch_tokens < seq or train.batch_tokens % seq:
        raise ValueError(
            f"train.batch_tokens={train.batch_tokens} must be a positive multiple of model.seq_len={seq}"
        )
    micro_tokens = train.micro_batch_tokens or train.batch_tokens
    if micro_tokens <= 0 or micro_tokens % seq or train.batch_tokens % micro_tokens:
        raise ValueError(
            f"train.micro_batch_tokens={train.micro_batch_tokens} must be a multiple of model.seq_len={seq} "
            f"that divides train.batch_tokens={train.batch_tokens}"
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
        accum=train.batch_tokens // micro_tokens,
        batch_tokens=train.batch_tokens,
        warmup_steps=max(1, round(optim.warmup_frac * steps)),
        decay_steps=decay,
    )


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    return torch.device(device)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (decaying norm gains and biases only hurts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)


def router_metrics(router: list, layer_indices: list[int]) -> dict[str, float]:
    """router/layer<i>/<stat> per MoE block, router/<stat> averaged, train/aux_loss and train/z_loss."""
    out: dict[str, float] = {}
    sums: dict[str, float] = {}
    for i, aux in zip(layer_indices, router, strict=True):
        for name, value in aux.stats.items():
            v = float(value)
            out[f"router/layer{i}/{name}"] = v
            sums[name] = sums.get(name, 0.0) + v
    for name, total in sums.items():
        out[f"router/{name}"] = total / len(router)
    for name in ("aux_loss", "z_loss"):
        if name in sums:
            out[f"train/{name}"] = out[f"router/{name}"]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, device: torch.device, autocast) -> float:
    """Token-weighted mean LM cross-entropy over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x_BS, y_BS in batches:
        with autocast():
            out = model(x_BS.to(device), y_BS.to(device))
        total += float(out.loss) * y_BS.numel()
        count += y_BS.numel()
    model.train(was_training)
    return total / count


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(
    model_cfg: ModelConfig,
    data: PreparedData,
    optim: OptimConfig,
    train: TrainConfig,
    logger: Logger,
    *,
    progress: Callable[[str], None] | None = print,
    checkpoint_dir: Path | None = None,
    resume: Mapping[str, Any] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train on `data` for `train.tokens` tokens, logging through `logger`.

    checkpoint_dir: where checkpoints go every `train.checkpoint_every` steps (None: none are written).
    resume: a state from `moe.checkpoint.load_latest`; training continues after its step.
    stop_requested: polled after every step; when it returns True a checkpoint is written and
    TrainingInterrupted is raised (preemption). NaN/inf loss raises NonFiniteLossError."""
    # --- build ---------------------------------------------------------------------------------
    plan = plan_training(model_cfg, optim, train)
    device = resolve_device(train.device)
    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")

    def autocast():
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    torch.manual_seed(train.seed)
    model = Transformer(model_cfg).to(device)
    forward = torch.compile(model) if train.compile else model
    opt = build_optimizer(model, optim)
    flops_tok = flops_per_token(model_cfg).train
    loader = TokenLoader(data.train_path, model_cfg.seq_len, plan.micro_batch_size, seed=train.seed)
    val_batches = validation_batches(data, model_cfg.seq_len, plan.micro_batch_size, train.eval_tokens)
    layers = list(model.moe_layer_indices)
    min_lr = optim.lr * optim.min_lr_ratio
    train_loss = val_loss = math.nan

    # --- resume --------------------------------------------------------------------------------
    start = 0
    if resume is not None:
        if resume["plan"] != asdict(plan):
            raise ValueError(f"checkpoint of step {resume['step']} was written for plan {resume['plan']}, "
                             f"this run has {asdict(plan)}")  # fmt: skip
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        loader.load_state_dict(resume["loader"])
        restore_rng(resume["rng"])  # last: building the model above consumed the generator
        start = int(resume["step"])
        train_loss, val_loss = resume["last"]["train_loss"], resume["last"]["val_loss"]

    def checkpoint(step: int) -> Path | None:
        if checkpoint_dir is None:
            return None
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "loader": loader.state_dict(),
                 "rng": capture_rng(), "last": {"train_loss": train_loss, "val_loss": val_loss},
                 "plan": asdict(plan)}  # fmt: skip
        return save_checkpoint(checkpoint_dir, step, state, train.keep_last)

    # The first non-finite step and its loss stay on the device (no sync per step); read at log,
    # eval and checkpoint time, so a diverged state is never logged as fine or checkpointed.
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)

    def check_finite() -> None:
        if int(bad_step):
            raise NonFiniteLossError("train/loss", int(bad_step), float(bad_loss))

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    t_start = time.perf_counter()
    window_t, window_tokens, eval_s = t_start, 0, 0.0
    total_eval_s = total_log_s = 0.0
    for step in range(start + 1, plan.steps + 1):
        lr = lr_at(
            step - 1, total_steps=plan.steps, peak_lr=optim.lr, min_lr=min_lr,
            warmup_steps=plan.warmup_steps, kind=optim.schedule, decay_steps=plan.decay_steps,
        )  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=device)
        for _ in range(plan.accum):
            x_BS, y_BS = loader.next_batch()
            with autocast():
                out = forward(x_BS.to(device, non_blocking=True), y_BS.to(device, non_blocking=True))
            # aux_loss is already coefficient-weighted; 0 for dense models.
            ((out.loss + out.aux_loss) / plan.accum).backward()
            loss_sum += out.loss.detach()
        first_bad = (bad_step == 0) & ~torch.isfinite(loss_sum)
        bad_step.masked_fill_(first_bad, step)
        bad_loss.copy_(torch.where(first_bad, loss_sum / plan.accum, bad_loss))
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balancing(out.router)
        window_tokens += plan.batch_tokens
        tokens = step * plan.batch_tokens

        if step % train.log_every == 0 or step == plan.steps:
            t_log = time.perf_counter()
            check_finite()
            train_loss = float(loss_sum) / plan.accum
            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t - eval_s, 1e-9)
            metrics = {"train/loss": train_loss, "lr": lr, "tokens": tokens, "flops": flops_tok * tokens,
                       "tokens_per_s": tok_s}  # fmt: skip
            if layers:
                metrics.update(router_metrics(out.router, layers))
            logger.log_metrics(metrics, step)
            window_t, window_tokens, eval_s = now, 0, 0.0
            total_log_s += time.perf_counter() - t_log

        if (train.eval_every and step % train.eval_every == 0) or step == plan.steps:
            t_eval = time.perf_counter()
            check_finite()
            val_loss = evaluate(model, val_batches, device, autocast)
            if not math.isfinite(val_loss):
                raise NonFiniteLossError("val/loss", step, val_loss)
            logger.log_metrics({"val/loss": val_loss, "tokens": tokens}, step)
            eval_s += time.perf_counter() - t_eval
            total_eval_s += time.perf_counter() - t_eval

        if progress and train.progress_every and (step % train.progress_every == 0 or step == plan.steps):
            elapsed = time.perf_counter() - t_start
            val = "-" if math.isnan(val_loss) else f"{val_loss:.3f}"
            progress(
                f"step {step}/{plan.steps} | tokens {tokens:,} | loss {float(loss_sum) / plan.accum:.3f} "
                f"| val {val} | {(step - start) * plan.batch_tokens / elapsed:,.0f} tok/s "
                f"| ETA {format_eta(elapsed / (step - start) * (plan.steps - step))}"
            )

        if step < plan.steps:
            stop = stop_requested is not None and stop_requested()
            if stop or (train.checkpoint_every and step % train.checkpoint_every == 0):
                check_finite()
                path = checkpoint(step)
                if stop:
                    raise TrainingInterrupted(step, path)

    # --- final -----------------------------------------------------------------------------------
    check_finite()
    wall = time.perf_counter() - t_start
    tokens = plan.steps * plan.batch_tokens
    trained = (plan.steps - start) * plan.batch_tokens
    return TrainResult(
        steps=plan.steps,
        tokens=tokens,
        flops=flops_tok * tokens,
        final_train_loss=train_loss,
        final_val_loss=val_loss,
        wall_s=wall,
        tokens_per_s=trained / wall,
        eval_s=total_eval_s,
        log_s=total_log_s,
        resumed_from=start,
    )
