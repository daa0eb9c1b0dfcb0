"""Cooldown shapes (moe.train.schedule) and a branch's schedule and identity (moe.train.plan, studies.job.point):
pure functions, no training."""

from __future__ import annotations

import math

import pytest

from moe.model.config import ModelConfig
from moe.train.plan import OptimConfig, TrainConfig, plan_training
from moe.train.schedule import decay_done, lr_at
from studies.job.config import load_run_config
from studies.job.point import build_point

PEAK, FLOOR = 1.0, 0.1
MODEL = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32)


def wsd(step: int, shape: str, total: int = 100, warmup: int = 10, decay: int = 20) -> float:
    return lr_at(
        step,
        total_steps=total,
        peak_lr=PEAK,
        min_lr=FLOOR,
        warmup_steps=warmup,
        kind="wsd",
        decay_steps=decay,
        decay_shape=shape,
    )


def test_one_minus_sqrt_holds_the_peak_then_falls_as_one_minus_the_root_of_the_progress():
    assert [wsd(s, "1-sqrt") for s in (10, 50, 79)] == [PEAK] * 3
    for step in range(80, 100):
        progress = (step - 80 + 1) / 20
        assert wsd(step, "1-sqrt") == pytest.approx(PEAK - (PEAK - FLOOR) * math.sqrt(progress))
    assert wsd(99, "1-sqrt") == pytest.approx(FLOOR)


def test_one_minus_sqrt_lies_below_linear_inside_the_cooldown_and_meets_it_at_both_ends():
    assert wsd(79, "1-sqrt") == wsd(79, "linear") == PEAK
    for step in range(80, 99):
        assert wsd(step, "1-sqrt") < wsd(step, "linear")
    assert wsd(99, "1-sqrt") == pytest.approx(wsd(99, "linear"))
    lrs = [wsd(s, "1-sqrt") for s in range(79, 100)]
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_the_linear_shape_is_the_wsd_schedule_of_before_bit_for_bit():
    # the formula the wsd schedule used before shapes existed, so earlier WSD runs keep their numbers
    for step in range(80, 100):
        progress = min((step - 80 + 1) / 20, 1.0)
        assert wsd(step, "linear") == PEAK + (FLOOR - PEAK) * progress


def test_decay_done_names_the_key_of_an_unknown_shape():
    assert decay_done(0.25, "1-sqrt") == 0.5 and decay_done(0.25, "linear") == 0.25
    with pytest.raises(ValueError, match=r"optim.decay_shape='cubic'"):
        decay_done(0.5, "cubic")
    with pytest.raises(ValueError, match=r"optim.decay_shape='cubic' is not one of linear, 1-sqrt"):
        OptimConfig(schedule="wsd", decay_shape="cubic")


def branch_and_parent(branch_tokens: int, parent_tokens: int, **optim):
    opt = OptimConfig(schedule="wsd", warmup_frac=0.05, decay_frac=0.2, decay_shape="1-sqrt", **optim)
    parent = plan_training(MODEL, opt, TrainConfig(tokens=parent_tokens, batch_tokens=512))
    branch = plan_training(
        MODEL, opt, TrainConfig(tokens=branch_tokens, batch_tokens=512, branch_from=parent_tokens)
    )
    return opt, parent, branch


def schedule_of(plan, opt: OptimConfig) -> list[float]:
    return [
        lr_at(
            s,
            total_steps=plan.steps,
            peak_lr=opt.lr,
            min_lr=opt.lr * opt.min_lr_ratio,
            warmup_steps=plan.warmup_steps,
            kind=opt.schedule,
            decay_steps=plan.decay_steps,
            decay_shape=opt.decay_shape,
        )
        for s in range(plan.steps)
    ]


def test_a_branch_follows_its_parent_to_the_branch_point_then_decays_over_its_own_last_fraction():
    opt, parent, branch = branch_and_parent(50 * 512, 200 * 512)
    assert (parent.steps, parent.warmup_steps, parent.decay_steps, parent.branch_step) == (200, 10, 40, 0)
    # the branch is the last 20% of its own 50 steps, started at step 40 with the parent's warmup of 10
    assert (branch.steps, branch.warmup_steps, branch.decay_steps, branch.branch_step) == (50, 10, 10, 40)
    ours, theirs = schedule_of(branch, opt), schedule_of(parent, opt)
    assert ours[:40] == theirs[:40]
    assert all(ours[s] < theirs[s] for s in range(40, 50))
    assert ours[-1] == pytest.approx(opt.lr * opt.min_lr_ratio)


@pytest.mark.parametrize(
    ("branch", "optim", "match"),
    [
        (dict(tokens=200 * 512), {}, r"train.tokens=102400 is not below train.branch_from=102400"),
        (
            dict(tokens=50 * 512 - 1),
            dict(decay_frac=0.9),
            r"optim.decay_frac=0.9 puts the branch point of train.tokens=25599 at step 5, before the warmup of the "
            r"run it branches from ends \(step 10: optim.warmup_frac=0.05 of its 200 steps\)",
        ),
        (
            dict(tokens=50 * 512),
            dict(decay_frac=0.0),
            r"optim.decay_frac=0.0 gives the branch .* no decay step",
        ),
        (
            dict(tokens=50 * 512),
            dict(schedule="cosine"),
            r"train.branch_from=102400 needs optim.schedule=wsd",
        ),
        (
            dict(tokens=200 * 512 - 100),
            {},
            r"train.tokens=102300 \(200 steps\) is not below train.branch_from",
        ),
    ],
)
def test_the_library_refuses_a_branch_it_cannot_train_naming_the_keys(branch, optim, match):
    opt = {"schedule": "wsd", "warmup_frac": 0.05, "decay_frac": 0.2, **optim}
    with pytest.raises(ValueError, match=match):
        plan_training(
            MODEL, OptimConfig(**opt), TrainConfig(batch_tokens=512, branch_from=200 * 512, **branch)
        )


# Identity: studies.job.point ---------------------------------------------------------------------------

WSD = ["optim=wsd", "optim.decay_shape=1-sqrt"]


def point(compose, shrunk, *overrides):
    return build_point(load_run_config(compose([*shrunk, *WSD, *overrides])), vocab_size=512)


def test_the_parent_is_the_plain_wsd_run_of_its_budget_and_a_branch_is_a_run_of_its_own(compose, shrunk):
    parent = point(compose, shrunk, "tokens=20480", "branch_from=20480")
    plain = point(compose, shrunk, "tokens=20480")
    branch = point(compose, shrunk, "tokens=10240", "branch_from=20480")
    separate = point(compose, shrunk, "tokens=10240")
    assert (parent.role, branch.role, plain.role) == ("parent", "branch", None)
    assert parent.run_key == plain.run_key  # keeping checkpoints for branches changes nothing it computes
    assert branch.parent.run_key == parent.run_key and branch.parent.tokens == 20480
    assert branch.run_key not in (separate.run_key, parent.run_key)
    assert branch.tags()["branch_of"] == parent.run_key and branch.tags()["branch_step"] == "16"
    assert parent.tags()["branch"] == "parent" and "branch" not in plain.tags()
    # the cooldown's shape and a branch's parent are part of what a point computes
    linear = build_point(load_run_config(compose([*shrunk, "optim=wsd", "tokens=20480"])), vocab_size=512)
    assert linear.run_key != plain.run_key
    assert point(compose, shrunk, "tokens=10240", "branch_from=15360").run_key != branch.run_key
