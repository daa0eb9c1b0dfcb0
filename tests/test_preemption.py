"""Preemption through the real submitit_local launcher: USR2 -> checkpoint at a step boundary -> requeue
-> the requeued job resumes (not restarts) and ends with the uninterrupted run's history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import metrics_without_wall_clock, start_study
from mlflow.tracking import MlflowClient

from studies.job.execute import run_point
from studies.job.preemption import Preemption


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def submitit_task(pid: int) -> int | None:
    """The process running the submitit job (what SLURM signals), below the sweep process `pid`."""
    for child in descendants(pid):
        try:
            if b"submitit.core._submit" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def test_preemption_note_defers_submitit_handler_until_hand_over():
    calls = []
    before, before_term = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands in for submitit's
    try:
        note = Preemption()
        note.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert note.requested and calls == [], "the signal is noted, submitit's handler not yet run"
        note.hand_over()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)
        signal.signal(signal.SIGTERM, before_term)


@pytest.mark.slow
def test_usr2_to_a_submitit_job_checkpoints_requeues_and_the_job_resumes(
    compose, shrunk, tmp_path, one_thread
):
    overrides = [
        *shrunk,
        "tokens=61440",
        "train.log_every=1",
        "train.eval_every=20",
        "train.checkpoint_every=1000",
    ]
    reference = run_point(compose([*overrides, f"paths.root={tmp_path / 'ref'}"]), cwd=tmp_path)

    args = [*overrides, "seed=0,1", "hydra.callbacks.study.report=false", "hydra.sweeper.max_batch_size=1"]
    # seed=0,1 in batches of one: the first point is the one preempted, the second shows the sweep goes on
    proc = start_study(
        ["-m", *args],
        tmp_path,
        env={"MOE_JOBS": "1", "MOE_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "outputs" / "default" / "runs" / reference.run_key
    deadline = time.monotonic() + 240
    try:
        while not (
            (run_dir / "metrics.jsonl").exists()
            and (run_dir / "metrics.jsonl").read_text().count('"train/loss"') >= 10
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the job never got going"
            time.sleep(0.05)
        task = submitit_task(proc.pid)
        assert task is not None
        os.kill(task, signal.SIGUSR2)  # what SLURM sends before preemption / the time limit
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "2/2 points done" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "DONE" and summary["resumed_from"] >= 10, "the requeued job must resume"
    logs = "".join(p.read_text() for p in tmp_path.glob("outputs/default/multirun/*/.submitit/*/*_log.*"))
    assert "checkpointing at the end of this step" in logs and "Requeued job" in logs

    assert metrics_without_wall_clock(run_dir / "metrics.jsonl") == metrics_without_wall_clock(
        Path(reference.run_dir) / "metrics.jsonl"
    )
    assert summary["final"]["val/loss"] == reference.val_loss
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'default' / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 121)), "one value per step in the one MLflow run"
