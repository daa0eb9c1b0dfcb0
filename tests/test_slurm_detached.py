"""Detached sweeps on a real SLURM cluster (root only, else skipped): the afterany job, the code snapshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, run_module, sacct_states, start_study, wait_for_sacct
from mlflow.tracking import MlflowClient

from studies.launch.snapshot import PACKAGES

# one worker runs every SLURM test (pytest-xdist): one test cluster at a time on this host
pytestmark = pytest.mark.xdist_group("slurm")


@pytest.mark.slow
def test_a_detached_slurm_sweep_returns_and_its_afterany_job_finishes_the_sweep(cluster, shrunk, tmp_path):
    db = tmp_path / "store.db"
    args = [
        *shrunk,
        "granularity=1,8",
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        f"tracking.uri=sqlite:///{db}",
        "--detach",
    ]
    proc = start_study(
        ["-m", *args],
        tmp_path,
        env={"PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "default" / "multirun").iterdir()
    record = json.loads((sweep_dir / "sweep.json").read_text())
    array_id = record["jobs"][0]["job_id"].split("_")[0]
    finisher = record["finish_job"]
    assert finisher["dependency"] == f"afterany:{array_id}"
    assert f"end of sweep: SLURM job {finisher['job_id']} (afterany:{array_id})" in out
    assert "points done" not in out, "the sweep returned without waiting for its jobs"
    finish_script = sweep_dir / ".submitit" / finisher["job_id"] / f"{finisher['job_id']}_submission.sh"
    assert f"#SBATCH --dependency=afterany:{array_id}" in finish_script.read_text().splitlines()

    assert wait_for_sacct(finisher["job_id"], ["COMPLETED"], timeout=400) == ["COMPLETED"]
    assert sacct_states(array_id) == ["COMPLETED", "COMPLETED"]
    client = MlflowClient(f"sqlite:///{db}")
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["points_done"] == "2"
    assert "summary.txt" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert (tmp_path / "outputs" / "default" / "report" / "report.md").exists()
    for job in record["jobs"]:
        point = json.loads((sweep_dir / str(job["num"]) / "point.json").read_text())
        assert point["status"] == "DONE" and Path(point["code"]) == sweep_dir.resolve() / "code"

    status = run_module("studies.status", [str(sweep_dir)], env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "2/2 points done" in status.stdout and "end of sweep: done at" in status.stdout
    assert len(re.findall(r"DONE\s+20/20 .* COMPLETED", status.stdout)) == 2, status.stdout


@pytest.mark.slow
def test_a_queued_slurm_job_runs_the_code_of_its_launch_not_a_later_edit(cluster, shrunk, tmp_path):
    tree = tmp_path / "tree"  # a working tree of the project that is edited while the job waits
    for name in PACKAGES:
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    db = tmp_path / "store.db"
    args = [
        *shrunk,
        "granularity=2",
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        f"tracking.uri=sqlite:///{db}",
        "+hydra.launcher.additional_parameters.hold=true",
        "hydra.callbacks.study.report=false",
    ]
    proc = start_study(
        ["-m", *args],
        tmp_path,
        env={"PYTHONPATH": str(tree)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            jobs := [p for p in tmp_path.glob("outputs/default/multirun/*/.submitit/*") if p.is_dir()]
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the job was never submitted"
            time.sleep(0.2)
        (job_dir,) = jobs
        assert wait_for_sacct(job_dir.name, ["PENDING"]) == ["PENDING"], "held: queued, not started"
        # an edit after launch that would break any job importing the working tree
        (tree / "studies" / "job" / "execute.py").write_text("raise RuntimeError('edited after launch')\n")
        subprocess.run(["scontrol", "release", job_dir.name], check=True)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "1/1 points done" in out
    sweep_dir = job_dir.parents[1]
    point = json.loads((sweep_dir / "0" / "point.json").read_text())
    assert point["status"] == "DONE" and Path(point["code"]) == sweep_dir.resolve() / "code"
    assert "edited after launch" not in (sweep_dir / "code" / "studies" / "job" / "execute.py").read_text()
