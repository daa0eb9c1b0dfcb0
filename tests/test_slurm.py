"""A real single-node SLURM cluster (scripts/slurm/up.sh): submitit jobs, accounting, requeue, a study sweep.

Needs root and Debian's packages (up.sh installs them with apt-get); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from mlflow.tracking import MlflowClient

from moe.checkpoint import list_checkpoints
from moe.evaluation import WALL_CLOCK_METRICS
from studies.execute import run_point

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
PIDFILES = ("munge/munged.pid", "run/mariadbd.pid", "run/slurmdbd.pid", "run/slurmctld.pid", "run/slurmd.pid")

# Jobs unpickle the functions below in a fresh interpreter that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def cluster_unavailable() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "the test cluster needs root (daemons and jobs run as root)"
    if not (shutil.which("slurmctld") or (shutil.which("apt-get") and shutil.which("dpkg-query"))):
        return "neither SLURM nor apt-get to install it is available"
    return None


def free_port_base(count: int = 4) -> int:
    """First of `count` consecutive free TCP ports on 127.0.0.1 (slurmctld, slurmd, slurmdbd, mariadb)."""
    for base in range(20000 + os.getpid() % 1000 * 20, 60000, 20):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def script(name: str, state: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOE_SLURM_PORT": str(free_port_base())}
    return subprocess.run(
        [SCRIPTS / name, str(state)], env=env, capture_output=True, text=True, timeout=timeout
    )


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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running cluster for the module; SLURM_CONF points sbatch/sacct (and submitit) at it."""
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    up = script("up.sh", state)
    if up.returncode != 0:
        script("down.sh", state)
        pytest.fail(f"up.sh failed:\n{up.stdout}\n{up.stderr}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(state / "etc" / "slurm.conf"))
        yield state
    script("down.sh", state)


def sacct_states(job_id: str, attempts: bool = False) -> list[str]:
    """Accounting states of a job's allocation (every attempt with `attempts`), oldest first."""
    args = ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id] + (["--duplicates"] if attempts else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for_sacct(
    job_id: str, expected: list[str], attempts: bool = False, timeout: float = 30
) -> list[str]:
    """sacct records a job's end a moment after submitit sees its result: poll until it shows `expected`."""
    deadline = time.monotonic() + timeout
    while (states := sacct_states(job_id, attempts)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return states


def make_executor(folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder)
    executor.update_parameters(timeout_min=60, cpus_per_task=1, mem_gb=1, **params)
    return executor


# Job bodies ----------------------------------------------------------------------------------------


def double_in_slurm(x: int) -> tuple[int, str]:
    return 2 * x, os.environ["SLURM_JOB_ID"]


def fail_in_slurm() -> None:
    raise ValueError("deliberate failure inside the job")


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
    launcher = compose(overrides, hydra=True).hydra.launcher  # fmt: skip
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.qos) == ("gpu", "lab", None)
    assert launcher.cpus_per_task == 4, "cpus_per_task follows infra.threads"
    assert launcher.additional_parameters == {"constraint": "h100"}
    assert list(launcher.setup) == ["module load cuda"]
    assert (launcher.max_num_timeout, launcher.signal_delay_s) == (3, 120)


@pytest.mark.slow
def test_up_and_down_are_idempotent_and_leave_no_daemon_running(tmp_path):
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        first = script("up.sh", tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        pids = running_daemons(tmp_path)
        assert len(pids) == len(PIDFILES), pids
        again = script("up.sh", tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert running_daemons(tmp_path) == pids, "a second up.sh must keep the running daemons"
    finally:
        down = script("down.sh", tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    assert running_daemons(tmp_path) == []
    assert script("down.sh", tmp_path).returncode == 0


@pytest.mark.slow
def test_submitit_job_runs_through_sbatch_and_sacct_reports_completed(cluster, tmp_path):
    executor = make_executor(tmp_path)
    assert executor.cluster == "slurm"
    job = executor.submit(double_in_slurm, 21)
    assert job.result() == (42, job.job_id)
    assert wait_for_sacct(job.job_id, ["COMPLETED"]) == ["COMPLETED"]


@pytest.mark.slow
def test_failing_job_raises_in_submitit_and_sacct_reports_failed(cluster, tmp_path):
    job = make_executor(tmp_path).submit(fail_in_slurm)
    with pytest.raises(submitit.core.utils.FailedJobError, match="deliberate failure inside the job"):
        job.result()
    assert wait_for_sacct(job.job_id, ["FAILED"]) == ["FAILED"]


@pytest.mark.slow
def test_preempted_checkpointable_job_is_requeued_and_resumes_from_its_checkpoint(cluster, tmp_path):
    log, n = tmp_path / "steps.txt", 24
    job = make_executor(tmp_path).submit(SquareSum(), str(log), n)
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline, f"job never got going: {job.state}"
        time.sleep(0.2)
    # What SLURM sends before preemption or the time limit (--signal=USR2@signal_delay_s): submitit
    # pickles checkpoint()'s submission and runs `scontrol requeue` on its own job.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    assert job.result() == sum(i * i for i in range(n))
    steps = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    first = [i for attempt, i in steps if attempt == 0]
    resumed = [i for attempt, i in steps if attempt == 1]
    assert first == list(range(len(first))) and 4 <= len(first) < n, steps
    assert resumed == list(range(len(first), n)), "the second attempt must go on where the first stopped"
    expected = ["REQUEUED", "COMPLETED"]
    assert wait_for_sacct(job.job_id, expected, attempts=True) == expected


@pytest.mark.slow
def test_granularity_sweep_runs_through_sbatch_into_mlflow(cluster, shrunk, tmp_path):
    db = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        *shrunk,
        "granularity=1,8",
        "infra=slurm",
        "hydra.launcher.mem_gb=2",
        f"tracking.uri=sqlite:///{db}",
    ]
    proc = subprocess.run([sys.executable, "-m", "studies.run", "-m", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [*shrunk, "granularity=8", "infra=slurm", "infra.tasks_per_node=2", "hydra.launcher.mem_gb=2",
            f"tracking.uri=sqlite:///{db}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "studies.run", "-m", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
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


def interrupted_sweep(args: list[str], cwd: Path, interrupt: list[str], timeout: float = 400):
    """Start `studies.run -m args` on the cluster, wait until its one point logged 10 training steps,
    run `interrupt + [job id]`, and wait for the sweep: (process, stdout, stderr, run dir, job dir)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "studies.run", "-m", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
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
    args = [*overrides, "infra=slurm", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5",
            "hydra.callbacks.study.report=false", f"tracking.uri=sqlite:///{db}"]  # fmt: skip
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
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in WALL_CLOCK_METRICS} for x in lines]  # noqa: E731
    assert strip(metrics.read_text().splitlines()) == strip(
        (Path(reference.run_dir) / "metrics.jsonl").read_text().splitlines()
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
    args = [*shrunk, "granularity=2", "tokens=61440", "train.log_every=1", "train.checkpoint_every=1000",
            "infra=slurm", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5",
            "hydra.callbacks.study.report=false", f"tracking.uri=sqlite:///{db}"]  # fmt: skip
    _, summary = requeued_point(args, tmp_path)
    assert summary["status"] == "DONE" and summary["resumed_from"] >= 10, "the requeued job must resume"


@pytest.mark.slow
def test_a_sharded_two_task_point_requeued_by_scontrol_resumes_from_its_dcp_checkpoint_on_the_same_curve(
    cluster, shrunk, tmp_path
):
    """The requeue guarantee for sharded runs: FSDP x EP=2 on two srun tasks, SIGTERM to both, one DCP
    checkpoint at the step they agreed on, and the requeued job resumes it to DONE on the curve of the
    same layout left alone (two local tasks)."""
    sharded = [*shrunk, "granularity=2", "tokens=61440", "train.log_every=1", "train.checkpoint_every=1000",
               "infra.tasks_per_node=2", "parallel.mode=fsdp", "parallel.ep=2", "hydra.callbacks.study.report=false"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess.run([sys.executable, "-m", "studies.run", "-m", *sharded, "infra=local", "launch.progress=off",
                          f"paths.root={tmp_path / 'ref'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    (ref_metrics,) = (tmp_path / "ref" / "default" / "runs").glob("*/metrics.jsonl")
    db = tmp_path / "store.db"
    args = [*sharded, "infra=slurm", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5",
            f"tracking.uri=sqlite:///{db}"]  # fmt: skip
    run_dir, summary = requeued_point(args, tmp_path)
    assert summary["status"] == "DONE" and summary["ranks"] == 2
    assert summary["resumed_from"] >= 10, "the requeued job must resume from the preemption checkpoint"
    assert [p.name for _, p in list_checkpoints(run_dir / "checkpoints")][0] == "step_000000120.dcp"
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in WALL_CLOCK_METRICS} for x in lines]  # noqa: E731
    got = strip((run_dir / "metrics.jsonl").read_text().splitlines())
    assert [e["step"] for e in got if "train/loss" in e] == list(range(1, 121)), "each step once"
    assert got == strip(ref_metrics.read_text().splitlines()), "the uninterrupted run's history, bitwise"


def studies_run_popen(args: list[str], cwd: Path, pythonpath: Path = REPO) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.Popen([sys.executable, "-m", "studies.run", "-m", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_a_detached_slurm_sweep_returns_and_its_afterany_job_finishes_the_sweep(cluster, shrunk, tmp_path):
    db = tmp_path / "store.db"
    args = [*shrunk, "granularity=1,8", "infra=slurm", "hydra.launcher.mem_gb=2", f"tracking.uri=sqlite:///{db}",
            "--detach"]  # fmt: skip
    proc = studies_run_popen(args, tmp_path)
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

    status = subprocess.run([sys.executable, "-m", "studies.status", str(sweep_dir)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "2/2 points done" in status.stdout and "end of sweep: done at" in status.stdout
    assert len(re.findall(r"DONE\s+20/20 .* COMPLETED", status.stdout)) == 2, status.stdout


@pytest.mark.slow
def test_a_queued_slurm_job_runs_the_code_of_its_launch_not_a_later_edit(cluster, shrunk, tmp_path):
    tree = tmp_path / "tree"  # a working tree of the project that is edited while the job waits
    for name in ("moe", "studies", "analysis", "hydra_plugins", "conf"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    db = tmp_path / "store.db"
    args = [*shrunk, "granularity=2", "infra=slurm", "hydra.launcher.mem_gb=2", f"tracking.uri=sqlite:///{db}",
            "+hydra.launcher.additional_parameters.hold=true", "hydra.callbacks.study.report=false"]  # fmt: skip
    proc = studies_run_popen(args, tmp_path, pythonpath=tree)
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
        (tree / "studies" / "execute.py").write_text("raise RuntimeError('edited after launch')\n")
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
    assert "edited after launch" not in (sweep_dir / "code" / "studies" / "execute.py").read_text()
