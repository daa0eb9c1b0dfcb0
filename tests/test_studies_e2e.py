"""End to end: `python -m studies.run -m ...` through the real submitit_local launcher into a temp store."""

from __future__ import annotations

import json

import pytest
from helpers import run_study
from mlflow.tracking import MlflowClient

ENV = {"MOE_JOBS": "2", "MOE_THREADS": "1"}  # two submitit jobs at once, one torch thread each


@pytest.mark.slow
def test_multirun_through_submitit_records_parent_and_child_runs(shrunk, tmp_path):
    db = tmp_path / "store.db"
    proc = run_study(["-m", *shrunk, "granularity=1,4", f"tracking.uri=sqlite:///{db}"], tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 points done" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("default")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kind") == "point"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["variant"] for c in children} == {"moe-E8-k2-G1", "moe-E8-k2-G4"}
    for child in children:
        assert child.info.status == "FINISHED"
        train = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in train] == list(range(1, 21)), "the train loss of every step"
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 6  # steps 1, 2, 4, 8, 10, 20
        assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)
        }

    study_dir = tmp_path / "outputs" / "default"
    (sweep_dir,) = (study_dir / "multirun").iterdir()
    assert list(sweep_dir.glob(".submitit/*/*_log.out")), "jobs did not go through submitit"
    logs = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.out"))
    assert "step 10/20 | tokens 5,120 | loss" in logs and "tok/s | ETA" in logs
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/point.json")]
    assert sorted(r["status"] for r in records) == ["DONE", "DONE"]
    for r in records:
        summary = json.loads((study_dir / "runs" / r["run_key"] / "summary.json").read_text())
        assert summary["parent_run_id"] == parent.info.run_id


@pytest.mark.slow
def test_invalid_point_stops_the_sweep_before_any_job_starts(shrunk, tmp_path):
    proc = run_study(["-m", *shrunk, "granularity=1,3", "infra=basic"], tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 1
    assert "Sweep not started: 1 of 2 sweep points are invalid" in proc.stderr
    assert "granularity=3: ValueError: granularity=3 does not divide" in proc.stderr
    assert not (tmp_path / "outputs" / "default" / "runs").exists()


@pytest.mark.slow
def test_a_point_failing_during_its_run_is_reported_and_the_sweep_exits_non_zero(shrunk, tmp_path):
    # lr 1e6 without clipping passes validation but diverges inside the job; the other point of the
    # sweep still runs, the table shows both, and the exit status is non-zero.
    proc = run_study(
        [
            "-m",
            *shrunk,
            "optim.lr=1e-2,1e6",
            "optim.grad_clip=0",
            "infra=basic",
            "hydra.callbacks.study.report=false",
        ],
        tmp_path,
        env=ENV,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1/2 points done" in proc.stdout
    assert "1 of 2 sweep points failed" in proc.stderr and "NonFiniteLossError" in proc.stderr
    statuses = [
        json.loads(p.read_text())["status"] for p in (tmp_path / "outputs/default/runs").glob("*/status.json")
    ]
    assert sorted(statuses) == ["DONE", "FAILED"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs/default/mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    by_kind = {(r.data.tags["kind"], r.info.status) for r in runs}
    assert by_kind == {("sweep", "FAILED"), ("point", "FINISHED"), ("point", "FAILED")}
    (failed,) = [r for r in runs if r.data.tags["kind"] == "point" and r.info.status == "FAILED"]
    assert "NonFiniteLossError" in failed.data.tags["failure_reason"]
