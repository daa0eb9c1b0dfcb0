"""The training loop: one function that reads top to bottom.

build -> resume -> loop {lr, forward/backward (+ aux losses), clip, step, balancing update, non-finite
check, log, eval, checkpoint} -> final eval.
Side effects leave through a `Logger` (anything with `log_metrics(metrics, step)`); the MLflow logger
lives in `studies/`, so this module imports no orchestration code. Metric names follow docs/outputs.md.
Resume is exact: a checkpoint (moe.train.checkpoint) holds model, optimiser, data position and RNG states, and
everything else (lr, metrics, eval points) is a function of the step, so a resumed run logs bit for bit
what an uninterrupted one would (CPU fp32; throughput `tokens_per_s` is wall-clock and differs).
Data parallel: inside a process group (moe.parallel.distributed.distributed_env) the same global batch is split
across ranks by micro-batch, DDP averages gradients, and the step's loss and expert loads are summed
over ranks, so every rank takes the same step and W ranks follow the single-process loss curve
(docs/distributed.md). Rank 0 alone logs and prints; it writes the checkpoints, except in sharded
layouts (`parallel`: FSDP2, expert parallelism; moe.parallel.layout), where every rank writes its shards.
Shape suffixes: B = sequences in a micro-batch, S = sequence length.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from moe.data.config import PreparedData
from moe.data.loader import TokenLoader, validation_batches
from moe.model.accounting import flops_per_token
from moe.model.config import ModelConfig
from moe.model.transformer import Transformer
from moe.parallel.distributed import active_world, all_reduce_sum, barrier, explains_rank_failures
from moe.parallel.layout import ParallelConfig, eval_batches_per_rank, parallelize, resolve_layout
from moe.parallel.state import full_state_tensors, load_full_
from moe.train.checkpoint import load_sharded, save_checkpoint, save_sharded
from moe.train.evaluation import TrainClock, eval_metrics, evaluate, router_metrics
from moe.train.optim import build_optimizer, resolve_device
from moe.train.outcome import NonFiniteLossError, TrainingInterrupted, TrainResult
from moe.train.plan import (
    OptimConfig,
    TrainConfig,
    check_resume,
    is_eval_step,
    plan_training,
)
from moe.train.rng import capture_rng, restore_rng
from moe.train.schedule import lr_at


class Logger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class _Quiet:
    """The logger of ranks other than 0."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


_QUIET = _Quiet()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@explains_rank_failures
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
    parallel: ParallelConfig | None = None,
    keep: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train on `data` for `train.tokens` tokens, logging through `logger`.

    checkpoint_dir: where checkpoints go every `train.checkpoint_every` steps and, unless that is 0, at the
    last step (None: none are written).
    resume: a state from `moe.train.checkpoint.load_latest`; training continues after its step.
    stop_requested: polled after every step; when it returns True a checkpoint is written and
    TrainingInterrupted is raised (preemption). NaN/inf loss raises NonFiniteLossError.
    parallel: how the run is laid out over the process group's ranks (moe.parallel.layout; None: DDP inside a
    process group, else one process). A checkpoint of any layout resumes in any other.
    keep: asked after every step below the last; True writes a checkpoint of that step that rotation
    never deletes (a branch point, docs/branches.md). A branch (train.branch_from) passes its parent's
    checkpoint of plan.branch_step as `resume`.
    Inside a process group every rank calls this with the same arguments; only rank 0 logs and prints,
    and a stop request on any rank stops all of them."""
    # --- build ---------------------------------------------------------------------------------
    rank, world = active_world()
    layout = resolve_layout(parallel, world, model_cfg)
    plan = plan_training(model_cfg, optim, train, world_size=world)
    if resume is not None:
        check_resume(resume, plan, model_cfg, optim)
    device = resolve_device(train.device)
    # sharded layouts: every rank writes its shards; otherwise rank 0 writes for all
    checkpoint_dir_out = checkpoint_dir if rank == 0 or layout.sharded else None
    if rank:
        logger, progress = _QUIET, None
    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")

    def autocast():
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    torch.manual_seed(train.seed)
    # Sharded layouts build on meta and allocate only each rank's shards (Parallel.materialize_), with
    # the weights this seed gives one process: no rank ever holds the whole model.
    with torch.device("meta") if layout.sharded else contextlib.nullcontext():
        model = Transformer(model_cfg)
    model = model if layout.sharded else model.to(device)
    # a router that may get no gradient leaves a parameter unused in some steps (DDP must know)
    unused = model_cfg.moe is not None and model_cfg.moe.allow_no_router_grad
    par = parallelize(model, layout, device, bf16=use_bf16, find_unused=unused)
    if layout.sharded:  # a resume loads every tensor below: drawing the init would be wasted
        par.materialize_(device, train.seed, init=resume is None)
    net = par.net
    compiled = train.compile
    forward = torch.compile(net) if compiled else net
    opt = build_optimizer(model, optim, par.expert_params)
    flops_tok = flops_per_token(model_cfg).train
    loader = TokenLoader(data.train_path, model_cfg.seq_len, plan.micro_batch_size, seed=train.seed)
    all_val = validation_batches(data, model_cfg.seq_len, plan.micro_batch_size, train.eval_tokens)
    val_batches = all_val[rank::world]
    val_forwards = eval_batches_per_rank(len(all_val), world) if layout.mode == "fsdp" else 0
    layers = list(model.moe_layer_indices)
    min_lr = optim.lr * optim.min_lr_ratio
    train_loss = val_loss = train_s = math.nan

    # --- resume --------------------------------------------------------------------------------
    start = 0
    if resume is not None:
        if "sharded" in resume:  # DCP: each rank reads its part, whatever layout wrote it
            load_sharded(resume["sharded"], par.state_tensors(opt))
        elif layout.sharded:
            load_full_(
                par.state_tensors(opt), full_state_tensors(model, resume["model"], resume["optimizer"])
            )
        else:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
        loader.load_state_dict(resume["loader"])
        restore_rng(resume["rng"])  # last: building the model above consumed the generator
        start = int(resume["step"])
        train_loss, val_loss = resume["last"]["train_loss"], resume["last"]["val_loss"]
    # checkpoints written before time/train_s existed do not hold it: that run's clock is unknown
    clock = TrainClock(device, resume["last"].get("train_s", math.nan) if resume is not None else 0.0)

    def checkpoint(step: int, kept: bool = False) -> Path | None:
        path = None
        if checkpoint_dir_out is not None:
            state = {
                "loader": loader.state_dict(),
                "rng": capture_rng(),
                "plan": asdict(plan),
                "last": {"train_loss": train_loss, "val_loss": val_loss, "train_s": clock.total_s},
                "model_config": asdict(model_cfg),
                "layout": asdict(layout),
                "optim": asdict(optim),
            }
            if layout.sharded:
                path = save_sharded(
                    checkpoint_dir_out, step, par.state_tensors(opt), state, train.keep_last, kept
                )
            else:  # ranks hold identical states: rank 0 writes for all
                state.update(model=model.state_dict(), optimizer=opt.state_dict())
                path = save_checkpoint(checkpoint_dir_out, step, state, train.keep_last, kept)
        barrier()  # no rank leaves (e.g. on preemption) before the checkpoint exists
        return path

    # The first non-finite step and its loss stay on the device (no sync per step); read at log,
    # eval and checkpoint time, so a diverged state is never logged as fine or checkpointed.
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)

    def check_finite() -> None:
        if int(bad_step):
            raise NonFiniteLossError("train/loss", int(bad_step), float(bad_loss))

    # --- loop ----------------------------------------------------------------------------------
    # The train loss of steps between log steps stays on the device until the next log (no sync per
    # step), then goes out as its own events: the early plateau is seen step by step.
    pending_losses: list[tuple[int, torch.Tensor]] = []

    def log_pending_losses() -> None:
        for s, loss in pending_losses:
            logger.log_metrics({"train/loss": float(loss) / plan.accum, "tokens": s * plan.batch_tokens}, s)
        pending_losses.clear()

    model.train()
    t_start = time.perf_counter()
    clock.skip()  # building and resuming are not training
    window_t, window_tokens, eval_s = t_start, 0, 0.0
    total_eval_s = total_log_s = 0.0
    for step in range(start + 1, plan.steps + 1):
        lr = lr_at(
            step - 1,
            total_steps=plan.steps,
            peak_lr=optim.lr,
            min_lr=min_lr,
            warmup_steps=plan.warmup_steps,
            kind=optim.schedule,
            decay_steps=plan.decay_steps,
            decay_shape=optim.decay_shape,
        )
        for group in opt.param_groups:
            group["lr"] = lr

        # The step's micro-batches are stream batches base .. base + accum*world - 1 (the same ones
        # whatever the world size); rank r takes a contiguous share of them.
        base = loader.step
        loss_sum = torch.zeros((), device=device)
        loads = [torch.zeros(model_cfg.moe.n_routed, device=device) for _ in layers] if layers else []
        for j in range(plan.accum):
            loader.seek(base + rank * plan.accum + j)
            x_BS, y_BS = loader.next_batch()
            last = j == plan.accum - 1
            with par.accumulate(last):  # reduce gradients over ranks once, after the last
                with autocast():
                    out = forward(x_BS.to(device, non_blocking=True), y_BS.to(device, non_blocking=True))
                # aux_loss is already coefficient-weighted; 0 for dense models.
                ((out.loss + out.aux_loss) / plan.accum).backward()
            loss_sum += out.loss.detach()
            for load, aux in zip(loads, out.router, strict=True):
                load += aux.tokens_per_expert.to(device)
        loader.seek(base + plan.accum * world)
        stop = step < plan.steps and stop_requested is not None and stop_requested()
        kept = step < plan.steps and keep is not None and keep(step)
        if world > 1:  # one small all-reduce: loss, stop and keep votes and expert loads of every rank
            flat = all_reduce_sum(
                torch.cat(
                    [
                        loss_sum.view(1).float(),
                        torch.tensor([float(stop), float(kept)], device=device),
                        *loads,
                    ]
                )
            )
            loss_sum, stop, kept = flat[0] / world, bool(flat[1] > 0), bool(flat[2] > 0)
            loads = list(flat[3:].split([len(x) for x in loads])) if loads else []
        first_bad = (bad_step == 0) & ~torch.isfinite(loss_sum)
        bad_step.masked_fill_(first_bad, step)
        bad_loss.copy_(torch.where(first_bad, loss_sum / plan.accum, bad_loss))
        par.finish_gradients()
        if optim.grad_clip > 0:
            par.clip_grad_norm_(optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if layers:
            model.update_balancing(
                [replace(aux, tokens_per_expert=x) for aux, x in zip(out.router, loads, strict=True)]
            )
        window_tokens += plan.batch_tokens
        tokens = step * plan.batch_tokens
        if compiled and step == start + 1:
            clock.skip()  # this process's first step compiled the model

        logged = step % train.log_every == 0 or step == plan.steps
        evaluated = is_eval_step(train, step, plan.steps)
        if logged or evaluated:
            train_s = clock.read()  # one value for this step's train and val events
        if not logged:
            pending_losses.append((step, loss_sum.detach()))
        else:
            with clock.excluded():
                t_log = time.perf_counter()
                check_finite()
                log_pending_losses()
                train_loss = float(loss_sum) / plan.accum
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t - eval_s, 1e-9)
                metrics = {
                    "train/loss": train_loss,
                    "lr": lr,
                    "tokens": tokens,
                    "flops": flops_tok * tokens,
                    "tokens_per_s": tok_s,
                    "data/epochs": loader.epochs_seen,
                    "time/train_s": train_s,
                }
                if layers:
                    metrics.update(router_metrics(out.router, layers))
                logger.log_metrics(metrics, step)
                window_t, window_tokens, eval_s = now, 0, 0.0
                total_log_s += time.perf_counter() - t_log

        if evaluated:
            with clock.excluded():
                t_eval = time.perf_counter()
                check_finite()
                val = evaluate(model, val_batches, device, autocast, val_forwards, all_val[0])
                val_loss = val.loss
                if not math.isfinite(val_loss):
                    raise NonFiniteLossError("val/loss", step, val_loss)
                metrics = eval_metrics(val, "val/loss")
                # a val event off the log steps carries its own tokens and clock (one value per step)
                logger.log_metrics(
                    metrics if logged else {**metrics, "tokens": tokens, "time/train_s": train_s}, step
                )
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
            if stop or kept or (train.checkpoint_every and step % train.checkpoint_every == 0):
                check_finite()
                with clock.excluded():
                    log_pending_losses()  # a resume starts after this step: nothing before it may be lost
                    path = checkpoint(step, kept)
                if stop:
                    raise TrainingInterrupted(step, path)

    # --- final -----------------------------------------------------------------------------------
    check_finite()
    final_eval = None
    if train.final_eval_tokens and start < plan.steps:
        final_val = validation_batches(
            data, model_cfg.seq_len, plan.micro_batch_size, train.final_eval_tokens
        )
        forwards = eval_batches_per_rank(len(final_val), world) if layout.mode == "fsdp" else 0
        final_eval = evaluate(model, final_val[rank::world], device, autocast, forwards, final_val[0])
        if not math.isfinite(final_eval.loss):
            raise NonFiniteLossError("val/loss_final", plan.steps, final_eval.loss)
        logger.log_metrics(eval_metrics(final_eval, "val/loss_final"), plan.steps)
    # A finished run keeps its final weights (export, eval), in every layout.
    if train.checkpoint_every and start < plan.steps:
        with clock.excluded():
            checkpoint(plan.steps)  # every rank, as in the loop: checkpoint() ends in a barrier
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
        final_eval=final_eval,
        train_s=train_s,
        resumed_from=start,
    )
