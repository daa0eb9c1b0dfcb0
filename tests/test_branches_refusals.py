"""Bad branches are refused before any job starts (studies.launch.sweep.validate_jobs on the real conf/), in one
sentence naming the branch's and the parent's run keys where a parent is involved; nothing is written."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from conftest import CONF_DIR, SHRINK, compose_config
from hydra import initialize_config_dir

from moe.model.config import ModelConfig
from moe.train.plan import OptimConfig, TrainConfig, check_resume, plan_training
from studies.job.config import load_run_config, register_configs
from studies.job.execute import run_point
from studies.job.point import Point, build_point
from studies.launch import branches
from studies.launch.sweep import validate_overrides

BRANCHING = ["optim=wsd", "branch_from=20480"]  # parent: 40 steps; tokens=10240 branches at step 16
PARENT, BRANCH = "tokens=20480", "tokens=10240"

pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(root: Path, cache: Path, *extra: str) -> list[str]:
    return [*SHRINK, f"data.cache_dir={cache}", f"paths.root={root / 'outputs'}", *BRANCHING, *extra]


def point_of(root: Path, cache: Path, *extra: str) -> Point:
    return build_point(load_run_config(compose_config(overrides(root, cache, *extra))), cwd=root)


def refusal(root: Path, cache: Path, *points: list[str]) -> str:
    """The error validating a sweep of `points` (each a list of extra overrides) under `root`."""
    register_configs()
    runs = sorted(p.name for p in (root / "outputs/default/runs").glob("*"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ValueError) as info:
            validate_overrides([overrides(root, cache, *extra) for extra in points], cwd=root)
    assert sorted(p.name for p in (root / "outputs/default/runs").glob("*")) == runs, "validation wrote a run"
    return str(info.value)


@pytest.fixture(scope="module")
def parent(data_cache, tmp_path_factory) -> Path:
    """A DONE parent that kept the checkpoint of tokens=10240's branch point (step 16) and no other."""
    import torch

    root = tmp_path_factory.mktemp("parent")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    branches.register([point_of(root, data_cache, BRANCH)])
    run_point(compose_config(overrides(root, data_cache, PARENT)), cwd=root, stop_requested=None)
    torch.set_num_threads(before)
    return root


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["tokens=40960"],
            r"tokens=40960: ValueError: tokens=40960 is not below branch_from=20480: a branch is "
            r"shorter than its parent",
        ),
        (
            [BRANCH, "optim.decay_frac=0.97"],
            r"branch_from=20480: optim.decay_frac=0.97 puts the branch point of train.tokens=10240 at step 1, before "
            r"the warmup of the run it branches from ends \(step 2: optim.warmup_frac=0.05 of its 40 steps\)",
        ),
        ([BRANCH, "optim=adamw"], r"branch_from=20480 needs optim.schedule=wsd \(optim=wsd\), not cosine"),
        (
            [BRANCH, "train.branch_from=5120"],
            r"train.branch_from is not a key: `branch_from=...` is the only key",
        ),
    ],
)
def test_an_impossible_branch_is_refused_naming_its_keys(data_cache, tmp_path, extra, match):
    message = refusal(tmp_path, data_cache, [PARENT], extra)
    assert message.startswith("1 of 2 sweep points are invalid"), message
    assert re.search(match, message), message


def test_a_branch_whose_parent_is_neither_in_the_sweep_nor_trained_is_refused_naming_both(
    data_cache, tmp_path
):
    branch = point_of(tmp_path, data_cache, BRANCH)
    message = refusal(tmp_path, data_cache, [BRANCH])
    assert (
        f"branch {branch.run_key} (tokens=10240) of parent {branch.parent.run_key} (tokens=20480): its "
        "parent's checkpoint of the branch point, step 16, is missing and the parent is not in this sweep: "
        "add tokens=20480"
    ) in message
    assert not (tmp_path / "outputs").exists()


def test_a_branch_needing_a_checkpoint_its_done_parent_did_not_keep_is_refused(data_cache, parent):
    branch = point_of(parent, data_cache, "tokens=15360")  # branches at step 24: only 16 was asked for
    for sweep in ([["tokens=15360"]], [[PARENT], ["tokens=15360"]]):
        message = refusal(parent, data_cache, *sweep)
        assert (
            f"branch {branch.run_key} (tokens=15360) of parent {branch.parent.run_key} (tokens=20480): its "
            "parent is DONE without a checkpoint of the branch point, step 24, which it was not asked to keep: "
            "train tokens=15360 as a separate run (without branch_from)"
        ) in message


def test_a_branch_of_a_parent_that_kept_its_checkpoint_validates_without_the_parent(data_cache, parent):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        (point,) = validate_overrides([overrides(parent, data_cache, BRANCH)], cwd=parent)
    assert point.role == "branch" and (point.parent.tokens, point.plan.branch_step) == (20480, 16)


def test_a_parent_checkpoint_written_by_another_config_is_refused_naming_both(data_cache, parent, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(parent / "outputs", root / "outputs")
    theirs = point_of(root, data_cache, BRANCH)
    ours = point_of(root, data_cache, BRANCH, "optim.lr=2e-2")
    # the lr=1e-2 parent's checkpoint of step 16, where the lr=2e-2 parent's would be
    folder = branches.parent_dir(ours) / "checkpoints"
    folder.mkdir(parents=True)
    for path in (branches.parent_dir(theirs) / "checkpoints").glob("step_000000016.pt*"):
        shutil.copy(path, folder / path.name)
    message = refusal(root, data_cache, [BRANCH, "optim.lr=2e-2"])
    assert (
        f"branch {ours.run_key} (tokens=10240) of parent {ours.parent.run_key} (tokens=20480): its parent's "
        "checkpoint of step 16 was written by a different config (checkpoint of step 16 has optim.lr=0.01, "
        "this run optim.lr=0.02)"
    ) in message


def test_a_branch_whose_parent_never_comes_fails_after_its_wait_naming_both(data_cache, tmp_path):
    branch = point_of(tmp_path, data_cache, BRANCH)
    cfg = compose_config(overrides(tmp_path, data_cache, BRANCH, "launch.parent_wait_s=0"))
    with pytest.raises(branches.BranchError) as info:
        run_point(cfg, cwd=tmp_path, stop_requested=None)
    assert str(info.value) == (
        f"branch {branch.run_key} (tokens=10240) of parent {branch.parent.run_key} (tokens=20480): its parent "
        "has not written its checkpoint of the branch point, step 16, after launch.parent_wait_s=0 s (it is not "
        "started): train it (tokens=20480) and run this point again"
    )
    assert not (branch.run_dir / "status.json").exists()  # nothing FAILED: running it again retries it


MODEL = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32)


def test_training_refuses_to_branch_from_a_checkpoint_inside_its_parents_decay_or_of_another_warmup():
    opt = OptimConfig(schedule="wsd", warmup_frac=0.1, decay_frac=0.5)
    # a 40-step parent warms up over 4 steps and decays from step 20; a 36-step branch starts at step 18
    parent = plan_training(MODEL, opt, TrainConfig(tokens=40 * 512, batch_tokens=512))
    branch = plan_training(MODEL, opt, TrainConfig(tokens=36 * 512, batch_tokens=512, branch_from=40 * 512))
    state = {"step": 18, "plan": dataclasses.asdict(parent), "model_config": dataclasses.asdict(MODEL)}
    check_resume(state, branch, MODEL)
    of_a_longer_parent = plan_training(
        MODEL, opt, TrainConfig(tokens=36 * 512, batch_tokens=512, branch_from=60 * 512)
    )
    with pytest.raises(
        ValueError, match=r"plan warmup_steps=4, this branch has warmup_steps=6: it is not the run"
    ):
        check_resume(state, of_a_longer_parent, MODEL)
    inside = {**state, "plan": {**dataclasses.asdict(parent), "decay_steps": 25}}
    with pytest.raises(ValueError, match=r"not in the constant phase of a longer run"):
        check_resume(inside, branch, MODEL)
