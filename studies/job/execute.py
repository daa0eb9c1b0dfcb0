"""Train one sweep point and record it: `run_point`, what `python -m studies.run` calls in each job.

Order: prepare the data (the cache the sweep's validation filled), derive the point at the data's
vocabulary, take ownership of its run folder (studies.job.lifecycle.owned), decide (start / resume / skip
/ retry / refuse), then train inside a PointRecord, which sets the final status however training ends.
A cooldown branch without a checkpoint of its own starts from its parent's (studies.launch.branches.start,
which waits for it); every point keeps the checkpoints its branches asked for (branches.KeptSteps).
A job of several tasks trains the point data-parallel: rank 0 owns and records it and tells the other
ranks what it decided (studies.job.ranks); they train alongside and return None. A peer failure that leaves
rank 0 stuck in a collective is recorded from its heartbeat thread (ranks.RecordPeerFailure).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe.data.config import PreparedData
from moe.data.corpus import unigram_entropy
from moe.data.loader import VAL_WINDOWS, check_budget
from moe.data.prepare import prepare_data
from moe.parallel.distributed import PeerFailure
from moe.train.checkpoint import checkpoint_path, load_checkpoint, load_latest
from moe.train.loop import train
from records import runfiles
from studies import sync
from studies.job import lifecycle, ranks
from studies.job.config import RunConfig, load_run_config
from studies.job.point import Point, build_point
from studies.job.preemption import preemption
from studies.job.record import PointRecord, machine_facts
from studies.launch import branches
from studies.track.mlflow_logger import FanOut

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointResult:
    run_key: str
    variant: str
    status: str
    """DONE, or BUSY (another live process owns the point: not run here)."""
    tags: dict[str, str]
    params_total: int
    params_active: int
    tokens: int
    val_loss: float | None
    """Final validation loss, raw (the last evaluation; the report also shows a smoothed one)."""
    train_loss: float | None
    mlflow_run_id: str | None
    run_dir: str
    error: str | None = None
    action: str = "start"
    """What this run of the point did: start, resume, retry, skip or busy (docs/lifecycle.md)."""


def prepared_point(run: RunConfig, cwd: Path | None) -> tuple[Point, PreparedData, float]:
    """(point at the data's vocabulary, its prepared data, epochs its budget spans); ValueError if the
    budget needs repeated data that was not allowed."""
    prepared = prepare_data(run.data)
    point = build_point(run, cwd=cwd, vocab_size=prepared.vocab_size)
    epochs = check_budget(prepared, point.model.seq_len, point.train.tokens, run.data.allow_repeat)
    return point, prepared, epochs


def run_point(
    cfg: DictConfig | RunConfig,
    *,
    parent_run_id: str | None = None,
    cwd: Path | None = None,
    retry_failed: bool | None = None,
    stop_requested: Callable[[], bool] | None = preemption.stop_requested,
    job: str | None = None,
) -> PointResult | None:
    """Train one sweep point and record it (files + MLflow child run), idempotently: a DONE point is
    skipped, a partial one resumes from its latest checkpoint in the same MLflow run, a FAILED one is
    retried only with retry_failed (default: launch.retry_failed). Raises after recording a failure;
    TrainingInterrupted after a checkpoint when stop_requested() turned True (preemption)."""
    run = load_run_config(cfg)
    retry = run.launch.retry_failed if retry_failed is None else retry_failed
    failures = ranks.RecordPeerFailure(hydra_job_dir())
    with ranks.point_process_group(
        run.train.device, on_peer_failure=failures, peer_timeout_s=run.infra.peer_timeout_s
    ) as env:
        if env.world_size != run.infra.world_size:
            raise ValueError(
                f"the job has {env.world_size} tasks but infra.nodes={run.infra.nodes} x "
                f"infra.tasks_per_node={run.infra.tasks_per_node} were asked for"
            )
        torch.set_num_threads(run.infra.threads)
        if not env.is_main:
            return _follow_point(run, cwd, stop_requested, failures)
        told: list[tuple[str, Any]] = []

        def tell(decision: tuple[str, Any]) -> None:
            told.append(decision)
            ranks.share(decision)

        try:
            return _lead_point(run, parent_run_id, cwd, retry, stop_requested, tell, job, failures)
        except BaseException as exc:
            if not told:  # the other ranks are waiting for a decision: let them stop too
                ranks.share(("error", f"{type(exc).__name__}: {exc}"))
            raise


def _follow_point(
    run: RunConfig,
    cwd: Path | None,
    stop_requested: Callable[[], bool] | None,
    failures: ranks.RecordPeerFailure,
) -> None:
    """A rank other than 0: prepare the same data, wait for rank 0's decision, train alongside it."""
    point, prepared, _ = prepared_point(run, cwd)
    action, detail = ranks.share(None)
    if action == "error":
        raise RuntimeError(f"rank 0 stopped before training: {detail}")
    if action != "train":  # skip, busy or refuse: rank 0 reports it
        return None
    ckpt_dir = point.run_dir / runfiles.CHECKPOINTS
    path = checkpoint_path(ckpt_dir, detail)
    if point.parent is not None and detail == point.plan.branch_step and not path.exists():
        path = checkpoint_path(branches.parent_dir(point) / runfiles.CHECKPOINTS, detail)  # a branch's start
    state = load_checkpoint(path) if detail else None
    failures.watch(point)
    train(
        point.model,
        prepared,
        run.optim,
        point.train,
        FanOut(),
        progress=None,
        checkpoint_dir=ckpt_dir,
        resume=state,
        stop_requested=stop_requested,
        parallel=run.parallel,
        keep=branches.KeptSteps(point.run_dir),
    )
    return None


def _lead_point(
    run: RunConfig,
    parent_run_id: str | None,
    cwd: Path | None,
    retry: bool,
    stop_requested: Callable[[], bool] | None,
    tell: Callable[[tuple[str, Any]], None],
    job: str | None,
    failures: ranks.RecordPeerFailure,
) -> PointResult:
    """Rank 0 (or the only rank): own, decide, record and train."""
    point, prepared, epochs = prepared_point(run, cwd)
    try:
        with lifecycle.owned(point.run_dir, job):
            return _decide_and_train(
                point, prepared, epochs, parent_run_id, retry, stop_requested, tell, failures
            )
    except lifecycle.PointBusyError as exc:
        print(f"[{point.variant}] {exc}", flush=True)
        tell(("busy", 0))
        return _result(point, "BUSY", action="busy", error=str(exc))


def _decide_and_train(
    point: Point,
    prepared: PreparedData,
    epochs: float,
    parent_run_id: str | None,
    retry: bool,
    stop_requested: Callable[[], bool] | None,
    tell: Callable[[tuple[str, Any]], None],
    failures: ranks.RecordPeerFailure,
) -> PointResult:
    run, run_dir = point.run, point.run_dir
    plan = lifecycle.lifecycle(run_dir, retry)
    print(f"[{point.variant}] run {point.run_key}: {plan.detail}", flush=True)
    if plan.action in ("skip", "refuse"):
        tell((plan.action, 0))
    if plan.action == "skip":
        complete_done_record(point)
        return _done_result(point)
    if plan.action == "refuse":
        raise lifecycle.PreviouslyFailedError(f"point {point.run_key} ({point.variant}) {plan.detail}")

    state = load_latest(run_dir / runfiles.CHECKPOINTS) if plan.step else None
    if point.parent is not None and state is None:  # a branch that has no step of its own yet
        state = branches.start(point, run.launch.parent_wait_s)
    start = state["step"] if state else 0  # a digest-valid file may still fail to load: one further back
    _warn_if_threads_changed(point, plan.status)
    entropy = unigram_entropy(prepared.val_path, prepared.dtype)
    data_params = {
        "data.fingerprint": prepared.fingerprint,
        "data.unigram_entropy": entropy,
        "data.n_train_tokens": prepared.n_train_tokens,
        "data.epochs": round(epochs, 4),
        "data.val_windows": VAL_WINDOWS,
    }
    data_summary = {
        "fingerprint": prepared.fingerprint,
        "unigram_entropy": entropy,
        "n_train_tokens": prepared.n_train_tokens,
        "n_val_tokens": prepared.n_val_tokens,
        "val_windows": VAL_WINDOWS,
    }
    record = PointRecord(
        point,
        uri=point.tracking_uri,
        parent_run_id=parent_run_id,
        start=start,
        action=plan.action,
        data_params=data_params,
        data_summary=data_summary,
        machine=machine_facts(run.train.device),
    )
    acct = point.accounting()
    with record:
        print(
            f"[{point.variant}] run {point.run_key}: {acct['acct.params_total']:,} params "
            f"({acct['acct.params_active']:,} active), {point.plan.steps} steps of {point.plan.batch_tokens} "
            f"tokens"
            + (f" on {point.plan.world_size} ranks" if point.plan.world_size > 1 else "")
            + f" -> {run_dir}"
            + (f" (resuming after step {start})" if start else ""),
            flush=True,
        )
        runfiles.keep_tokenizer(run_dir, prepared.tokenizer_path)
        failures.watch(point, record)
        tell(("train", start))
        try:
            result = train(
                point.model,
                prepared,
                run.optim,
                point.train,
                record.logger,
                progress=lambda line: print(f"[{point.variant}] {line}", flush=True),
                checkpoint_dir=run_dir / runfiles.CHECKPOINTS,
                resume=state,
                stop_requested=stop_requested,
                parallel=run.parallel,
                keep=branches.KeptSteps(run_dir),
            )
        except PeerFailure as exc:  # the record's failure_reason says it too; the tag is for filtering
            record.opened.mlflow.set_tags(ranks.failed_rank_tags(exc))
            raise
        record.finish(result)
    return _result(
        point,
        "DONE",
        action=plan.action,
        tokens=result.tokens,
        val_loss=result.final_val_loss,
        train_loss=result.final_train_loss,
        mlflow_run_id=record.opened.run_id,
    )


def hydra_job_dir() -> Path | None:
    """The folder of the Hydra job running this process (where studies.run writes point.json), or None
    (run_point also runs outside Hydra: tests, scripts)."""
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _warn_if_threads_changed(point: Point, previous_status: str | None) -> None:
    """Thread count changes float summation order, so a resume on other threads is not bitwise exact."""
    before = (runfiles.read_status(point.run_dir) or {}).get("threads") if previous_status else None
    now = torch.get_num_threads()
    if before is not None and before != now:
        print(
            f"[{point.variant}] warning: this point trained on {before} torch threads before and resumes "
            f"on {now} (infra.threads): the rest of its curve is not bitwise what {before} would give",
            flush=True,
        )


def complete_done_record(point: Point) -> None:
    """A DONE point whose MLflow run is not FINISHED (killed between the two) is synced now."""
    try:
        result = sync.complete_run(point.tracking_uri, point.run_dir, point.run.study.name, point.study_dir)
        if result is None:
            return
        print(
            f"[{point.variant}] MLflow record completed: {sync.format_results([result]).splitlines()[-1].strip()}",
            flush=True,
        )
    except Exception as exc:  # noqa: BLE001 - the files hold the result; studies.sync can finish later
        print(
            f"[{point.variant}] MLflow record not checked ({type(exc).__name__}: {str(exc)[:200]}); "
            f"run `python -m studies.sync {point.study_dir}` later",
            flush=True,
        )


def _result(point: Point, status: str, **fields: Any) -> PointResult:
    acct = point.accounting()
    base: dict[str, Any] = dict(
        run_key=point.run_key,
        variant=point.variant,
        status=status,
        tags=point.tags(),
        params_total=int(acct["acct.params_total"]),
        params_active=int(acct["acct.params_active"]),
        tokens=point.train.tokens,
        val_loss=None,
        train_loss=None,
        mlflow_run_id=None,
        run_dir=str(point.run_dir),
    )
    return PointResult(**{**base, **fields})


def _done_result(point: Point) -> PointResult:
    """The record of a point finished earlier, from its summary.json."""
    summary = runfiles.read_summary(point.run_dir) or {}
    final = summary.get("final", {})
    return _result(
        point,
        "DONE",
        action="skip",
        tokens=summary.get("tokens", 0),
        val_loss=final.get("val/loss"),
        train_loss=final.get("train/loss"),
        mlflow_run_id=summary.get("mlflow_run_id"),
    )
