"""The MLflow client side of a study: stores, experiments, runs (start, reopen, end), params.

MLflow run structure, tags and metric names follow docs/outputs.md. Runs are driven through
`MlflowClient` with explicit run ids (no fluent global state), so several can be open in one process.
The background metric logger is studies.track.mlflow_logger; the files it mirrors are records.runfiles.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
# Defaults for this project's processes; the environment may still override them. Many job processes
# share one sqlite file: a connection pool would hold it open between writes. MLflow's HTTP defaults
# (7 retries, backoff factor 2, 120 s timeout) spend ~4 minutes on one request to a dead server;
# MlflowLogger retries on its own schedule and studies.sync backfills, so one request gives up quickly.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def configure_mlflow_env() -> None:
    """Apply MLFLOW_ENV_DEFAULTS where the environment sets nothing (MLflow reads them per request or
    store, so calling this before the first client is enough)."""
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def tracking_uri_of(configured: str | None, study_dir: Path) -> str:
    """The study's tracking URI: tracking.uri where set, else the sqlite store in its folder."""
    return configured or default_tracking_uri(study_dir)


_READY_STORES: set[str] = set()


def open_client(tracking_uri: str) -> MlflowClient:
    """MlflowClient for the URI. The first use of a new sqlite store creates its tables (alembic
    migrations), which fails when several jobs do it at once ("duplicate column name"): a file lock beside
    the db lets one process create them while the others wait (measured in tests/test_concurrency.py)."""
    configure_mlflow_env()
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
    return (
        f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000   "
        "(then open http://127.0.0.1:5000)"
    )


# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training: by this tag
# (the experiment's kind) and, in a URL, by the workflowType parameter (studies.track.study_view).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """Get or create the study's experiment, tagged as model training; tolerate another process creating
    it at the same time.

    artifact_root None lets the tracking server choose (mlflow-artifacts: uploads over HTTP)."""
    for _ in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            location = None if artifact_root is None else Path(artifact_root).resolve().as_uri()
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
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


def end_run(tracking_uri: str, run_id: str | None, ok: bool, *, killed: bool = False) -> bool:
    """Mark the run FINISHED or FAILED (KILLED: stopped by a signal); False (with a warning) if MLflow is
    unreachable or the point has no run: the run's status.json holds the outcome and
    `python -m studies.sync` sets it later."""
    if run_id is None:
        return False
    ended = RunStatus.KILLED if killed else RunStatus.FINISHED if ok else RunStatus.FAILED
    status = RunStatus.to_string(ended)
    try:
        open_client(tracking_uri).set_terminated(run_id, status=status)
        return True
    except Exception as exc:  # noqa: BLE001 - the tracker must not fail a run that trained
        log.warning(
            "MLflow run %s not marked %s (%s: %s); run `python -m studies.sync <study dir>` later",
            run_id,
            status,
            type(exc).__name__,
            str(exc)[:300],
        )
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


def config_params(resolved: Mapping[str, Any], axes: Iterable[str]) -> dict[str, Any]:
    """MLflow params of a resolved point config: flattened, the sweep axes under `axis.` (bare, they would
    shadow the same-named tags, which hold the derived values) and model.moe as moe.*."""
    tree = copy.deepcopy(dict(resolved))
    tree["axis"] = {k: tree.pop(k) for k in axes if k in tree}
    moe = tree.get("model", {}).pop("moe", None)
    flat = flatten(tree)
    flat.update(flatten({"moe": moe}) if moe else {"moe": None})
    return flat


# Resume support (studies.job.execute): continue a point's MLflow run ----------------------------------


def reopen_run(tracking_uri: str, run_id: str) -> bool | None:
    """Set a run back to RUNNING to continue it: True; False if the store has no such run (another
    tracking URI, or deleted); None if MLflow is unreachable (keep the id: the logger retries)."""
    client = open_client(tracking_uri)
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
        open_client(tracking_uri).set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
    except Exception as exc:  # noqa: BLE001 - status.json holds the truth
        log.warning("MLflow run %s not marked KILLED (%s: %s)", run_id, type(exc).__name__, str(exc)[:300])


def logged_steps(tracking_uri: str, run_id: str, keys: Iterable[str]) -> dict[str, int] | None:
    """Per metric key, the highest step the MLflow run already holds (absent: none); None if unreachable."""
    client = open_client(tracking_uri)
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
