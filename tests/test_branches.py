"""Cooldown branches trained for real (studies.launch.branches through studies.job.execute.run_point, shrunk configs,
CPU fp32, one thread): a branch starts from its parent's weights, is resumable, idempotent and waits for
its parent; the sweep orders parents first and says what branching saves."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SHRINK, compose_config
from helpers import run_study, without_wall_clock
from mlflow.tracking import MlflowClient

from moe.data.loader import validation_batches
from moe.data.prepare import prepare_data
from moe.model.transformer import Transformer
from moe.train.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from moe.train.evaluation import evaluate
from moe.train.outcome import TrainingInterrupted
from records import runfiles
from studies.job.config import load_run_config
from studies.job.execute import run_point
from studies.job.point import Point, build_point
from studies.launch import branches

# The parent trains 40 steps of 512 tokens (constant LR until step 32); the branch 25 steps, its last 20%
# a 1-sqrt cooldown from step 20, an evaluation step. keep_last=1 with a checkpoint every 3 steps would
# delete step 20: it survives only because the branch asked for it.
BRANCHING = [
    "optim=wsd",
    "optim.decay_shape=1-sqrt",
    "branch_from=20480",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.keep_last=1",
]
PARENT, BRANCH, BRANCH_STEP = "tokens=20480", "tokens=12800", 20

pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(root: Path, cache: Path, *extra: str) -> list[str]:
    return [*SHRINK, f"data.cache_dir={cache}", f"paths.root={root / 'outputs'}", *BRANCHING, *extra]


def point_of(root: Path, cache: Path, *extra: str) -> Point:
    return build_point(load_run_config(compose_config(overrides(root, cache, *extra))), cwd=root)


def run(root: Path, cache: Path, *extra: str, **kwargs):
    return run_point(
        compose_config(overrides(root, cache, *extra)), cwd=root, **{"stop_requested": None, **kwargs}
    )


def history(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock numbers."""
    events = runfiles.read_events(Path(run_dir) / runfiles.METRICS)
    return [without_wall_clock(e) for e in events]


def value(run_dir: Path, key: str, step: int) -> float:
    return runfiles.metric_values(runfiles.read_events(Path(run_dir) / runfiles.METRICS))[(key, step)]


@contextlib.contextmanager
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Trained:
    root: Path
    cache: Path
    parent: object
    branch: object
    point: Point


@pytest.fixture(scope="module")
def trained(data_cache, tmp_path_factory) -> Trained:
    """A parent and one branch, trained once for the tests that only read them (the registration is what
    the sweep callback does before any job starts)."""
    root = tmp_path_factory.mktemp("branched")
    with one_torch_thread():
        point = point_of(root, data_cache, BRANCH)
        branches.register([point])
        parent = run(root, data_cache, PARENT)
        branch = run(root, data_cache, BRANCH)
    return Trained(root, data_cache, parent, branch, point)


def test_a_branch_starts_from_its_parents_weights_at_the_branch_point(trained):
    parent_dir, branch_dir, b = Path(trained.parent.run_dir), Path(trained.branch.run_dir), BRANCH_STEP
    assert (trained.parent.status, trained.branch.status) == ("DONE", "DONE")
    assert trained.point.plan.branch_step == b and trained.point.parent.run_key == trained.parent.run_key
    # its history up to the branch point is the parent's, copied; after it, only its own steps
    assert [e for e in history(branch_dir) if e["step"] <= b] == [
        e for e in history(parent_dir) if e["step"] <= b
    ]
    assert max(e["step"] for e in history(branch_dir)) == 25
    # same weights and data position: the first step after the branch point computes the parent's loss,
    # bit for bit (the loss comes before the update, whose LR is where the two part)
    assert value(branch_dir, "train/loss", b + 1) == value(parent_dir, "train/loss", b + 1)
    assert value(branch_dir, "lr", b + 1) < value(parent_dir, "lr", b + 1) == value(parent_dir, "lr", b)
    assert value(branch_dir, "lr", 25) == pytest.approx(1e-2 * 0.1)  # the floor at its own last step
    # the checkpoint it started from evaluates to the val loss the parent logged at the branch point
    state = load_checkpoint(checkpoint_path(parent_dir / "checkpoints", b))
    model = Transformer(trained.point.model)
    model.load_state_dict(state["model"])
    data = prepare_data(trained.point.run.data)
    batches = validation_batches(
        data, 32, trained.point.plan.micro_batch_size, trained.point.train.eval_tokens
    )
    val = evaluate(model, batches, torch.device("cpu"), contextlib.nullcontext)
    assert val.loss == value(parent_dir, "val/loss", b)


def test_a_parent_keeps_its_branch_points_checkpoint_past_keep_last(trained):
    parent_dir = Path(trained.parent.run_dir)
    assert [s for s, _ in list_checkpoints(parent_dir / "checkpoints")] == [40, BRANCH_STEP]
    assert json.loads((parent_dir / "branches.json").read_text()) == {
        trained.branch.run_key: {"step": BRANCH_STEP, "tokens": 12800}
    }


def test_a_branch_is_its_own_mlflow_run_tagged_with_its_parent(trained):
    client = MlflowClient(f"sqlite:///{trained.root / 'outputs/default/mlflow.db'}")
    parent, branch = (client.get_run(r.mlflow_run_id) for r in (trained.parent, trained.branch))
    assert branch.data.tags["branch_of"] == trained.parent.run_key and branch.data.tags["branch"] == "branch"
    assert branch.data.tags["branch_step"] == str(BRANCH_STEP) and parent.data.tags["branch"] == "parent"
    assert branch.data.tags["run_key"] == trained.branch.run_key and branch.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(branch.info.run_id, "val/loss")]
    assert BRANCH_STEP in steps and 25 in steps and 40 not in steps
    summary = json.loads((Path(trained.branch.run_dir) / "summary.json").read_text())
    assert summary["resumed_from"] == BRANCH_STEP and summary["tags"]["branch_of"] == trained.parent.run_key


def test_running_a_done_branch_again_skips_it_and_leaves_its_parent_alone(trained):
    parent_status = (Path(trained.parent.run_dir) / "status.json").stat().st_mtime_ns
    before = history(Path(trained.branch.run_dir))
    again = run(trained.root, trained.cache, BRANCH)
    assert (again.action, again.status, again.val_loss) == ("skip", "DONE", trained.branch.val_loss)
    assert again.mlflow_run_id == trained.branch.mlflow_run_id and history(Path(again.run_dir)) == before
    assert (Path(trained.parent.run_dir) / "status.json").stat().st_mtime_ns == parent_status


def copy_study_without_the_branch(trained: Trained, tmp_path: Path) -> Path:
    """The trained parent in a study of its own, where the branch has not run."""
    root = tmp_path / "copy"
    shutil.copytree(
        trained.root / "outputs", root / "outputs", ignore=shutil.ignore_patterns(trained.branch.run_key)
    )
    return root


def stop_after(n_steps: int):
    calls = iter(range(1, 1 << 30))
    return lambda: next(calls) >= n_steps


def kill_aftermath(run_dir: Path, drop_after: int) -> None:
    """What a SIGKILL leaves: status RUNNING and no checkpoint after step drop_after (metrics.jsonl goes on)."""
    for step, path in list_checkpoints(run_dir / "checkpoints"):
        if step > drop_after:
            path.unlink()
            path.with_name(path.name + ".sha256").unlink()
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "RUNNING"}))


@pytest.mark.parametrize("resumes_from", [21, 0], ids=["its_own_checkpoint", "its_parent_again"])
def test_a_killed_branch_resumes_to_the_uninterrupted_branchs_metrics_bitwise(
    trained, tmp_path, resumes_from
):
    root = copy_study_without_the_branch(trained, tmp_path)
    with pytest.raises(TrainingInterrupted):  # steps 21, 22, 23; checkpoints of 21 and 23
        run(root, trained.cache, BRANCH, "train.keep_last=2", stop_requested=stop_after(3))
    run_dir = root / "outputs/default/runs" / trained.branch.run_key
    kill_aftermath(run_dir, drop_after=resumes_from)
    assert max(e["step"] for e in history(run_dir)) == 23  # lines after the checkpoint, to be cut
    resumed = run(root, trained.cache, BRANCH)
    assert resumed.action == "resume" and resumed.status == "DONE"
    assert history(run_dir) == history(Path(trained.branch.run_dir))
    assert resumed.val_loss == trained.branch.val_loss
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == (resumes_from or BRANCH_STEP)


def test_a_branch_launched_before_its_parent_finished_waits_then_runs(data_cache, tmp_path, capsys):
    done: list = []

    def branch_job() -> None:
        try:
            done.append(run(tmp_path, data_cache, BRANCH))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            done.append(exc)

    branch = point_of(tmp_path, data_cache, BRANCH)
    job = threading.Thread(target=branch_job, daemon=True)
    job.start()
    registry = branches.parent_dir(branch) / "branches.json"
    deadline = time.monotonic() + 120
    while not registry.exists():  # the branch asked its parent for the checkpoint and waits for it
        assert job.is_alive() and time.monotonic() < deadline, done
        time.sleep(0.05)
    time.sleep(2 * branches.POLL_S)
    assert job.is_alive() and not (branch.run_dir / "status.json").exists()
    parent = run(tmp_path, data_cache, PARENT)
    job.join(timeout=300)
    assert not job.is_alive() and not isinstance(done[0], BaseException), done
    assert (parent.status, done[0].status) == ("DONE", "DONE")
    assert "waiting for the parent's checkpoint of step 20 (it is not started)" in capsys.readouterr().out
    ours = [e for e in history(branch.run_dir) if e["step"] <= BRANCH_STEP]
    assert ours == [e for e in history(Path(parent.run_dir)) if e["step"] <= BRANCH_STEP]


@pytest.mark.slow
def test_a_sweep_trains_parents_first_says_what_branching_saves_and_skips_it_all_the_second_time(
    data_cache, tmp_path
):
    # The branch is listed first; in-process (infra=basic), one point at a time, it would wait for a
    # parent that never starts unless the sweep launches the parent first.
    args = [
        *overrides(tmp_path, data_cache),
        "tokens=12800,20480",
        "infra=basic",
        "launch.parent_wait_s=60",
        "hydra.callbacks.study.report=false",
    ]
    first = run_study(["-m", *args], tmp_path, env={"MOE_THREADS": "1"}, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = first.stdout[first.stdout.index("Sweep points:") :].splitlines()
    assert "tokens=20480" in table[2] and "parent of 1" in table[2]
    assert "tokens=12800" in table[3] and f"at step {BRANCH_STEP}" in table[3]
    assert "tokens trained: 23,040 with branches vs 33,280 as separate runs (31% fewer)" in first.stdout
    assert "2/2 points done" in first.stdout
    second = run_study(["-m", *args], tmp_path, env={"MOE_THREADS": "1"}, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to start, 2/2 points done" in second.stdout and "skip: DONE" in second.stdout
