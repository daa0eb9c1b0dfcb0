"""A real single-node SLURM cluster (root only, else skipped): up/down, submitit jobs, sbatch sweeps."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import cloudpickle
import pytest
import submitit
from helpers import REPO, run_study, slurm_executor, slurm_script, slurm_unavailable, wait_for_sacct
from mlflow.tracking import MlflowClient

# one worker runs every SLURM test (pytest-xdist): one test cluster at a time on this host
pytestmark = pytest.mark.xdist_group("slurm")

PIDFILES = ("munge/munged.pid", "run/mariadbd.pid", "run/slurmdbd.pid", "run/slurmctld.pid", "run/slurmd.pid")

# Jobs unpickle the functions below in a fresh interpreter that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def running_daemons(state: Path) -> list[str]:
    alive = []
    for rel in PIDFILES:
        path = state / rel
        if path.exists() and path.read_text().strip():
            pid = int(path.read_text())
            try:
                os.kill(pid, 0)
                alive.append(f"{rel}:{pid}")
            except ProcessLookupError:
                pass
    return alive


# Job bodies ----------------------------------------------------------------------------------------


def double_in_slurm(x: int) -> tuple[int, str]:
    return 2 * x, os.environ["SLURM_JOB_ID"]


def fail_in_slurm() -> None:
    raise ValueError("deliberate failure inside the job")


# Tests ---------------------------------------------------------------------------------------------


def test_slurm_profile_selects_submitit_slurm_and_passes_its_keys(compose):
    overrides = [
        "infra=slurm",
        "infra.threads=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=lab",
        "+hydra.launcher.additional_parameters.constraint=h100",
        "hydra.launcher.setup=[module load cuda]",
    ]
    launcher = compose(overrides, hydra=True).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.qos) == ("gpu", "lab", None)
    assert launcher.cpus_per_task == 4, "cpus_per_task follows infra.threads"
    assert launcher.additional_parameters == {"constraint": "h100"}
    assert list(launcher.setup) == ["module load cuda"]
    assert (launcher.max_num_timeout, launcher.signal_delay_s) == (3, 120)


@pytest.mark.slow
def test_up_and_down_are_idempotent_and_leave_no_daemon_running(tmp_path):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        first = slurm_script("up.sh", tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        pids = running_daemons(tmp_path)
        assert len(pids) == len(PIDFILES), pids
        again = slurm_script("up.sh", tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert running_daemons(tmp_path) == pids, "a second up.sh must keep the running daemons"
    finally:
        down = slurm_script("down.sh", tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    assert running_daemons(tmp_path) == []
    assert slurm_script("down.sh", tmp_path).returncode == 0


@pytest.mark.slow
def test_submitit_job_runs_through_sbatch_and_sacct_reports_completed(cluster, tmp_path):
    executor = slurm_executor(tmp_path)
    assert executor.cluster == "slurm"
    job = executor.submit(double_in_slurm, 21)
    assert job.result() == (42, job.job_id)
    assert wait_for_sacct(job.job_id, ["COMPLETED"]) == ["COMPLETED"]


@pytest.mark.slow
def test_failing_job_raises_in_submitit_and_sacct_reports_failed(cluster, tmp_path):
    job = slurm_executor(tmp_path).submit(fail_in_slurm)
    with pytest.raises(submitit.core.utils.FailedJobError, match="deliberate failure inside the job"):
        job.result()
    assert wait_for_sacct(job.job_id, ["FAILED"]) == ["FAILED"]


@pytest.mark.slow
def test_granularity_sweep_runs_through_sbatch_into_mlflow(cluster, shrunk, tmp_path):
    db = tmp_path / "store.db"
    args = [
        *shrunk,
        "granularity=1,8",
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        f"tracking.uri=sqlite:///{db}",
    ]
    proc = run_study(["-m", *args], tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (sweep_dir,) = (tmp_path / "outputs" / "default" / "multirun").iterdir()
    tasks = [re.fullmatch(r"(\d+)_(\d+)", p.name) for p in (sweep_dir / ".submitit").iterdir()]
    array_ids = {m[1] for m in tasks if m}
    assert len(array_ids) == 1, f"the sweep must be one sbatch job array: {tasks}"
    (array_id,) = array_ids
    (sbatch_script,) = (sweep_dir / ".submitit").glob(".submission_file_*.sh")
    assert {"#SBATCH --array=0-1%2", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=2GB"} <= set(
        sbatch_script.read_text().splitlines()
    )
    assert wait_for_sacct(array_id, ["COMPLETED", "COMPLETED"]) == ["COMPLETED", "COMPLETED"]

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    children = [r for r in runs if r.data.tags.get("kind") == "point"]
    assert sorted(c.data.tags["variant"] for c in children) == ["moe-E8-k2-G1", "moe-E8-k2-G8"]
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]


@pytest.mark.slow
def test_a_point_on_two_slurm_tasks_trains_data_parallel_into_one_mlflow_run(cluster, shrunk, tmp_path):
    db = tmp_path / "store.db"
    args = [
        *shrunk,
        "granularity=8",
        "infra=slurm",
        "infra.tasks_per_node=2",
        "hydra.launcher.mem_gb=2",
        f"tracking.uri=sqlite:///{db}",
    ]
    proc = run_study(["-m", *args], tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (sweep_dir,) = (tmp_path / "outputs" / "default" / "multirun").iterdir()
    (sbatch_script,) = (sweep_dir / ".submitit").glob(".submission_file_*.sh")
    assert "#SBATCH --ntasks-per-node=2" in sbatch_script.read_text().splitlines()
    (summary_path,) = (tmp_path / "outputs" / "default" / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "DONE" and summary["ranks"] == 2  # both srun tasks joined one group
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    train = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in train] == list(range(1, 21)), "each step once: rank 0 alone logged"
