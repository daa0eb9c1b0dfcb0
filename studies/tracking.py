"""Loggers for `moe.train.train`: metrics.jsonl (the source of truth) and MLflow (buffered log_batch
from a background thread that survives a tracker outage; `studies.sync` backfills what it missed).

MLflow run structure, tags and metric names follow docs/outputs.md. Runs are driven through
`MlflowClient` with explicit run ids (no fluent global state), so several can be open in one process.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# Many job processes share one sqlite file: a connection pool would hold it open between writes.
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) spend ~4 minutes on one request to
# a dead server. MlflowLogger retries on its own schedule in the background and studies.sync backfills
# whatever was missed, so one request gives up within seconds. The environment may still override these.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from filelock import FileLock  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
MAX_BUFFERED_METRICS = 2_000_000  # ~0.5 GB of Metric objects: a days-long outage must not exhaust memory
FLUSH_TIMEOUT_S = 30.0  # longest a flush waits for MLflow before leaving the rest to studies.sync
# Error codes of a request MLflow understood and refused: retrying cannot help.
PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED",
})  # fmt: skip


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


_READY_STORES: set[str] = set()


def open_client(tracking_uri: str) -> MlflowClient:
    """MlflowClient for the URI. The first use of a new sqlite store creates its tables (alembic
    migrations), which fails when several jobs do it at once ("duplicate column name"): a file lock beside
    the db lets one process create them while the others wait (measured in tests/test_concurrency.py)."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return MlflowClient(tracking_uri)
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)  # instantiates the store: creates or upgrades tables
    _READY_STORES.add(tracking_uri)
    return client


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
    client = open_client(tracking_uri)
    exp = experiment_id(client, study, None if is_server(tracking_uri) else artifact_root)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp, run_name=run_name, tags=all_tags).info.run_id


def end_run(tracking_uri: str, run_id: str | None, ok: bool) -> bool:
    """Mark the run FINISHED or FAILED; False (with a warning) if MLflow is unreachable or the point has
    no run: the run's status.json holds the outcome and `python -m studies.sync` sets it later."""
    if run_id is None:
        return False
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    try:
        open_client(tracking_uri).set_terminated(run_id, status=status)
        return True
    except Exception as exc:  # noqa: BLE001 - the tracker must not fail a run that trained
        log.warning("MLflow run %s not marked %s (%s: %s); run `python -m studies.sync <study dir>` later",
                    run_id, status, type(exc).__name__, str(exc)[:300])  # fmt: skip
        return False


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


class _Op:
    """One queued MLflow write other than metrics (params, tags, an artifact), sent in order."""

    def __init__(self, what: str, send: Callable[[], Any]):
        self.what = what
        self.send = send


def _permanent(exc: Exception) -> bool:
    """A rejected request (bad value, run gone or finished) fails the same way on every retry."""
    return isinstance(exc, MlflowException) and exc.error_code in PERMANENT_ERRORS


class OfflineRun:
    """Stands in for MlflowLogger when MLflow could not be reached as a point started: training goes on
    with metrics.jsonl and summary.json, and `python -m studies.sync` creates the MLflow run afterwards."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        pass

    def flush(self) -> None:
        pass


class MlflowLogger:
    """MLflow writes that never stop or fail the training loop.

    Metrics are buffered; a background thread sends them with log_batch every `flush_every_s`, together
    with queued params, tags and artifacts (in the order they were given). When MLflow is unreachable the
    thread keeps everything and retries with exponential backoff (up to `retry_max_s`), warning once per
    outage. `flush()` waits at most `flush_timeout_s` (less once MLflow is known to be down) and then
    leaves the rest undelivered: metrics.jsonl is the source of truth and `python -m studies.sync` backfills
    the run. Past MAX_BUFFERED_METRICS the oldest buffered metrics are dropped (sync restores them too).
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        flush_every_s: float = 15.0,
        *,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
        retry_max_s: float = 60.0,
    ):
        self.client = open_client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.flush_timeout_s = flush_timeout_s
        self.retry_max_s = retry_max_s
        self.dropped_metrics = 0
        """Buffered metrics dropped because the buffer was full (MLflow down for long)."""
        self.rejected: list[str] = []
        """Writes MLflow refused as invalid (not retried), with the reason."""
        self.last_error: str | None = None
        """The error of the latest failed send; None once a send succeeds again."""
        self._metrics: list[Metric] = []
        self._in_flight = 0  # leading metrics of the batch being sent
        self._ops: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # Called from the training loop: queue and return ----------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with self._cond:
            self._metrics.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
            excess = len(self._metrics) - MAX_BUFFERED_METRICS
            if excess > 0:  # oldest first, but never the batch being sent
                del self._metrics[self._in_flight : self._in_flight + excess]
                self.dropped_metrics += excess
        self._ensure_thread()

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._queue(f"{len(chunk)} params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._queue(f"tags {sorted(tags)}", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifacts(self, paths: Iterable[Path]) -> bool:
        """Upload files (read when sent), waiting as `flush` does; True if all were delivered."""
        for path in paths:
            self._queue(
                f"artifact {Path(path).name}", lambda p=str(path): self.client.log_artifact(self.run_id, p)
            )
        return self.flush()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send everything queued now; True if delivered. Waits at most timeout_s (default
        flush_timeout_s, or 5 s while MLflow is known to be unreachable), then warns and returns False."""
        if timeout_s is None:
            timeout_s = self.flush_timeout_s if self.last_error is None else min(self.flush_timeout_s, 5.0)
        self._ensure_thread()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._ops or self._metrics:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "MLflow run %s: %d metrics and %d other writes not delivered (%s); metrics.jsonl has "
                        "everything: run `python -m studies.sync <study dir>` once %s answers",
                        self.run_id, len(self._metrics), len(self._ops), self.last_error, self.tracking_uri,
                    )  # fmt: skip
                    return False
                self._wake.set()  # cut a retry backoff short
                self._cond.wait(min(remaining, 0.5))
        return True

    @property
    def pending(self) -> int:
        """Metrics and other writes not yet delivered."""
        with self._cond:
            return len(self._metrics) + len(self._ops)

    # Background sender --------------------------------------------------------------------------

    def _queue(self, what: str, send: Callable[[], Any]) -> None:
        with self._cond:
            self._ops.append(_Op(what, send))
        self._ensure_thread()
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            # Daemon: an undelivered buffer must never keep a finished job alive (sync backfills it).
            self._thread = threading.Thread(target=self._loop, name=f"mlflow-{self.run_id[:8]}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        failures = 0
        while True:
            delay = self.flush_every_s if failures == 0 else min(2.0**failures, self.retry_max_s)
            self._wake.wait(timeout=delay)
            self._wake.clear()
            if self._send_pending():
                if failures:
                    log.warning("MLflow run %s: %s answers again; buffered writes delivered",
                                self.run_id, self.tracking_uri)  # fmt: skip
                failures = 0
            else:
                failures += 1

    def _send_pending(self) -> bool:
        """Send queued writes in order until none is left (True) or one fails (False; kept for a retry)."""
        while True:
            with self._cond:
                if self._ops:
                    op, n_metrics = self._ops[0], 0
                elif self._metrics:
                    batch = self._metrics[:MAX_METRICS_PER_BATCH]
                    op = _Op(
                        f"{len(batch)} metrics", lambda b=batch: self.client.log_batch(self.run_id, metrics=b)
                    )
                    n_metrics = self._in_flight = len(batch)
                else:
                    self._cond.notify_all()
                    return True
            try:
                op.send()
            except Exception as exc:  # noqa: BLE001 - any tracker error: keep the write, training goes on
                with self._cond:
                    self._in_flight = 0
                if not _permanent(exc):
                    if self.last_error is None:
                        log.warning("MLflow run %s: %s unreachable (%s: %s); training continues, metrics.jsonl "
                                    "keeps every metric, retrying", self.run_id, self.tracking_uri,
                                    type(exc).__name__, str(exc)[:300])  # fmt: skip
                    self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                    with self._cond:
                        self._cond.notify_all()
                    return False
                self.rejected.append(f"{op.what}: {exc}")
                log.warning("MLflow run %s rejected %s: %s", self.run_id, op.what, exc)
            with self._cond:
                if n_metrics:
                    del self._metrics[:n_metrics]  # new metrics were appended after them
                    self._in_flight = 0
                else:
                    self._ops.popleft()
                self.last_error = None
                self._cond.notify_all()


def config_params(resolved: Mapping[str, Any], axes: Iterable[str]) -> dict[str, Any]:
    """MLflow params of a resolved point config: flattened, the sweep axes under `axis.` (bare, they would
    shadow the same-named tags, which hold the derived values) and model.moe as moe.*."""
    tree = copy.deepcopy(dict(resolved))
    tree["axis"] = {k: tree.pop(k) for k in axes if k in tree}
    moe = tree.get("model", {}).pop("moe", None)
    flat = flatten(tree)
    flat.update(flatten({"moe": moe}) if moe else {"moe": None})
    return flat


class FanOut:
    """One Logger that forwards to several."""

    def __init__(self, *loggers):
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)


# Resume support (studies.point lifecycle): continue a run's metrics.jsonl and MLflow run --------------


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl; a torn last line (a crash mid-write) is left out."""
    events = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return events


class ResumedJsonlLogger(JsonlLogger):
    """JsonlLogger that continues a metrics.jsonl from a checkpoint: lines after `through_step` (written
    after the checkpoint the run resumes from, so the resumed run writes them again) are cut first,
    atomically; `kept` and `keys` (every metric name the file held) serve the MLflow side."""

    def __init__(self, path: Path, through_step: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        events = read_events(self.path)
        self.keys = {k for e in events for k in e if k != "step"}
        self.kept = [e for e in events if e["step"] <= through_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        self.last_step = self.kept[-1]["step"] if self.kept else 0


def reopen_run(tracking_uri: str, run_id: str) -> bool | None:
    """Set a run back to RUNNING to continue it: True; False if the store has no such run (another
    tracking URI, or deleted); None if MLflow is unreachable (keep the id: the logger retries)."""
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
        if run.info.lifecycle_stage == "deleted":
            return False
        client.update_run(run_id, status="RUNNING")
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        log.warning("MLflow run %s not reopened (%s)", run_id, str(exc)[:300])
        return None
    except Exception as exc:  # noqa: BLE001 - unreachable tracker: training goes on
        log.warning("MLflow run %s not reopened (%s: %s)", run_id, type(exc).__name__, str(exc)[:300])
        return None


def mark_run_killed(tracking_uri: str, run_id: str | None) -> None:
    """KILLED, not RUNNING forever: the run was stopped (preempted, interrupted) and can be resumed."""
    if run_id is None:
        return
    try:
        MlflowClient(tracking_uri).set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
    except Exception as exc:  # noqa: BLE001 - status.json holds the truth
        log.warning("MLflow run %s not marked KILLED (%s: %s)", run_id, type(exc).__name__, str(exc)[:300])


def logged_steps(tracking_uri: str, run_id: str, keys: Iterable[str]) -> dict[str, int] | None:
    """Per metric key, the highest step the MLflow run already holds (absent: none); None if unreachable."""
    client = MlflowClient(tracking_uri)
    out: dict[str, int] = {}
    try:
        for key in sorted(keys):
            history = client.get_metric_history(run_id, key)
            if history:
                out[key] = max(m.step for m in history)
    except Exception as exc:  # noqa: BLE001 - unreachable tracker: the caller falls back to the checkpoint step
        log.warning(
            "MLflow run %s: logged steps unknown (%s: %s)", run_id, type(exc).__name__, str(exc)[:300]
        )
        return None
    return out


class SkipLogged:
    """Forwards to `logger` only the metrics at a step above what the run already holds for that key
    (`floor[key]`, else `default_floor`): a resumed run repeats steps after its checkpoint, and MLflow
    would otherwise keep both copies of each."""

    def __init__(self, logger, floor: Mapping[str, int], default_floor: int = 0):
        self.logger, self.floor, self.default_floor = logger, dict(floor), default_floor

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.floor.get(k, self.default_floor)}
        if fresh:
            self.logger.log_metrics(fresh, step)
