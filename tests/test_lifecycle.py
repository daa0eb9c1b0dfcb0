"""Run identity and idempotence (studies.job.execute.run_point, studies.run), NaN handling, failed jobs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from helpers import metrics_without_wall_clock, run_study
from mlflow.tracking import MlflowClient

from moe.train.checkpoint import checkpoint_path
from moe.train.outcome import NonFiniteLossError, TrainingInterrupted
from studies.job.execute import run_point
from studies.job.lifecycle import PreviouslyFailedError, lifecycle

pytestmark = pytest.mark.usefixtures("one_thread")


def events(run_dir: Path) -> list[dict]:
    return metrics_without_wall_clock(run_dir / "metrics.jsonl")


def point_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("default")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "point"]


def stop_after(n_steps: int):
    calls = iter(range(1, 1 << 30))
    return lambda: next(calls) >= n_steps


def uri_of(root: Path) -> str:
    return f"sqlite:///{root / 'outputs' / 'default' / 'mlflow.db'}"


def test_lifecycle_reads_status_and_checkpoints(tmp_path):
    assert lifecycle(tmp_path / "new").action == "start"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"status": "RUNNING", "step": 9, "reason": None}))
    assert (lifecycle(run_dir).action, lifecycle(run_dir).step) == ("resume", 0)
    from moe.train.checkpoint import save_checkpoint

    save_checkpoint(run_dir / "checkpoints", 5, {}, keep_last=2)
    assert (lifecycle(run_dir).action, lifecycle(run_dir).step) == ("resume", 5)
    (run_dir / "status.json").write_text(json.dumps({"status": "FAILED", "step": 7, "reason": "boom"}))
    assert lifecycle(run_dir).action == "refuse" and "FAILED at step 7: boom" in lifecycle(run_dir).detail
    assert (lifecycle(run_dir, retry_failed=True).action, lifecycle(run_dir, retry_failed=True).step) == (
        "retry",
        5,
    )
    (run_dir / "status.json").write_text(json.dumps({"status": "DONE", "step": 20, "reason": None}))
    assert lifecycle(run_dir).action == "skip"


def test_rerunning_a_done_point_skips_it_and_opens_no_new_mlflow_run(compose, shrunk, tmp_path):
    cfg = compose([*shrunk, "granularity=2"])
    first = run_point(cfg, cwd=tmp_path)
    again = run_point(cfg, cwd=tmp_path)
    assert (first.action, again.action) == ("start", "skip")
    assert again.val_loss == first.val_loss and again.mlflow_run_id == first.mlflow_run_id
    assert len(point_runs(uri_of(tmp_path))) == 1


def test_preempted_point_resumes_in_its_mlflow_run_with_the_uninterrupted_history(compose, shrunk, tmp_path):
    overrides = [*shrunk, "train.checkpoint_every=5"]
    ref_root, root = tmp_path / "ref", tmp_path / "resumed"
    reference = run_point(compose([*overrides, f"paths.root={ref_root / 'outputs'}"]), cwd=ref_root)
    cfg = compose([*overrides, f"paths.root={root / 'outputs'}"])
    with pytest.raises(TrainingInterrupted):
        run_point(cfg, cwd=root, stop_requested=stop_after(7))
    run_dir = root / "outputs" / "default" / "runs" / reference.run_key
    assert json.loads((run_dir / "status.json").read_text())["status"] == "PREEMPTED"
    (run,) = point_runs(uri_of(root))
    assert run.info.status == "KILLED"
    # As after a SIGKILL right after step 7: its checkpoint lost, steps 6-7 already in metrics.jsonl and
    # MLflow. The resume goes back to step 5, cuts the file there and must not send step 6 twice.
    checkpoint_path(run_dir / "checkpoints", 7).unlink()
    assert lifecycle(run_dir).step == 5

    resumed = run_point(cfg, cwd=root)
    assert resumed.action == "resume" and resumed.mlflow_run_id == run.info.run_id
    assert resumed.val_loss == reference.val_loss
    assert events(run_dir) == events(Path(reference.run_dir))
    client = MlflowClient(uri_of(root))
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    ref_client = MlflowClient(uri_of(ref_root))
    ref_history = [
        (m.step, m.value) for m in ref_client.get_metric_history(reference.mlflow_run_id, "train/loss")
    ]
    assert sorted(history) == sorted(ref_history) and len({s for s, _ in history}) == len(history)
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED" and final.data.tags["resumed_from_step"] == "5"
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 5


def test_diverging_point_fails_with_its_step_and_is_retried_only_when_asked(compose, shrunk, tmp_path):
    cfg = compose([*shrunk, "optim.lr=1e6", "optim.grad_clip=0"])
    with pytest.raises(NonFiniteLossError) as err:
        run_point(cfg, cwd=tmp_path)
    (run,) = point_runs(uri_of(tmp_path))
    run_dir = tmp_path / "outputs" / "default" / "runs" / run.data.tags["run_key"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "FAILED" and status["step"] == err.value.step >= 1
    assert "NonFiniteLossError: train/loss is nan at step" in status["reason"]
    assert run.info.status == "FAILED" and run.data.tags["failed_step"] == str(err.value.step)
    assert "train/loss is nan" in run.data.tags["failure_reason"]

    with pytest.raises(PreviouslyFailedError, match="--retry-failed"):
        run_point(cfg, cwd=tmp_path)
    with pytest.raises(NonFiniteLossError):  # retried; a deterministic divergence diverges again
        run_point(cfg, cwd=tmp_path, retry_failed=True)
    assert len(point_runs(uri_of(tmp_path))) == 1, "the retry continues the same MLflow run"


# Through `python -m studies.run -m` and the submitit launcher ---------------------------------------


STUDY_ENV = {"MOE_JOBS": "2", "MOE_THREADS": "1"}  # two submitit jobs at once, one torch thread each


@pytest.mark.slow
def test_diverged_job_fails_in_submitit_while_the_sweep_goes_on_and_a_rerun_skips_done_points(
    shrunk, tmp_path
):
    args = ["-m", *shrunk, "optim.lr=1e-2,1e6", "optim.grad_clip=0", "hydra.callbacks.study.report=false"]
    proc = run_study(args, tmp_path, env=STUDY_ENV, timeout=400)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1/2 points done" in proc.stdout and "1 of 2 sweep points failed" in proc.stderr
    assert "NonFiniteLossError: train/loss is nan at step" in proc.stderr
    # The job itself failed: submitit's result of one job is an error (what SLURM would record as FAILED).
    results = [
        pickle.loads(p.read_bytes())[0]
        for p in tmp_path.glob("outputs/default/multirun/*/.submitit/*/*_result.pkl")
    ]
    assert sorted(results) == ["error", "success"]

    dry = run_study([*args, "--dry-run"], tmp_path, env=STUDY_ENV, timeout=400)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "skip: DONE" in dry.stdout and "not retried: FAILED at step" in dry.stdout
    again = run_study(args, tmp_path, env=STUDY_ENV, timeout=400)
    assert again.returncode == 1 and "1/2 points done" in again.stdout
    assert "skip: DONE" in again.stdout
    assert len(point_runs(uri_of(tmp_path))) == 2, "a re-run opens no new point runs"
