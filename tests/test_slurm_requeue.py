"""SLURM requeue on a real cluster (root only, else skipped): preempted jobs and sweep points resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from helpers import REPO, metrics_without_wall_clock, run_study, slurm_executor, start_study, wait_for_sacct
from mlflow.tracking import MlflowClient

from moe.train.checkpoint import list_checkpoints
from studies.job.execute import run_point

# one worker runs every SLURM test (pytest-xdist): one test cluster at a time on this host
pytestmark = pytest.mark.xdist_group("slurm")

# Jobs unpickle the functions below in a fresh interpreter that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SquareSum(submitit.helpers.Checkpointable):
    """Sums i*i for i < n, one step at a time; on preemption, resubmits itself from the step it reached."""

    def __call__(self, log: str, n: int, step: int = 0, total: int = 0) -> int:
        self.progress = (step, total)
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        for i in range(step, n):
            # Hold the checkpoint signal while a step is half done (state updated, log line not written).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
            self.progress = (i + 1, self.progress[1] + i * i)
            with open(log, "a") as f:
                f.write(f"{attempt} {i}\n")
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
            time.sleep(0.25)
        return self.progress[1]

    def checkpoint(
        self, log: str, n: int, step: int = 0, total: int = 0
    ) -> submitit.helpers.DelayedSubmission:
        step, total = self.progress
        return submitit.helpers.DelayedSubmission(self, log, n, step=step, total=total)


@pytest.mark.slow
def test_preempted_checkpointable_job_is_requeued_and_resumes_from_its_checkpoint(cluster, tmp_path):
    log, n = tmp_path / "steps.txt", 24
    job = slurm_executor(tmp_path).submit(SquareSum(), str(log), n)
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline, f"job never got going: {job.state}"
        time.sleep(0.2)
    # What SLURM sends before preemption or the time limit (--signal=USR2@signal_delay_s): submitit
    # pickles checkpoint()'s submission and runs `scontrol requeue` on its own job.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    # While the job requeues, sacct can briefly report the first attempt's end (COMPLETED): submitit
    # would then read a result that the second attempt has not written yet. Wait for the result file.
    deadline = time.monotonic() + 120
    while not job.paths.result_pickle.exists():
        assert time.monotonic() < deadline, f"the requeued job never finished: {job.state}"
        time.sleep(0.2)
    assert job.result() == sum(i * i for i in range(n))
    steps = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    first = [i for attempt, i in steps if attempt == 0]
    resumed = [i for attempt, i in steps if attempt == 1]
    assert first == list(range(len(first))) and 4 <= len(first) < n, steps
    assert resumed == list(range(len(first), n)), "the second attempt must go on where the first stopped"
    expected = ["REQUEUED", "COMPLETED"]
    assert wait_for_sacct(job.job_id, expected, attempts=True) == expected


def interrupted_sweep(args: list[str], cwd: Path, interrupt: list[str], timeout: float = 400):
    """Start `studies.run -m args` on the cluster, wait until its one point logged 10 training steps,
    run `interrupt + [job id]`, and wait for the sweep: (process, stdout, stderr, run dir, job dir)."""
    proc = start_study(
        ["-m", *args],
        cwd,
        env={"PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    try:
        while True:
            logs = list(cwd.glob("outputs/default/runs/*/metrics.jsonl"))
            if logs and logs[0].read_text().count('"train/loss"') >= 10:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the job never got going"
            time.sleep(0.1)
        # submitit submits a one-point sweep as a plain job, not an array: the folder is the job id
        (job_dir,) = [p for p in cwd.glob("outputs/default/multirun/*/.submitit/*") if p.is_dir()]
        subprocess.run([*interrupt, job_dir.name], check=True)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, out, err, logs[0].parent, job_dir


@pytest.mark.slow
def test_time_limited_sweep_point_is_requeued_resumes_and_matches_the_uninterrupted_run(
    cluster, compose, shrunk, tmp_path, one_thread
):
    """The path a user relies on: USR2 before the time limit -> checkpoint at a step boundary -> submitit
    requeues (max_num_timeout, default 3) -> the same sbatch job resumes the point into its MLflow run."""
    overrides = [
        *shrunk,
        "granularity=8",
        "tokens=61440",
        "train.log_every=1",
        "train.eval_every=20",
        "train.checkpoint_every=1000",  # the only checkpoint is the one the signal asks for
    ]
    reference = run_point(compose([*overrides, f"paths.root={tmp_path / 'ref'}"]), cwd=tmp_path)

    db = tmp_path / "store.db"
    # timeout_min below submitit's 10-minute margin: it counts any USR2 as the time-limit warning, which
    # is what SLURM sends signal_delay_s before --time (the test sends it earlier, at a known step).
    args = [
        *overrides,
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=5",
        "hydra.callbacks.study.report=false",
        f"tracking.uri=sqlite:///{db}",
    ]
    # How SLURM delivers --signal=USR2@signal_delay_s (and submitit's own SlurmJob._interrupt(timeout=True))
    proc, out, err, run_dir, job_dir = interrupted_sweep(args, tmp_path, ["scancel", "--signal=USR2"], 300)
    assert run_dir.name == reference.run_key
    metrics = run_dir / "metrics.jsonl"
    job_id = job_dir.name
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "1/1 points done" in out, out[-3000:]

    expected = ["REQUEUED", "COMPLETED"]
    assert wait_for_sacct(job_id, expected, attempts=True) == expected
    logs = "".join(p.read_text() for p in job_dir.glob("*_log.*"))
    assert "checkpointing at the end of this step" in logs
    assert "this job is timed-out" in logs and f"Requeued job {job_id} (2 remaining timeouts)" in logs, logs

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "DONE" and summary["resumed_from"] >= 10, "the requeued job must resume"

    assert metrics_without_wall_clock(metrics) == metrics_without_wall_clock(
        Path(reference.run_dir) / "metrics.jsonl"
    ), "the resumed history must be the uninterrupted one, bitwise (one thread, CPU fp32)"
    assert summary["final"]["val/loss"] == reference.val_loss
    assert summary["final"]["train/loss"] == reference.train_loss

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    (child,) = [r for r in runs if r.data.tags.get("kind") == "point"]
    assert child.info.run_id == summary["mlflow_run_id"] and child.info.status == "FINISHED"
    assert child.data.tags["resumed_from_step"] == str(summary["resumed_from"])
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 121)), "one value per step in the one MLflow run"
    assert child.data.metrics["val/loss"] == reference.val_loss


def requeued_point(args: list[str], cwd: Path) -> tuple[Path, dict]:
    """Run a one-point sweep, `scontrol requeue` its job after 10 steps, check that the sweep ended well
    and that the point checkpointed on SIGTERM: (run dir, its summary.json)."""
    proc, out, err, run_dir, job_dir = interrupted_sweep(args, cwd, ["scontrol", "requeue"])
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "1/1 points done" in out, out[-3000:]
    logs = "".join(p.read_text() for p in job_dir.glob("*_log.*"))
    assert "SIGTERM received: checkpointing at the end of this step" in logs, logs[-3000:]
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_scontrol_requeue_checkpoints_on_sigterm_and_the_requeued_job_resumes(cluster, shrunk, tmp_path):
    """What PreemptMode=REQUEUE does to a running point (SIGTERM, KillWait, then SIGKILL; the same job
    id queued again): the point checkpoints at its next step, is PREEMPTED, and the requeued job resumes
    it to DONE instead of retraining from its last periodic checkpoint."""
    db = tmp_path / "store.db"
    args = [
        *shrunk,
        "granularity=2",
        "tokens=61440",
        "train.log_every=1",
        "train.checkpoint_every=1000",
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=5",
        "hydra.callbacks.study.report=false",
        f"tracking.uri=sqlite:///{db}",
    ]
    _, summary = requeued_point(args, tmp_path)
    assert summary["status"] == "DONE" and summary["resumed_from"] >= 10, "the requeued job must resume"


@pytest.mark.slow
def test_a_sharded_two_task_point_requeued_by_scontrol_resumes_from_its_dcp_checkpoint_on_the_same_curve(
    cluster, shrunk, tmp_path
):
    """The requeue guarantee for sharded runs: FSDP x EP=2 on two srun tasks, SIGTERM to both, one DCP
    checkpoint at the step they agreed on, and the requeued job resumes it to DONE on the curve of the
    same layout left alone (two local tasks)."""
    sharded = [
        *shrunk,
        "granularity=2",
        "tokens=61440",
        "train.log_every=1",
        "train.checkpoint_every=1000",
        "infra.tasks_per_node=2",
        "parallel.mode=fsdp",
        "parallel.ep=2",
        "hydra.callbacks.study.report=false",
    ]
    ref = run_study(
        ["-m", *sharded, "infra=local", "launch.progress=off", f"paths.root={tmp_path / 'ref'}"],
        tmp_path,
        env={"PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    (ref_metrics,) = (tmp_path / "ref" / "default" / "runs").glob("*/metrics.jsonl")
    db = tmp_path / "store.db"
    args = [
        *sharded,
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=5",
        f"tracking.uri=sqlite:///{db}",
    ]
    run_dir, summary = requeued_point(args, tmp_path)
    assert summary["status"] == "DONE" and summary["ranks"] == 2
    assert summary["resumed_from"] >= 10, "the requeued job must resume from the preemption checkpoint"
    assert [p.name for _, p in list_checkpoints(run_dir / "checkpoints")][0] == "step_000000120.dcp"

    got = metrics_without_wall_clock(run_dir / "metrics.jsonl")
    assert [e["step"] for e in got if "train/loss" in e] == list(range(1, 121)), "each step once"
    assert got == metrics_without_wall_clock(ref_metrics), "the uninterrupted run's history, bitwise"
