"""A point's record while it trains: its run folder (records.runfiles) and its MLflow child run.

`PointRecord` is a context manager (lingua's ExitStack idea): entering writes config.yaml and a
RUNNING status and opens the MLflow run (reopened on resume, or an offline stand-in when MLflow cannot
be reached; `studies.sync` backfills it later); leaving sets the final status from how the block
ended, once, in one place:

    block returned after finish(result)   DONE, summary.json, MLflow FINISHED with its artifacts
    TrainingInterrupted                   PREEMPTED (checkpoint written), MLflow KILLED
    any other Exception                   FAILED with step and reason, summary.json, MLflow FAILED
    KeyboardInterrupt / SystemExit        INTERRUPTED (resumable), MLflow KILLED

The status is written before MLflow is told, so a kill between the two leaves a status that a re-run
acts on: a DONE point whose MLflow run is not FINISHED is synced when it is skipped (studies.job.execute).
"""

from __future__ import annotations

import errno
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from analysis.derive import RAW_LABEL, Smoothing, final_smoothed, smoothed_label
from moe.train.optim import resolve_device
from moe.train.outcome import NonFiniteLossError, TrainingInterrupted, TrainResult
from moe.train.plan import Device
from records import runfiles
from studies.job.point import Point
from studies.track import tracking
from studies.track.mlflow_logger import FanOut, MlflowLogger, OfflineRun, SkipLogged

FINAL_METRICS = {"val/loss": "final/val_loss_raw", "val/loss_smoothed": "final/val_loss_smoothed"}
"""summary.json's final numbers -> the MLflow metrics that carry them (labels: summary.json)."""
FINAL_EVAL_LABELS = {
    "val/loss_final": "final val loss on train.final_eval_tokens (raw)",
    "val/loss_final_se": "its standard error (validation windows as samples)",
}
"""summary.json's numbers from the extra evaluation after the last step (moe.train.loop, train.final_eval_tokens)."""
STATUS_EVERY_S = 10.0  # status.json's step is refreshed at most this often while a point trains


def machine_facts(device: Device) -> dict[str, Any]:
    """What a run's numbers depend on beyond its config (summary.json "machine"): the thread count sets
    the float summation order, the CPU capability (AVX512, AVX2, ...) and torch version pick the kernels,
    so the same run key gives different losses across them; device: "cpu" or the CUDA device's name."""
    dev = resolve_device(device)
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev),
    }


def machine_params(machine: dict[str, Any]) -> dict[str, Any]:
    """The machine facts as MLflow params and tags: machine.threads, machine.torch, ... (analysis.checks)."""
    return {f"machine.{k}": v for k, v in machine.items()}


class StatusUpdates:
    """Keeps status.json's step current while the point trains (throttled: one small atomic write
    every STATUS_EVERY_S at most), since it is what a status view and a person read."""

    def __init__(self, run_dir: Path, extra: dict[str, Any], every_s: float | None = None):
        self.run_dir, self.extra = run_dir, extra
        self.every_s = STATUS_EVERY_S if every_s is None else every_s
        self._last = time.monotonic()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            runfiles.write_status(self.run_dir, "RUNNING", step, **self.extra)


def no_space_message(exc: BaseException, where: Path) -> str | None:
    """'no space left on <path>' when `exc` (or what caused it) is a full disk, else None. torch's
    writer reports it as "[enforce fail at inline_container.cc] . unexpected pos"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f"no space left on {seen.filename or where}"
        if "unexpected pos" in str(seen) or "No space left" in str(seen):
            return f"no space left on {where}"
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass
class Opened:
    run_id: str | None
    """The MLflow run (None: offline)."""
    new: bool
    """Whether the run was created now (its params are logged then)."""
    logger: Any
    """What training logs metrics to on the MLflow side (skips steps the run already holds)."""
    mlflow: MlflowLogger | OfflineRun


def open_mlflow_run(
    point: Point, uri: str, parent_run_id: str | None, metrics: runfiles.MetricsWriter, resume_step: int
) -> Opened:
    """The point's MLflow run: the one named in mlflow_run_id is reopened, so a resumed point continues
    its own run; the logger drops steps the run already holds and the kept metrics.jsonl lines it
    misses are sent first (the kill may have beaten the last flush)."""
    run_id = runfiles.read_run_id(point.run_dir)
    reopened = tracking.reopen_run(uri, run_id) if run_id else False
    if reopened is False:
        try:
            run_id = tracking.start_run(
                uri,
                point.run.study.name,
                point.study_dir / "mlartifacts",
                run_name=f"{point.variant}-s{point.run.seed}-{point.run_key}",
                tags=point.tags(),
                parent_run_id=parent_run_id,
            )
        except Exception as exc:  # noqa: BLE001 - an unreachable tracker must not stop training
            print(
                f"[{point.variant}] MLflow at {uri} unreachable ({type(exc).__name__}: {str(exc)[:200]}); "
                f"training without it: run `python -m studies.sync {point.study_dir}` afterwards",
                flush=True,
            )
            offline = OfflineRun()
            return Opened(None, False, offline, offline)
        runfiles.write_run_id(point.run_dir, run_id)
    mlf = MlflowLogger(uri, run_id, point.run.tracking.flush_every_s)
    floor = {} if reopened is False else tracking.logged_steps(uri, run_id, metrics.keys)
    if floor is None:  # MLflow unreachable: trust it holds what precedes the checkpoint
        return Opened(run_id, False, SkipLogged(mlf, {}, default_floor=resume_step), mlf)
    logger = SkipLogged(mlf, floor)
    for event in metrics.kept:
        logger.log_metrics({k: v for k, v in event.items() if k != "step"}, event["step"])
    return Opened(run_id, reopened is False, logger, mlf)


class PointRecord:
    """The record of one training attempt of a point (see the module docstring)."""

    def __init__(
        self,
        point: Point,
        *,
        uri: str,
        parent_run_id: str | None,
        start: int,
        action: str,
        data_params: dict[str, Any],
        data_summary: dict[str, Any],
        machine: dict[str, Any],
    ):
        self.point, self.uri, self.parent_run_id = point, uri, parent_run_id
        self.start, self.action, self.machine = start, action, machine
        self.threads = int(machine["threads"])
        self.data_params, self.data_summary = data_params, data_summary
        self.result: TrainResult | None = None
        self._t0 = 0.0

    @property
    def run_dir(self) -> Path:
        return self.point.run_dir

    def __enter__(self) -> PointRecord:
        point, run_dir = self.point, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(point.resolved()), run_dir / runfiles.CONFIG)
        self.status_extra = {"threads": self.threads, "world_size": point.world_size}
        runfiles.write_status(run_dir, "RUNNING", self.start, **self.status_extra)
        self.metrics = runfiles.MetricsWriter(run_dir / runfiles.METRICS, through_step=self.start)
        self.opened = open_mlflow_run(point, self.uri, self.parent_run_id, self.metrics, self.start)
        mlf = self.opened.mlflow
        if self.opened.new:
            mlf.log_params(self.params())
        mlf.set_tags(self.machine_tags())  # a resumed run's tags say where its last attempt ran
        if self.start or self.action != "start":
            mlf.set_tags({"resumed_from_step": str(self.start), "lifecycle_action": self.action})
        self.logger = FanOut(self.metrics, self.opened.logger, StatusUpdates(run_dir, self.status_extra))
        self._t0 = time.perf_counter()
        return self

    def machine_tags(self) -> dict[str, str]:
        """The machine facts as tags too, to filter runs by in MLflow (summary.json's tags carry them, so
        `studies.sync` gives a run created later the same)."""
        return {k: str(v) for k, v in machine_params(self.machine).items()}

    def params(self) -> dict[str, Any]:
        """The MLflow params: the point's, the data's identity and the machine facts."""
        return {**self.point.params(), **self.data_params, **machine_params(self.machine)}

    def summary(self, **fields: Any) -> dict[str, Any]:
        point = self.point
        return {
            "run_key": point.run_key,
            "variant": point.variant,
            "tags": {**point.tags(), **self.machine_tags()},
            "params": self.params(),
            "mlflow_run_id": self.opened.run_id,
            "parent_run_id": self.parent_run_id,
            "resumed_from": self.start,
            "ranks": point.plan.world_size,
            "threads": self.threads,
            "machine": self.machine,
            "data": self.data_summary,
            **fields,
        }

    def finish(self, result: TrainResult) -> None:
        """The block trained to the end: leaving it records DONE."""
        self.result = result

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None and self.result is not None:
            final, labels = self.finals(self.result)
            # through the run's logger, so metrics.jsonl holds them too and `studies.sync` backfills them;
            # once: a run killed after writing them but before DONE resumes at its last step with them kept
            steps = self.result.steps
            kept = {k for e in self.metrics.kept if e["step"] == steps for k in e}
            finals = {FINAL_METRICS[k]: v for k, v in final.items() if k in FINAL_METRICS}
            if finals := {k: v for k, v in finals.items() if k not in kept}:
                self.logger.log_metrics(finals, steps)
        self.metrics.close()
        mlf, run_id = self.opened.mlflow, self.opened.run_id
        if exc is None:
            result = self.result
            if result is None:
                raise RuntimeError("PointRecord left without finish(result) or an exception")
            runfiles.write_summary(
                self.run_dir,
                self.summary(
                    status="DONE",
                    final=final,
                    final_labels=labels,
                    steps=result.steps,
                    tokens=result.tokens,
                    flops=result.flops,
                    wall_s=time.perf_counter() - self._t0,
                    tokens_per_s=result.tokens_per_s,
                    train_s=result.train_s,
                ),
            )
            runfiles.write_status(self.run_dir, "DONE", result.steps, **self.status_extra)
            self._close_mlflow(ok=True)
            return
        if isinstance(exc, TrainingInterrupted):
            reason = f"stopped on request; checkpoint {exc.checkpoint}"
            runfiles.write_status(self.run_dir, "PREEMPTED", exc.step, reason, **self.status_extra)
            mlf.flush()
            tracking.mark_run_killed(self.uri, run_id)
            return
        step = exc.step if isinstance(exc, NonFiniteLossError) else self.metrics.last_step
        reason = no_space_message(exc, self.run_dir) or f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Exception):  # a signal or Ctrl-C leaves a resumable run
            runfiles.write_status(self.run_dir, "INTERRUPTED", step, reason, **self.status_extra)
            mlf.flush()
            tracking.mark_run_killed(self.uri, run_id)
            return
        try:
            runfiles.write_status(self.run_dir, "FAILED", step, reason, **self.status_extra)
            runfiles.write_summary(
                self.run_dir,
                self.summary(
                    status="FAILED",
                    error=reason,
                    failed_step=step,
                    traceback=traceback.format_exc(),
                    final={},
                ),
            )
        except OSError as write_error:  # a full disk may refuse the record too: say so, keep the cause
            print(f"[{self.point.variant}] could not record the failure ({write_error})", flush=True)
        mlf.set_tags({"failure_reason": reason[:5000], "failed_step": str(step)})
        self._close_mlflow(ok=False)
        if reason.startswith("no space left"):  # torch's own words for it name no path
            raise OSError(errno.ENOSPC, reason) from exc

    def finals(self, result: TrainResult) -> tuple[dict[str, float], dict[str, str]]:
        """The run's final numbers and their labels, the names the report and the sweep table use."""
        final = {"val/loss": result.final_val_loss, "train/loss": result.final_train_loss}
        labels = {"val/loss": RAW_LABEL, "train/loss": "final train loss (raw)"}
        values = runfiles.metric_values(runfiles.read_events(self.run_dir / runfiles.METRICS))
        val = sorted((step, v) for (key, step), v in values.items() if key == "val/loss")
        if val:
            smoothing = Smoothing()
            final["val/loss_smoothed"] = final_smoothed([s for s, _ in val], [v for _, v in val], smoothing)
            labels["val/loss_smoothed"] = smoothed_label(smoothing)
        for key, label in FINAL_EVAL_LABELS.items():  # from the log: a resumed call may have trained nothing
            logged = [v for (k, step), v in values.items() if k == key and step == result.steps]
            if logged:
                final[key], labels[key] = logged[-1], label
        return final, labels

    def _close_mlflow(self, ok: bool) -> None:
        mlf = self.opened.mlflow
        mlf.flush()
        names = (runfiles.CONFIG, runfiles.METRICS, runfiles.SUMMARY)
        mlf.log_artifacts(self.run_dir / n for n in names if (self.run_dir / n).exists())
        tracking.end_run(self.uri, self.opened.run_id, ok)


def record_failure_from_another_thread(record: PointRecord, exc: Exception, timeout_s: float) -> bool:
    """Record `exc` as how the point ended, from a thread other than the one training it (the heartbeat
    thread, when the training thread is stuck in a collective and the process is about to exit): the same
    record as the block ending with `exc` (status.json FAILED first, then summary.json and MLflow). Waits
    at most timeout_s (MLflow slow or unreachable); True if the record was finished in time."""
    import threading  # here: the module's imports are another session's to edit just now

    def leave() -> None:
        try:
            raise exc  # so that summary.json's traceback is this exception's
        except Exception:  # noqa: BLE001 - recorded, not handled
            record.__exit__(type(exc), exc, exc.__traceback__)

    thread = threading.Thread(target=leave, name="moe-record-failure", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()
