"""Loggers for `moe.train.train`: metrics.jsonl (the source of truth) and MLflow (buffered log_batch).

MLflow run structure, tags and metric names follow docs/outputs.md. Runs are driven through
`MlflowClient` with explicit run ids (no fluent global state), so several can be open in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Many job processes share one sqlite file: a connection pool would hold it open between writes.
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")

from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def is_server(tracking_uri: str) -> bool:
    """A tracking server stores artifacts itself; a local store keeps them beside the study."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_command(tracking_uri: str) -> str:
    if is_server(tracking_uri):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def git_sha() -> str:
    """Commit of the code that runs, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """Get or create the study's experiment; tolerate another process creating it at the same time.

    artifact_root None lets the tracking server choose (mlflow-artifacts: uploads over HTTP)."""
    for _ in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            location = None if artifact_root is None else Path(artifact_root).resolve().as_uri()
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # lost the race (unique name) or the db was busy: look again
            time.sleep(0.5)
    raise RuntimeError(f"could not get or create MLflow experiment {name!r}")


def start_run(
    tracking_uri: str,
    study: str,
    artifact_root: Path,
    *,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> str:
    client = MlflowClient(tracking_uri)
    exp = experiment_id(client, study, None if is_server(tracking_uri) else artifact_root)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp, run_name=run_name, tags=all_tags).info.run_id


def end_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 128}} -> {"model.d_model": 128}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class JsonlLogger:
    """Appends one JSON object per logging event to metrics.jsonl (flushed, so a crash keeps the history)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w")
        self.last_step = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        self.last_step = step

    def close(self) -> None:
        self._file.close()


class MlflowLogger:
    """Buffers metrics and sends them with one log_batch every `flush_every_s` (and on flush/close)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 15.0):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + MAX_METRICS_PER_BATCH])
        self._buffer.clear()
        self._last_flush = time.monotonic()

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))


class FanOut:
    """One Logger that forwards to several."""

    def __init__(self, *loggers):
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)
