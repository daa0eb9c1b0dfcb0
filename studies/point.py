"""One sweep point: `build_point` (pure: derive + validate) and `run_point` (prepare data, train, record).

Everything a point needs is checked in `build_point` and `prepare_data` before a model is built or an
MLflow run is opened, so bad input fails fast with a ValueError naming the key. Outputs follow
docs/outputs.md: <study dir>/runs/<run key>/{config.yaml, metrics.jsonl, summary.json, status.json,
mlflow_run_id, checkpoints/}. Running a point again is idempotent (docs/lifecycle.md): `lifecycle` reads
status.json and the checkpoints and decides start / resume / skip / retry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf

from moe.accounting import count_params, flops_per_token
from moe.checkpoint import checkpoint_path, latest_step, load_checkpoint, load_latest
from moe.config import ModelConfig, MoEConfig, replace
from moe.corpus import read_meta
from moe.data import check_budget, prepare_data, unigram_entropy
from moe.matched import derive
from moe.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, TrainPlan, plan_training, train
from moe.validate import validate_model_config
from studies import ranks, tracking
from studies.config import RunConfig, load_run_config

# Keys that change how a run is observed or made durable, not what it computes: left out of the run key.
CADENCE_KEYS = ("log_every", "progress_every", "checkpoint_every", "keep_last")
AXES = ("variant", "dense_match", "granularity", "top_k", "experts", "tokens", "budget_from", "seed")


def derive_model(run: RunConfig, vocab_size: int | None = None) -> ModelConfig:
    """The point's model: preset, then the axes top_k, experts, granularity, variant (in that order)."""
    model = run.model.library()
    model = replace(model, vocab_size=vocab_size if vocab_size is not None else run.data.vocab_size)
    axes = {k: getattr(run, k) for k in ("top_k", "experts", "granularity") if getattr(run, k) is not None}
    if model.moe is None:
        if axes or run.variant == "moe":
            raise ValueError(
                f"model={run.model.name} is dense (model.moe is null): it takes no MoE axes "
                f"({sorted(axes) or 'variant=moe'}); use variant=dense or a MoE preset"
            )
        validate_model_config(model)
        return model
    validate_model_config(model)
    if run.top_k is not None:
        model = derive(model, top_k=run.top_k)
    if run.experts is not None:
        model = replace(model, **{"moe.num_experts": run.experts})
        validate_model_config(model)
    if run.granularity is not None:
        model = derive(model, granularity=run.granularity)
    if run.variant == "dense":
        model = derive(model, dense=run.dense_match)
    return model


def variant_label(model: ModelConfig) -> str:
    """dense, or moe-E<E>-k<k>-G<G> plus what differs from the default router (docs/outputs.md)."""
    m = model.moe
    if m is None:
        return "dense"
    parts = [f"moe-E{m.num_experts}-k{m.top_k}-G{m.granularity}"]
    default = MoEConfig()
    parts += [
        getattr(m, key) for key in ("router", "score", "order") if getattr(m, key) != getattr(default, key)
    ]
    if m.num_shared:
        parts.append(f"shared{m.num_shared}")
    if model.first_dense_layers:
        parts.append(f"{model.first_dense_layers}dense")
    return "-".join(parts)


def training_tokens(run: RunConfig, model: ModelConfig) -> int:
    """The point's budget; with budget_from=dense_flops, the tokens costing what the dense model of
    the same total params spends on `tokens` (paper 3's equal compute, by our FLOP accounting)."""
    if run.budget_from == "tokens" or model.moe is None:
        return run.tokens
    dense = derive(model, dense="total")
    ratio = flops_per_token(dense).train / flops_per_token(model).train
    batches = max(1, round(run.tokens * ratio / run.train.batch_tokens))
    return batches * run.train.batch_tokens


@dataclass(frozen=True)
class Point:
    run: RunConfig
    """The composed config."""
    model: ModelConfig
    """Derived model."""
    train: TrainConfig
    """Training config with the point's budget and seed."""
    plan: TrainPlan
    """Steps and batch shapes."""
    variant: str
    """Readable label (tag `variant`)."""
    run_key: str
    """Short hash of what the point computes."""
    study_dir: Path
    """<paths.root>/<study.name>."""

    @property
    def run_dir(self) -> Path:
        return self.study_dir / "runs" / self.run_key

    def resolved(self) -> dict[str, Any]:
        """The point's config with the derived model and budget in place (written as config.yaml)."""
        tree = dataclasses.asdict(self.run)
        tree["model"] = {"name": self.run.model.name, **dataclasses.asdict(self.model)}
        tree["train"] = dataclasses.asdict(self.train)
        return tree

    def tags(self) -> dict[str, str]:
        m = self.model.moe
        return {
            "kind": "point",
            "study": self.run.study.name,
            "variant": self.variant,
            "model": self.run.model.name,
            "granularity": str(m.granularity) if m else "none",
            "top_k": str(m.top_k) if m else "none",
            "experts": str(m.num_experts) if m else "none",
            "tokens": str(self.train.tokens),
            "budget_tokens": str(self.run.tokens),
            "seed": str(self.run.seed),
            "run_key": self.run_key,
            "git_sha": tracking.git_sha(),
        }

    def accounting(self) -> dict[str, float]:
        params = count_params(self.model)
        return {
            "acct.params_total": params.total,
            "acct.params_active": params.active,
            "acct.params_non_embedding": params.non_embedding,
            "acct.params_active_non_embedding": params.active_non_embedding,
            "acct.flops_per_token_train": flops_per_token(self.model).train,
            # The routed-output scale in effect (moe.routed_scale is None when derived from G).
            "moe.routed_scale_used": self.model.moe.routed_scale_used if self.model.moe else 1.0,
            "acct.steps": self.plan.steps,
            "acct.batch_tokens": self.plan.batch_tokens,
        }

    def params(self) -> dict[str, Any]:
        """Flattened resolved config (model.moe.* as moe.*) plus accounting: the MLflow params.

        The top-level sweep axes go under `axis.` (axis.granularity, axis.tokens, ...): bare, they would
        shadow the same-named tags, which hold the derived values (e.g. tag granularity=8 where the axis
        was left null, tag tokens = the budget actually trained)."""
        return {**tracking.config_params(self.resolved(), AXES), **self.accounting()}


def build_point(run: RunConfig, *, cwd: Path | None = None, vocab_size: int | None = None) -> Point:
    """Derive and validate everything about a point that needs no data files; ValueError if inconsistent."""
    for axis in ("tokens", "seed"):
        if getattr(run.train, axis) != getattr(run, axis):
            raise ValueError(
                f"train.{axis}={getattr(run.train, axis)} differs from the axis {axis}={getattr(run, axis)}: "
                f"set {axis}=... (train.{axis} follows it)"
            )
    for key in ("threads", "nodes", "tasks_per_node"):
        if getattr(run.infra, key) < 1:
            raise ValueError(f"infra.{key}={getattr(run.infra, key)} must be >= 1")
    world = run.infra.nodes * run.infra.tasks_per_node
    if world > 1 and run.infra.name == "basic":
        raise ValueError(
            f"infra.tasks_per_node={run.infra.tasks_per_node} x infra.nodes={run.infra.nodes} needs a "
            "submitit launcher (infra=local or infra=slurm); infra=basic runs each point in this process"
        )
    model = derive_model(run, vocab_size)
    train_cfg = dataclasses.replace(run.train, tokens=training_tokens(run, model))
    plan = plan_training(model, run.optim, train_cfg, world_size=world)
    identity = {
        "model": dataclasses.asdict(model),
        "data": dataclasses.asdict(run.data),
        "optim": dataclasses.asdict(run.optim),
        "train": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in CADENCE_KEYS},
    }
    run_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    study_dir = Path(cwd or os.getcwd()) / run.paths.root / run.study.name
    return Point(run, model, train_cfg, plan, variant_label(model), run_key, study_dir)


def planned_point(run: RunConfig, *, cwd: Path | None = None) -> Point:
    """The point `run_point` will train, without preparing data: a tokens folder's vocabulary comes
    from its meta.json, a text corpus's is data.vocab_size (what its tokenizer is trained to)."""
    vocab = None
    if run.data.source == "tokens" and run.data.path:
        vocab = read_meta(Path(run.data.path).expanduser())["vocab_size"]
    return build_point(run, cwd=cwd, vocab_size=vocab)


# Lifecycle: what running a point again does -----------------------------------------------------

Action = Literal["start", "resume", "skip", "retry", "refuse"]
RESUMABLE = ("RUNNING", "PREEMPTED", "INTERRUPTED")
RETRY_ENV = "MOE_RETRY_FAILED"


@dataclass(frozen=True)
class Lifecycle:
    action: Action
    """start (new), resume (partial run), skip (DONE), retry (FAILED, asked to) or refuse (FAILED)."""
    step: int
    """Checkpoint step training continues from (0: from initialisation)."""
    status: str | None
    """status.json's status, None for a new point."""
    detail: str
    """One line for people: why, and from where."""


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else None


def retry_failed_from_env() -> bool:
    """`python -m studies.run --retry-failed` exports MOE_RETRY_FAILED=1 to every job it launches."""
    return os.environ.get(RETRY_ENV, "") not in ("", "0", "false")


def lifecycle(run_dir: Path, retry_failed: bool = False) -> Lifecycle:
    """What running the point of `run_dir` does now; reads status.json and verifies checkpoint digests."""
    status = read_status(run_dir)
    if status is None:
        return Lifecycle("start", 0, None, "start")
    state = status["status"]
    if state == "DONE":
        final = {}
        if (Path(run_dir) / "summary.json").exists():
            final = json.loads((Path(run_dir) / "summary.json").read_text()).get("final", {})
        val = final.get("val/loss")
        return Lifecycle(
            "skip", status["step"], state, "skip: DONE" + (f" (val loss {val:.4f})" if val else "")
        )
    step = latest_step(Path(run_dir) / "checkpoints") or 0
    where = f"from step {step}" if step else "from step 0 (no checkpoint)"
    if state == "FAILED":
        reason = f"FAILED at step {status.get('step')}: {status.get('reason')}"
        if retry_failed:
            return Lifecycle("retry", step, state, f"retry {where} ({reason})")
        return Lifecycle("refuse", step, state, f"not retried: {reason} (--retry-failed retries it)")
    if state not in RESUMABLE:
        raise ValueError(f"{run_dir}/status.json has unknown status {state!r}")
    return Lifecycle("resume", step, state, f"resume {where} ({state} at step {status.get('step')})")


class PreviouslyFailedError(RuntimeError):
    """The point FAILED in an earlier run and retrying was not asked for."""


@dataclass(frozen=True)
class PointResult:
    run_key: str
    variant: str
    status: str
    """DONE or FAILED."""
    tags: dict[str, str]
    params_total: int
    params_active: int
    tokens: int
    val_loss: float | None
    train_loss: float | None
    mlflow_run_id: str | None
    run_dir: str
    error: str | None = None
    action: str = "start"
    """What this run of the point did: start, resume, retry or skip (docs/lifecycle.md)."""


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _write_status(run_dir: Path, status: str, step: int, reason: str | None = None) -> None:
    _write_json(run_dir / "status.json", {"status": status, "step": step, "reason": reason})


def _stop_requested() -> bool:
    from studies.launcher import preemption  # the job's preemption signal, noted by the launcher

    return preemption.requested


def _mlflow_run(
    point: Point, uri: str, tags: dict[str, str], parent_run_id: str | None,
    jsonl: tracking.ResumedJsonlLogger, resume_step: int,
) -> tuple[str | None, bool, Any, tracking.MlflowLogger | tracking.OfflineRun]:  # fmt: skip
    """(run id, whether it is new, metrics logger, MLflow logger) for the point: the run named in mlflow_run_id is reopened,
    so a resumed point continues its own run; the logger drops steps the run already holds and the
    kept metrics.jsonl lines it misses are sent first (the kill may have beaten the last flush)."""
    id_file = point.run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    reopened = tracking.reopen_run(uri, run_id) if run_id else False
    if reopened is False:
        try:
            run_id = tracking.start_run(
                uri, point.run.study.name, point.study_dir / "mlartifacts",
                run_name=f"{point.variant}-s{point.run.seed}-{point.run_key}", tags=tags,
                parent_run_id=parent_run_id,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an unreachable tracker must not stop training
            print(f"[{point.variant}] MLflow at {uri} unreachable ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"training without it: run `python -m studies.sync {point.study_dir}` afterwards", flush=True)  # fmt: skip
            offline = tracking.OfflineRun()
            return None, False, offline, offline
        id_file.write_text(run_id + "\n")
    mlf = tracking.MlflowLogger(uri, run_id, point.run.tracking.flush_every_s)
    floor = {} if reopened is False else tracking.logged_steps(uri, run_id, jsonl.keys)
    if floor is None:  # MLflow unreachable: trust it holds what precedes the checkpoint
        return run_id, False, tracking.SkipLogged(mlf, {}, default_floor=resume_step), mlf
    logger = tracking.SkipLogged(mlf, floor)
    for event in jsonl.kept:
        logger.log_metrics({k: v for k, v in event.items() if k != "step"}, event["step"])
    return run_id, reopened is False, logger, mlf


def run_point(
    cfg: DictConfig | RunConfig,
    *,
    parent_run_id: str | None = None,
    cwd: Path | None = None,
    retry_failed: bool | None = None,
    stop_requested: Callable[[], bool] | None = _stop_requested,
) -> PointResult | None:
    """Train one sweep point and record it (files + MLflow child run), idempotently: a DONE point is
    skipped, a partial one resumes from its latest checkpoint in the same MLflow run, a FAILED one is
    retried only with retry_failed (default: $MOE_RETRY_FAILED). Raises after recording a failure;
    TrainingInterrupted after a checkpoint when stop_requested() turned True (preemption).
    A job of several tasks trains the point data-parallel: rank 0 records it and returns the result,
    the other ranks train alongside and return None (studies.ranks)."""
    run = load_run_config(cfg)
    with ranks.point_process_group(run.train.device) as env:
        if env.world_size != run.infra.nodes * run.infra.tasks_per_node:
            raise ValueError(
                f"the job has {env.world_size} tasks but infra.nodes={run.infra.nodes} x "
                f"infra.tasks_per_node={run.infra.tasks_per_node} were asked for"
            )
        if not env.is_main:
            return _follow_point(run, cwd, stop_requested)
        told: list[tuple[str, Any]] = []

        def tell(decision: tuple[str, Any]) -> None:
            told.append(decision)
            ranks.share(decision)

        try:
            return _lead_point(run, parent_run_id, cwd, retry_failed, stop_requested, tell)
        except BaseException as exc:
            if not told:  # the other ranks are waiting for a decision: let them stop too
                ranks.share(("error", f"{type(exc).__name__}: {exc}"))
            raise


def _follow_point(run: RunConfig, cwd: Path | None, stop_requested: Callable[[], bool] | None) -> None:
    """A rank other than 0: prepare the same data, wait for rank 0's decision, train alongside it."""
    point = build_point(run, cwd=cwd)
    torch.set_num_threads(run.infra.threads)
    prepared = prepare_data(run.data)
    if prepared.vocab_size != point.model.vocab_size:
        point = build_point(run, cwd=cwd, vocab_size=prepared.vocab_size)
    check_budget(prepared, point.model.seq_len, point.train.tokens, run.data.allow_repeat)
    action, detail = ranks.share(None)
    if action == "error":
        raise RuntimeError(f"rank 0 stopped before training: {detail}")
    if action != "train":  # skip or refuse: rank 0 reports it
        return None
    ckpt_dir = point.run_dir / "checkpoints"
    state = load_checkpoint(checkpoint_path(ckpt_dir, detail)) if detail else None
    train(point.model, prepared, run.optim, point.train, tracking.FanOut(), progress=None,
          checkpoint_dir=ckpt_dir, resume=state, stop_requested=stop_requested)  # fmt: skip
    return None


def _lead_point(
    run: RunConfig,
    parent_run_id: str | None,
    cwd: Path | None,
    retry_failed: bool | None,
    stop_requested: Callable[[], bool] | None,
    tell: Callable[[tuple[str, Any]], None],
) -> PointResult:
    """Rank 0 (or the only rank): decide, record and train; `tell` passes the decision to other ranks."""
    point = build_point(run, cwd=cwd)
    torch.set_num_threads(run.infra.threads)
    prepared = prepare_data(run.data)
    if prepared.vocab_size != point.model.vocab_size:  # data.source=tokens brings its own vocabulary
        point = build_point(run, cwd=cwd, vocab_size=prepared.vocab_size)
    epochs = check_budget(prepared, point.model.seq_len, point.train.tokens, run.data.allow_repeat)

    run_dir = point.run_dir
    tags = point.tags()
    acct = point.accounting()
    retry = retry_failed_from_env() if retry_failed is None else retry_failed
    plan = lifecycle(run_dir, retry)
    print(f"[{point.variant}] run {point.run_key}: {plan.detail}", flush=True)
    if plan.action in ("skip", "refuse"):
        tell((plan.action, 0))
    if plan.action == "skip":
        return _done_result(point, tags, acct)
    if plan.action == "refuse":
        raise PreviouslyFailedError(f"point {point.run_key} ({point.variant}) {plan.detail}")

    run_dir.mkdir(parents=True, exist_ok=True)
    state = load_latest(run_dir / "checkpoints") if plan.step else None
    start = state["step"] if state else 0  # a digest-valid file may still fail to load: one further back
    OmegaConf.save(OmegaConf.create(point.resolved()), run_dir / "config.yaml")
    _write_status(run_dir, "RUNNING", start)
    jsonl = tracking.ResumedJsonlLogger(run_dir / "metrics.jsonl", through_step=start)
    uri = run.tracking.uri or tracking.default_tracking_uri(point.study_dir)
    run_id, new_run, mlf_logger, mlf = _mlflow_run(point, uri, tags, parent_run_id, jsonl, start)
    entropy = unigram_entropy(prepared.val_path, prepared.dtype)
    data_params = {"data.fingerprint": prepared.fingerprint, "data.unigram_entropy": entropy,
                   "data.n_train_tokens": prepared.n_train_tokens, "data.epochs": round(epochs, 4)}  # fmt: skip
    if new_run:
        mlf.log_params({**point.params(), **data_params})
    if start or plan.action != "start":
        mlf.set_tags({"resumed_from_step": str(start), "lifecycle_action": plan.action})
    summary: dict[str, Any] = {
        "run_key": point.run_key, "variant": point.variant, "tags": tags,
        "params": {**point.params(), **data_params},
        "mlflow_run_id": run_id, "parent_run_id": parent_run_id, "resumed_from": start,
        "ranks": point.plan.world_size,
        "data": {"fingerprint": prepared.fingerprint, "unigram_entropy": entropy,
                 "n_train_tokens": prepared.n_train_tokens, "n_val_tokens": prepared.n_val_tokens},
    }  # fmt: skip
    print(f"[{point.variant}] run {point.run_key}: {acct['acct.params_total']:,} params "
          f"({acct['acct.params_active']:,} active), {point.plan.steps} steps of {point.plan.batch_tokens} "
          f"tokens" + (f" on {point.plan.world_size} ranks" if point.plan.world_size > 1 else "")
          + f" -> {run_dir}" + (f" (resuming after step {start})" if start else ""), flush=True)  # fmt: skip

    tell(("train", start))
    t0 = time.perf_counter()
    try:
        result = train(
            point.model, prepared, run.optim, point.train, tracking.FanOut(jsonl, mlf_logger),
            progress=lambda line: print(f"[{point.variant}] {line}", flush=True),
            checkpoint_dir=run_dir / "checkpoints", resume=state, stop_requested=stop_requested,
        )  # fmt: skip
    except TrainingInterrupted as exc:
        jsonl.close()
        _write_status(run_dir, "PREEMPTED", exc.step, f"stopped on request; checkpoint {exc.checkpoint}")
        mlf.flush()
        tracking.mark_run_killed(uri, run_id)
        raise
    except BaseException as exc:
        # A signal or Ctrl-C (not an Exception) leaves a resumable run; anything else is a failure.
        failed = isinstance(exc, Exception)
        step = exc.step if isinstance(exc, NonFiniteLossError) else jsonl.last_step
        reason = f"{type(exc).__name__}: {exc}"
        jsonl.close()
        _write_status(run_dir, "FAILED" if failed else "INTERRUPTED", step, reason)
        if not failed:
            mlf.flush()
            tracking.mark_run_killed(uri, run_id)
            raise
        summary.update(
            status="FAILED", error=reason, failed_step=step, traceback=traceback.format_exc(), final={}
        )
        _write_json(run_dir / "summary.json", summary)
        mlf.set_tags({"failure_reason": reason[:5000], "failed_step": str(step)})
        _finish(mlf, uri, run_id, run_dir, ok=False)
        raise

    jsonl.close()
    final = {"val/loss": result.final_val_loss, "train/loss": result.final_train_loss}
    summary.update(status="DONE", final=final, steps=result.steps, tokens=result.tokens, flops=result.flops,
                   wall_s=time.perf_counter() - t0, tokens_per_s=result.tokens_per_s)  # fmt: skip
    _write_json(run_dir / "summary.json", summary)
    _write_status(run_dir, "DONE", result.steps)
    _finish(mlf, uri, run_id, run_dir, ok=True)
    return PointResult(
        run_key=point.run_key, variant=point.variant, status="DONE", tags=tags,
        params_total=int(acct["acct.params_total"]), params_active=int(acct["acct.params_active"]),
        tokens=result.tokens, val_loss=result.final_val_loss, train_loss=result.final_train_loss,
        mlflow_run_id=run_id, run_dir=str(run_dir), action=plan.action,
    )  # fmt: skip


def _done_result(point: Point, tags: dict[str, str], acct: dict[str, float]) -> PointResult:
    """The record of a point finished earlier, from its summary.json."""
    summary = json.loads((point.run_dir / "summary.json").read_text())
    final = summary.get("final", {})
    return PointResult(
        run_key=point.run_key, variant=point.variant, status="DONE", tags=tags,
        params_total=int(acct["acct.params_total"]), params_active=int(acct["acct.params_active"]),
        tokens=summary.get("tokens", 0), val_loss=final.get("val/loss"), train_loss=final.get("train/loss"),
        mlflow_run_id=summary.get("mlflow_run_id"), run_dir=str(point.run_dir), action="skip",
    )  # fmt: skip


def _finish(
    mlf: tracking.MlflowLogger | tracking.OfflineRun, uri: str, run_id: str | None, run_dir: Path, ok: bool
) -> None:
    mlf.flush()
    mlf.log_artifacts(run_dir / name for name in ("config.yaml", "metrics.jsonl", "summary.json"))
    tracking.end_run(uri, run_id, ok)
