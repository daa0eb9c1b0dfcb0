"""Nothing lost, nothing run twice (issue #14): one owner per point, a DONE point's record completed on
skip, status.json current while training, the thread count recorded, no empty sweep on a re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_study, start_study
from mlflow.tracking import MlflowClient

from records.runfiles import read_status, write_status
from records.sweep_record import update_sweep_record
from studies.job import lifecycle, record
from studies.job.execute import run_point

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def uri_of(root: Path) -> str:
    return f"sqlite:///{root / 'outputs' / 'default' / 'mlflow.db'}"


def test_a_point_owned_by_a_live_process_is_skipped_naming_the_owner(compose, shrunk, tmp_path):
    cfg = compose([*shrunk, "granularity=2"])
    first = run_point(cfg, cwd=tmp_path)
    run_dir = Path(first.run_dir)
    with lifecycle.owned(run_dir, job="sweep-a/0"):  # another sweep holds it (another open file: flock)
        busy = run_point(cfg, cwd=tmp_path)
        assert lifecycle.owner_of(run_dir)["job"] == "sweep-a/0"
    assert busy.status == "BUSY" and busy.action == "busy"
    assert f"pid {os.getpid()}" in busy.error and "sweep-a/0" in busy.error
    assert lifecycle.owner_of(run_dir) is None, "the owner released the point"
    assert run_point(cfg, cwd=tmp_path).action == "skip"


def test_an_owner_that_died_does_not_block_the_point(compose, shrunk, tmp_path):
    run_dir = tmp_path / "outputs" / "default" / "runs" / "x"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from studies.job.lifecycle import owned\n"
         f"with owned(__import__('pathlib').Path({str(run_dir)!r}), job='dying'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lifecycle.owner_of(run_dir)["job"] == "dying"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert lifecycle.owner_of(run_dir) is None, "the kernel released the dead owner's lock"
    with lifecycle.owned(run_dir):
        pass


def test_a_done_point_whose_mlflow_run_was_left_running_is_completed_when_skipped(compose, shrunk, tmp_path):
    cfg = compose([*shrunk, "granularity=2"])
    first = run_point(cfg, cwd=tmp_path)
    client = MlflowClient(uri_of(tmp_path))
    # What a kill between status DONE and the MLflow close leaves: a RUNNING run without artifacts.
    client.update_run(first.mlflow_run_id, status="RUNNING")
    again = run_point(cfg, cwd=tmp_path)
    assert again.action == "skip"
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(first.mlflow_run_id)} >= {"summary.json", "metrics.jsonl"}


def test_a_point_killed_after_its_final_metrics_but_before_done_writes_them_once_when_resumed(
    compose, shrunk, tmp_path
):
    cfg = compose([*shrunk, "granularity=2"])
    first = run_point(cfg, cwd=tmp_path)
    run_dir = tmp_path / "outputs" / "default" / "runs" / first.run_key
    # What a kill between the final/* line and DONE leaves: status RUNNING at the last step
    write_status(run_dir, "RUNNING", 20)
    again = run_point(cfg, cwd=tmp_path)
    assert again.action == "resume" and again.status == "DONE"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("final/val_loss_raw" in e for e in events) == 1
    assert sum("final/val_loss_smoothed" in e for e in events) == 1
    history = MlflowClient(uri_of(tmp_path)).get_metric_history(first.mlflow_run_id, "final/val_loss_raw")
    assert len(history) == 1


def test_status_json_keeps_the_step_current_and_records_the_threads(compose, shrunk, tmp_path, monkeypatch):
    monkeypatch.setattr(record, "STATUS_EVERY_S", 0.0)
    seen = []
    cfg = compose([*shrunk, "granularity=2"])
    run_dir_of = {}

    def watch() -> bool:  # polled after every step: read what a person would read
        if run_dir_of:
            status = read_status(run_dir_of["dir"])
            seen.append((status["status"], status["step"], status["threads"]))
        return False

    from studies.job.config import load_run_config
    from studies.job.point import build_point

    run_dir_of["dir"] = build_point(load_run_config(cfg), cwd=tmp_path).run_dir
    run_point(cfg, cwd=tmp_path, stop_requested=watch)
    running = [s for s in seen if s[0] == "RUNNING"]
    assert max(step for _, step, _ in running) >= 16, running
    assert {threads for *_, threads in running} == {torch.get_num_threads()}


@pytest.mark.slow
@pytest.mark.xdist_group("served_sweep")  # the worker that trained conftest.served_sweep reruns it
def test_rerunning_a_finished_sweep_starts_nothing_and_creates_no_sweep_folder_or_parent_run(served_sweep):
    study = served_sweep.tmp / "outputs" / "default"
    sweeps = sorted((study / "multirun").iterdir())
    again = run_study(served_sweep.args, served_sweep.tmp, env={"MOE_THREADS": "1"}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Study 'default': nothing to start, 2/2 points done" in again.stdout
    assert sorted((study / "multirun").iterdir()) == sweeps
    runs = MlflowClient(served_sweep.url).search_runs([served_sweep.experiment_id])
    assert len([r for r in runs if r.data.tags.get("kind") == "sweep"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_sigterm_or_ctrl_c_preempts_the_jobs_ends_the_parent_killed_in_one_line_and_leaves_no_process(
    shrunk, tmp_path, how
):
    args = [
        "-m",
        *shrunk,
        "granularity=1,2",
        "tokens=204800",
        "train.checkpoint_every=5",
        "train.eval_every=1",
        "study.name=sigterm",
    ]
    sweep = start_study(
        args,
        tmp_path,
        env={"MOE_JOBS": "2", "MOE_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    runs = tmp_path / "outputs" / "sigterm" / "runs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        logs = [d / "metrics.jsonl" for d in runs.iterdir()] if runs.is_dir() else []
        if len(logs) == 2 and all(p.exists() and p.stat().st_size > 0 for p in logs):
            break
        time.sleep(0.5)
    else:
        sweep.kill()
        pytest.fail("the jobs did not start training")
    if how == "sigterm":
        sweep.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C: SIGINT to the whole foreground group (jobs and their controllers too)
        os.killpg(sweep.pid, signal.SIGINT)
    out, _ = sweep.communicate(timeout=200)
    assert sweep.returncode == (143 if how == "sigterm" else 130), out[-3000:]
    name = "SIGTERM" if how == "sigterm" else "Ctrl-C"
    assert f"{name}: stopping the sweep's jobs (each checkpoints and records PREEMPTED)" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'sigterm' / 'mlflow.db'}")
    tracked = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert {r.data.tags["kind"]: r.info.status for r in tracked} == {"sweep": "KILLED", "point": "KILLED"}
    statuses = {read_status(d)["status"] for d in runs.iterdir()}
    assert statuses == {"PREEMPTED"}, (statuses, out[-3000:])
    left = subprocess.run(["pgrep", "-g", str(sweep.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left in the sweep's group: {left.stdout}"
    for d in runs.iterdir():
        assert json.loads((d / "status.json").read_text())["reason"].startswith("stopped on request")


def test_resuming_on_another_thread_count_warns_that_the_curve_is_not_bitwise(
    compose, shrunk, tmp_path, capsys
):
    from moe.train.outcome import TrainingInterrupted

    cfg = compose([*shrunk, "granularity=2", "train.checkpoint_every=2"])
    calls = iter(range(1, 1000))
    with pytest.raises(TrainingInterrupted):
        run_point(cfg, cwd=tmp_path, stop_requested=lambda: next(calls) >= 4)
    (run_dir,) = (tmp_path / "outputs" / "default" / "runs").iterdir()
    status = read_status(run_dir)
    write_status(run_dir, status["status"], status["step"], status["reason"], threads=7, world_size=1)
    capsys.readouterr()
    assert run_point(cfg, cwd=tmp_path).action == "resume"
    out = capsys.readouterr().out
    assert f"trained on 7 torch threads before and resumes on {torch.get_num_threads()}" in out


@pytest.mark.slow
def test_ctrl_c_of_an_in_process_sweep_records_the_point_interrupted_and_the_parent_killed_in_one_line(
    shrunk, tmp_path
):
    args = ["-m", *shrunk, "infra=basic", "tokens=204800", "train.eval_every=1", "study.name=ctrl_c"]
    sweep = start_study(
        args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    runs = tmp_path / "outputs" / "ctrl_c" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/metrics.jsonl")) or not list(runs.glob("*/metrics.jsonl"))[0].stat().st_size:
        assert time.monotonic() < deadline and sweep.poll() is None, "the point did not start training"
        time.sleep(0.5)
    os.killpg(sweep.pid, signal.SIGINT)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("Interrupted (Ctrl-C); points stopped part-way resume")
    (run_dir,) = runs.iterdir()
    assert read_status(run_dir)["status"] == "INTERRUPTED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'ctrl_c' / 'mlflow.db'}")
    tracked = client.search_runs([client.get_experiment_by_name("ctrl_c").experiment_id])
    assert {r.data.tags["kind"]: r.info.status for r in tracked} == {"sweep": "KILLED", "point": "KILLED"}


def test_finish_rebuilds_a_done_points_missing_job_record_and_completes_its_mlflow_run(
    compose, shrunk, tmp_path, capsys
):
    from studies.launch.finish import finish_sweep

    cfg = compose([*shrunk, "granularity=2"])
    first = run_point(cfg, cwd=tmp_path)
    run_dir = tmp_path / "outputs" / "default" / "runs" / first.run_key
    client = MlflowClient(uri_of(tmp_path))
    # a job killed after DONE: no point.json, its MLflow run left RUNNING
    client.update_run(first.mlflow_run_id, status="RUNNING")
    sweep_dir = tmp_path / "outputs" / "default" / "multirun" / "killed"
    sweep_dir.mkdir(parents=True)
    update_sweep_record(
        sweep_dir,
        study="default",
        study_dir=str(run_dir.parents[1]),
        tracking_uri=uri_of(tmp_path),
        report=False,
        executor="local",
        jobs=[{"num": 0, "job_id": "7", "variant": first.variant, "run_dir": str(run_dir), "host": "gone"}],
    )
    result = finish_sweep(sweep_dir)
    assert result.done == 1 and result.failed == []
    assert f"point {first.run_key} is DONE; its MLflow run was completed" in capsys.readouterr().out
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
