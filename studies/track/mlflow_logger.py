"""MLflow writes that never stop or fail the training loop: a buffered logger with a background
sender that survives a tracker outage (`studies.sync` backfills what it missed), its offline stand-in,
and the small loggers `moe.train.loop.train` is given (FanOut, SkipLogged)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from studies.track.tracking import MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS, MAX_PARAMS_PER_BATCH, open_client

log = logging.getLogger(__name__)

MAX_BUFFERED_METRICS = 2_000_000  # ~0.5 GB of Metric objects: a days-long outage must not exhaust memory
FLUSH_TIMEOUT_S = 30.0  # longest a flush waits for MLflow before leaving the rest to studies.sync
# Error codes of a request MLflow understood and refused: retrying cannot help.
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FEATURE_DISABLED",
    }
)


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
                        self.run_id,
                        len(self._metrics),
                        len(self._ops),
                        self.last_error,
                        self.tracking_uri,
                    )
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
                    log.warning(
                        "MLflow run %s: %s answers again; buffered writes delivered",
                        self.run_id,
                        self.tracking_uri,
                    )
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
                        log.warning(
                            "MLflow run %s: %s unreachable (%s: %s); training continues, metrics.jsonl "
                            "keeps every metric, retrying",
                            self.run_id,
                            self.tracking_uri,
                            type(exc).__name__,
                            str(exc)[:300],
                        )
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


class FanOut:
    """One Logger that forwards to several."""

    def __init__(self, *loggers):
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)


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
