"""`python -m studies.sync <study dir> [--tracking-uri URI]`: backfill MLflow from the study's run folders.

Every `runs/<run key>/` holds the source of truth (metrics.jsonl, status.json, summary.json, config.yaml,
docs/outputs.md). For each one, sync finds the point's MLflow run (summary.json's `mlflow_run_id`, else
the newest run tagged `run_key` in the study's experiment, else it creates one), then adds what MLflow
lacks: metric values whose (key, step) is not in the run's history, the final status, the failure
reason, and the artifacts. It compares before it writes, so a second sync adds nothing. Values already
in MLflow are never overwritten; a (key, step) whose value differs is counted as a conflict.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from records import runfiles
from studies.job.point import AXES
from studies.track import tracking
from studies.track.tracking import MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS, MAX_PARAMS_PER_BATCH

TERMINAL = {"DONE": "FINISHED", "FAILED": "FAILED"}  # status.json -> MLflow run status
ARTIFACTS = (runfiles.CONFIG, runfiles.METRICS, runfiles.SUMMARY)


@dataclass(frozen=True)
class RunSync:
    run_key: str
    """The run folder's name."""
    run_id: str | None
    """MLflow run synced (None: skipped)."""
    created: bool = False
    """Whether sync created the MLflow run (none existed for the run key)."""
    metrics_added: int = 0
    """Metric values logged by this sync."""
    conflicts: list[tuple[str, int]] = field(default_factory=list)
    """(key, step) whose MLflow value differs from metrics.jsonl (left unchanged)."""
    status_set: str | None = None
    """MLflow status written by this sync, if it changed."""
    artifacts_added: list[str] = field(default_factory=list)
    """Artifacts uploaded because MLflow lacked them or held a different size."""
    skipped: str | None = None
    """Why the folder was not synced."""

    @property
    def changed(self) -> bool:
        return bool(self.created or self.metrics_added or self.status_set or self.artifacts_added)


def read_metrics(path: Path) -> dict[tuple[str, int], float]:
    """{(key, step): value} from metrics.jsonl (records.runfiles' rule for broken lines)."""
    return runfiles.metric_values(runfiles.read_events(path))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _read_json(path: Path) -> dict[str, Any]:
    return runfiles.read_json(path) or {}


def _study_and_uri(run_dir: Path, study_dir: Path, tracking_uri: str | None) -> tuple[str, str]:
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    study = (config.get("study") or {}).get("name") or study_dir.name
    uri = (
        tracking_uri or (config.get("tracking") or {}).get("uri") or tracking.default_tracking_uri(study_dir)
    )
    return study, uri


def find_run_id(client: MlflowClient, study: str, run_key: str, summary: Mapping[str, Any]) -> str | None:
    """The point's MLflow run: the id the run recorded if this store has it, else the newest point run
    tagged with its key; None if there is none."""
    if summary.get("mlflow_run_id"):
        try:
            return client.get_run(summary["mlflow_run_id"]).info.run_id
        except MlflowException as exc:  # another store (e.g. moved to a server): look the key up
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.run_key = '{run_key}' and tags.kind = 'point'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def point_params(config: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The params `studies.job.point` logs, rebuilt from config.yaml and summary.json: the flattened resolved
    config with the axes under `axis.` and model.moe as moe.*, plus accounting and the data identity."""
    params = tracking.config_params(config, AXES)
    params.update(summary.get("params") or {})
    data = summary.get("data") or {}
    params.update(
        {f"data.{k}": data[k] for k in ("fingerprint", "unigram_entropy", "val_windows") if k in data}
    )
    return params


def _create_run(client: MlflowClient, uri: str, study: str, study_dir: Path, run_dir: Path) -> str:
    """An MLflow run for a point that never got one (MLflow was down when it started)."""
    summary = _read_json(run_dir / "summary.json")
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    exp = tracking.experiment_id(
        client, study, None if tracking.is_server(uri) else study_dir / "mlartifacts"
    )
    tags = {
        "kind": "point",
        "study": study,
        **(summary.get("tags") or {}),
        "run_key": run_dir.name,
        "synced_from": "studies.sync",
    }
    if summary.get("parent_run_id"):  # the sweep's run, if this store has it
        try:
            tags["mlflow.parentRunId"] = client.get_run(summary["parent_run_id"]).info.run_id
        except MlflowException:
            pass
    run_id = client.create_run(
        exp, run_name=f"{tags.get('variant', 'point')}-{run_dir.name}", tags=tags
    ).info.run_id
    params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(point_params(config, summary).items())]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])
    return run_id


def complete_run(uri: str, run_dir: Path, study: str, study_dir: Path) -> RunSync | None:
    """Bring a DONE point's MLflow run up to date unless it is FINISHED already (a kill between DONE and
    the MLflow close leaves it RUNNING); None when there was nothing to do."""
    client = tracking.open_client(uri)
    run_id = (runfiles.read_summary(run_dir) or {}).get("mlflow_run_id")
    if run_id and client.get_run(run_id).info.status == "FINISHED":
        return None
    return sync_run(client, uri, run_dir, study, study_dir)


def sync_run(client: MlflowClient, uri: str, run_dir: Path, study: str, study_dir: Path) -> RunSync:
    """Bring one point's MLflow run up to date with its folder (see the module docstring)."""
    key = run_dir.name
    summary = _read_json(run_dir / "summary.json")
    status = _read_json(run_dir / "status.json")
    local = read_metrics(run_dir / "metrics.jsonl")
    run_id = find_run_id(client, study, key, summary)
    created = False
    if run_id is None:
        if not local and not summary:
            return RunSync(key, None, skipped="no MLflow run and nothing logged yet")
        run_id, created = _create_run(client, uri, study, study_dir, run_dir), True

    remote: dict[tuple[str, int], float] = {}
    for metric_key in sorted({k for k, _ in local}):
        for m in client.get_metric_history(run_id, metric_key):
            remote[(m.key, m.step)] = m.value
    missing = [(k, s, v) for (k, s), v in sorted(local.items()) if (k, s) not in remote]
    conflicts = [
        (k, s) for (k, s), v in sorted(local.items()) if (k, s) in remote and not _same(remote[k, s], v)
    ]
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, s) for k, s, v in missing]
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])

    run = client.get_run(run_id)
    state = status.get("status")
    status_set = None
    if (
        state == "FAILED"
        and status.get("reason")
        and run.data.tags.get("failure_reason") != status["reason"][:5000]
    ):
        client.log_batch(run_id, tags=[RunTag("failure_reason", status["reason"][:5000])])
    if state in TERMINAL and run.info.status != TERMINAL[state]:
        client.set_terminated(run_id, status=TERMINAL[state])
        status_set = TERMINAL[state]

    added = []
    if state in TERMINAL:  # a running job still appends to its files: upload the final versions only
        present = {a.path: a.file_size for a in client.list_artifacts(run_id)}
        for name in ARTIFACTS:
            path = run_dir / name
            if path.exists() and present.get(name) != path.stat().st_size:
                client.log_artifact(run_id, str(path))
                added.append(name)
    return RunSync(key, run_id, created, len(batch), conflicts, status_set, added)


def sync_study(study_dir: Path, tracking_uri: str | None = None) -> list[RunSync]:
    """Sync every runs/<run key>/ of the study; the URI comes from each run's config.yaml unless given."""
    study_dir = Path(study_dir)
    if not runfiles.runs_dir(study_dir).is_dir():
        raise ValueError(f"{study_dir} has no runs/ folder: not a study directory (outputs/<study>/)")
    results, clients = [], {}
    for run_dir in runfiles.run_dirs(study_dir):
        study, uri = _study_and_uri(run_dir, study_dir, tracking_uri)
        client = clients.setdefault(uri, tracking.open_client(uri))
        results.append(sync_run(client, uri, run_dir, study, study_dir))
    return results


def format_results(results: list[RunSync]) -> str:
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"  {r.run_key}: skipped ({r.skipped})")
            continue
        what = [f"+{r.metrics_added} metrics"]
        if r.created:
            what.insert(0, "created run")
        if r.status_set:
            what.append(f"status {r.status_set}")
        if r.artifacts_added:
            what.append(f"artifacts {', '.join(r.artifacts_added)}")
        if r.conflicts:
            what.append(
                f"{len(r.conflicts)} (key, step) differ from MLflow (kept MLflow's), e.g. {r.conflicts[0]}"
            )
        lines.append(f"  {r.run_key} -> run {r.run_id}: {'; '.join(what)}")
    total = sum(r.metrics_added for r in results)
    changed = sum(r.changed for r in results)
    return f"Synced {len(results)} runs: {changed} changed, {total} metric values added\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studies.sync",
        description="Backfill MLflow from <study dir>/runs/*/ (metrics.jsonl is the source of truth); "
        "idempotent: a second sync adds nothing.",
    )
    parser.add_argument("study_dir", type=Path, help="the study directory, e.g. outputs/granularity")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: each run's tracking.uri, else sqlite:///<study dir>/mlflow.db)",
    )
    args = parser.parse_args(argv)
    try:
        results = sync_study(args.study_dir, args.tracking_uri)
    except ValueError as exc:
        print(f"studies.sync: {exc}", file=sys.stderr)
        return 2
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
