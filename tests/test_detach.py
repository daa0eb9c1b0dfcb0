"""`--detach`: a sweep that submits its jobs and returns; the end of the sweep (studies.launch.finish) later.

Real `python -m studies.run` processes with the real submitit_local launcher
(SLURM: tests/test_slurm_detached.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers import run_module, run_study
from mlflow.tracking import MlflowClient

from studies.launch.finish import pid_alive
from studies.run import FLAGS

ENV = {"MOE_JOBS": "2", "MOE_THREADS": "1"}  # what every command of these tests runs with


def test_detach_flag_is_short_for_the_launch_detach_key(compose):
    assert FLAGS["--detach"] == "launch.detach=true"
    assert compose([FLAGS["--detach"]]).launch.detach is True
    assert compose([]).launch.detach is False


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--detach"], ["Run not started: launch.detach=true (--detach) needs a sweep (-m)"]),
        (["-m", "granularity=1,2", "infra=basic", "--detach"], ["launch.detach=true", "infra=basic"]),
        (
            ["-m", "granularity=1,2,4", "--detach"],
            ["launch.detach=true with infra=local", "3 points", "hydra.sweeper.max_batch_size=2"],
        ),
    ],
    ids=["single_run", "in_process", "more_points_than_local_slots"],
)
def test_detach_where_the_jobs_could_not_run_on_is_refused_before_anything_starts(
    shrunk, tmp_path, args, fragments
):
    multirun = ["-m"] if "-m" in args else []  # Hydra's -m comes before the overrides
    proc = run_study([*multirun, *shrunk, *(a for a in args if a != "-m")], tmp_path, env=ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    outputs = tmp_path / "outputs" / "default"
    assert not (outputs / "multirun").exists() and not (outputs / "single").exists()
    assert not (outputs / "runs").exists()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_detached_local_sweep_returns_at_once_its_jobs_finish_alone_and_finish_runs_idempotently(
    shrunk, tmp_path
):
    db = tmp_path / "store.db"
    # 200 steps: the jobs are still training when the sweep process has returned
    args = [
        *shrunk,
        "granularity=1,4",
        "tokens=102400",
        "train.eval_every=50",
        f"tracking.uri=sqlite:///{db}",
        "--detach",
    ]
    # capture_output: the call returns only once nothing holds the pipes, so the jobs must not inherit them
    launched = run_study(["-m", *args], tmp_path, env=ENV, timeout=120)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "default" / "multirun").iterdir()
    record = json.loads((sweep_dir / "sweep.json").read_text())
    pids = [job["pid"] for job in record["jobs"]]
    assert any(pid_alive(p) for p in pids), "the jobs must still be running after the sweep returned"
    for job in record["jobs"]:
        assert f"job #{job['num']}: {job['job_id']}, log {job['log']}" in launched.stdout
    assert f"python -m studies.launch.finish {sweep_dir}" in launched.stdout
    assert "points done" not in launched.stdout, "a detached sweep prints no end-of-sweep table"

    client = MlflowClient(f"sqlite:///{db}")
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "RUNNING" and parent.data.tags["kind"] == "sweep"
    too_early = run_module("studies.launch.finish", [str(sweep_dir)], tmp_path, env=ENV)
    if any(pid_alive(p) for p in pids):  # (a fast machine may have finished by now)
        assert too_early.returncode == 2 and "have not ended yet" in too_early.stderr, too_early.stderr
        assert client.get_run(parent.info.run_id).info.status == "RUNNING"

    wait_for(lambda: not any(pid_alive(p) for p in pids), 300, "the detached jobs to end")
    for job in record["jobs"]:
        point = json.loads((sweep_dir / str(job["num"]) / "point.json").read_text())
        assert point["status"] == "DONE"
        # the job imported the project from the sweep's snapshot, not from the working tree
        assert Path(point["code"]) == sweep_dir.resolve() / "code"

    first = run_module("studies.launch.finish", [str(sweep_dir)], tmp_path, env=ENV)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2/2 points done" in first.stdout and "Report (the whole study" in first.stdout
    assert (tmp_path / "outputs" / "default" / "report" / "report.md").exists()
    second = run_module("studies.launch.finish", [str(sweep_dir), "--no-report"], tmp_path, env=ENV)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert len([r for r in runs if r.data.tags["kind"] == "sweep"]) == 1
    assert sorted(r.info.status for r in runs if r.data.tags["kind"] == "point") == ["FINISHED", "FINISHED"]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["points_done"], parent.data.tags["points_failed"]) == ("2", "0")
    assert parent.data.tags["code_snapshot"] == str(sweep_dir.resolve() / "code")
    names = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert names.count("summary.txt") == 1
    finished = json.loads((sweep_dir / "sweep.json").read_text())["finished"]
    assert (finished["points_done"], finished["points_failed"]) == (2, 0)

    status = run_module("studies.status", [str(tmp_path / "outputs" / "default")], tmp_path, env=ENV)
    assert status.returncode == 0, status.stderr
    assert "2/2 points done" in status.stdout and "end of sweep: done at" in status.stdout
    assert len(re.findall(r"DONE\s+200/200", status.stdout)) == 2, status.stdout
