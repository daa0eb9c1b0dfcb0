"""Several job processes writing to one sqlite MLflow store at once lose nothing (NullPool, sqlite's busy
timeout and the logger's retries; studies/track/tracking.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_study
from mlflow.tracking import MlflowClient

from studies.sync import read_metrics
from studies.track import mlflow_logger, tracking

REPO = Path(__file__).resolve().parents[1]
JOBS = 4
STEPS = 100
KEYS = ("train/loss", "lr", "tokens", "router/top1_mass", "router/layer0/imbalance")


def worker(uri: str, study: str, index: int, start_at: float, parent_run_id: str, out: str) -> None:
    """One job: the calls run_point makes (run, params, tags, metrics every step, artifact, end), started
    at the same wall-clock time as the others, with a flush interval short enough to collide."""
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    run_id = tracking.start_run(
        uri,
        study,
        Path(out).parent / "artifacts",
        run_name=f"job{index}",
        tags={"kind": "point", "job": str(index)},
        parent_run_id=parent_run_id,
    )
    logger = mlflow_logger.MlflowLogger(uri, run_id, flush_every_s=0.01)
    logger.log_params({f"p{i}": i * index for i in range(150)})  # two log_batch calls of params
    logger.set_tags({"variant": f"v{index}"})
    for step in range(1, STEPS + 1):
        logger.log_metrics({key: index * 1000 + step + k / 10 for k, key in enumerate(KEYS)}, step)
        time.sleep(0.001)
    t_logged = time.perf_counter()
    Path(out).write_text(json.dumps({"run_id": run_id}))
    delivered = logger.log_artifacts([Path(out)])
    ended = tracking.end_run(uri, run_id, ok=True)
    Path(out).write_text(
        json.dumps(
            {
                "run_id": run_id,
                "delivered": delivered,
                "ended": ended,
                "rejected": logger.rejected,
                "dropped": logger.dropped_metrics,
                "log_s": t_logged - t0,
                "total_s": time.perf_counter() - t0,
            }
        )
    )


def run_jobs(uri: str, tmp_path: Path, parent_run_id: str = "") -> list[dict]:
    start_at = time.time() + 8.0  # every process imported and waiting
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    procs = []
    for i in range(JOBS):
        code = (
            f"from test_concurrency import worker; worker({uri!r}, 'conc', {i}, {start_at}, "
            f"{parent_run_id!r}, {str(tmp_path / f'job{i}.json')!r})"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env={**os.environ, "PYTHONPATH": path},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(JOBS)]
    print("per job: " + ", ".join(f"log {r['log_s']:.1f} s / total {r['total_s']:.1f} s" for r in results))
    return results


def assert_every_write_present(uri: str, results: list[dict]) -> None:
    client = MlflowClient(uri)
    for index, result in enumerate(results):
        assert result["delivered"] and result["ended"] and not result["rejected"] and not result["dropped"]
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"p{i}": str(i * index) for i in range(150)}
        assert run.data.tags["variant"] == f"v{index}"
        for k, key in enumerate(KEYS):
            history = {m.step: m.value for m in client.get_metric_history(result["run_id"], key)}
            assert history == {step: index * 1000 + step + k / 10 for step in range(1, STEPS + 1)}, key
        assert [a.path for a in client.list_artifacts(result["run_id"])] == [f"job{index}.json"]


def test_four_processes_on_one_sqlite_store_lose_no_metric(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # As in a sweep: the submitting process creates the store and the parent run before jobs start.
    parent = tracking.start_run(uri, "conc", tmp_path / "artifacts", run_name="sweep", tags={"kind": "sweep"})
    results = run_jobs(uri, tmp_path, parent)
    assert_every_write_present(uri, results)
    children = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("conc").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert len(children) == JOBS


@pytest.mark.slow
def test_four_processes_creating_a_new_sqlite_store_together_lose_nothing(tmp_path):
    # Without the file lock in tracking.open_client, MLflow's table creation races ("duplicate column
    # name: step", alembic "expected to match one row") and jobs crash.
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    assert_every_write_present(uri, run_jobs(uri, tmp_path))


@pytest.mark.slow
def test_four_job_sweep_through_submitit_records_every_metric(shrunk, tmp_path):
    proc = run_study(
        [
            "-m",
            *shrunk,
            "seed=0,1,2,3",
            "train.log_every=1",
            "tracking.flush_every_s=0.05",
            "hydra.callbacks.study.report=false",
        ],
        tmp_path,
        env={"MOE_JOBS": "4", "MOE_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "outputs" / "default"
    client = MlflowClient(tracking.default_tracking_uri(study_dir))
    run_dirs = sorted((study_dir / "runs").iterdir())
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        local = read_metrics(run_dir / "metrics.jsonl")
        remote = {
            (m.key, m.step): m.value
            for key in {k for k, _ in local}
            for m in client.get_metric_history(summary["mlflow_run_id"], key)
        }
        assert remote == local and client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
