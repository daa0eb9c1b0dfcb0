"""The training loop and its schedules, on a real tiny model and a real tiny corpus."""

from __future__ import annotations

import dataclasses
import math

import pytest
from torch.testing import assert_close

from moe.data.config import DataConfig
from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig, MoEConfig
from moe.train.loop import train
from moe.train.plan import OptimConfig, TrainConfig, plan_training
from moe.train.schedule import lr_at

TINY = ModelConfig(
    vocab_size=512,
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_ff=64,
    seq_len=32,
    moe=MoEConfig(num_experts=4, top_k=2),
)
FAST = TrainConfig(
    tokens=512 * 30, batch_tokens=512, eval_every=10, eval_tokens=1024, log_every=5, progress_every=0
)


pytestmark = pytest.mark.usefixtures("one_thread")


class ListLogger:
    def __init__(self):
        self.events: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.events.append((step, dict(metrics)))

    def history(self, key):
        return [(s, m[key]) for s, m in self.events if key in m]


@pytest.fixture(scope="module")
def data(data_cache):
    return prepare_data(
        DataConfig(vocab_size=512, max_chars=200_000, val_fraction=0.2, cache_dir=str(data_cache))
    )


def schedule(kind, step, total=100, warmup=10, decay=20):
    return lr_at(
        step, total_steps=total, peak_lr=1.0, min_lr=0.1, warmup_steps=warmup, kind=kind, decay_steps=decay
    )


def test_cosine_warms_up_linearly_peaks_then_decays_to_the_floor():
    assert schedule("cosine", 0) == pytest.approx(0.1)
    assert schedule("cosine", 9) == pytest.approx(1.0)
    assert schedule("cosine", 10) == pytest.approx(1.0)
    assert schedule("cosine", 99) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert schedule("cosine", int(mid)) == pytest.approx(0.55, abs=0.02)
    lrs = [schedule("cosine", s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_steps():
    assert [schedule("wsd", s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert schedule("wsd", 80) == pytest.approx(1.0 - 0.9 / 20)
    assert schedule("wsd", 89) == pytest.approx(0.55)
    assert schedule("wsd", 99) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(tokens=100), r"train.tokens=100 is smaller than one batch"),
        (dict(batch_tokens=500), r"train.batch_tokens=500 must be a positive multiple of model.seq_len=32"),
        (dict(micro_batch_tokens=96), r"train.micro_batch_tokens=96 .* divides train.batch_tokens=512"),
        (dict(log_every=0), r"train.log_every=0"),
        (dict(eval_tokens=8), r"train.eval_tokens=8 is smaller than model.seq_len=32"),
    ],
)
def test_plan_rejects_an_impossible_budget_naming_the_keys(changes, match):
    with pytest.raises(ValueError, match=match):
        plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, **changes))


def test_plan_turns_the_token_budget_into_steps_and_micro_batches():
    plan = plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, tokens=5000, micro_batch_tokens=128))
    assert (plan.steps, plan.batch_size, plan.micro_batch_size, plan.accum) == (10, 16, 4, 4)
    assert plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, tokens=5120)).steps == 10


def test_training_lowers_the_loss_and_logs_every_contract_metric(data):
    log = ListLogger()
    result = train(TINY, data, OptimConfig(lr=1e-2), FAST, log, progress=None)
    losses = [v for _, v in log.history("train/loss")]
    assert losses[0] > losses[-1] + 0.25
    assert result.final_val_loss < math.log(TINY.vocab_size) - 0.7
    assert [s for s, _ in log.history("val/loss")] == [1, 2, 4, 8, 10, 20, 30], (
        "log-spaced early, then every eval_every"
    )
    assert [s for s, _ in log.history("train/loss")] == list(range(1, 31)), "the train loss of every step"
    assert [s for s, _ in log.history("router/entropy")] == [5, 10, 15, 20, 25, 30], (
        "diagnostics at log steps"
    )
    train_s = [v for _, v in log.history("time/train_s")]
    assert train_s == sorted(train_s) and 0 < train_s[-1] == pytest.approx(result.train_s)
    assert result.train_s < result.wall_s - result.eval_s, "evaluation is not training time"
    assert all(0 < v < 1 for _, v in log.history("val/loss_se")), "window-level standard error of val/loss"
    last = dict(log.events[-2][1])  # train event of the last step; the last event is the final eval
    for key in ("lr", "tokens", "flops", "tokens_per_s", "time/train_s", "train/aux_loss", "train/z_loss"):
        assert key in last, key
    for stat in ("top1_mass", "imbalance", "entropy", "dropped_frac", "empty_experts", "aux_loss", "z_loss"):
        assert (
            f"router/{stat}" in last and f"router/layer0/{stat}" in last and f"router/layer1/{stat}" in last
        )
    assert_close(last["router/entropy"], (last["router/layer0/entropy"] + last["router/layer1/entropy"]) / 2)
    assert last["tokens"] == 30 * 512 == result.tokens
    assert last["flops"] == pytest.approx(result.flops)


def test_same_seed_reproduces_the_loss_curve_and_another_seed_does_not(data):
    runs = []
    for seed in (0, 0, 1):
        log = ListLogger()
        train(
            TINY,
            data,
            OptimConfig(),
            dataclasses.replace(FAST, tokens=512 * 10, seed=seed),
            log,
            progress=None,
        )
        runs.append([v for _, v in log.history("train/loss")])
    assert_close(runs[0], runs[1])
    assert runs[0] != runs[2]


def test_dense_model_trains_without_router_metrics(data):
    log = ListLogger()
    dense = dataclasses.replace(TINY, moe=None)
    train(
        dense,
        data,
        OptimConfig(),
        dataclasses.replace(FAST, tokens=512 * 4, eval_every=0),
        log,
        progress=None,
    )
    keys = set().union(*(m for _, m in log.events))
    assert "train/loss" in keys and "val/loss" in keys
    assert not any(k.startswith("router/") for k in keys)


def test_gradient_accumulation_consumes_the_whole_batch_each_step(data):
    log = ListLogger()
    cfg = dataclasses.replace(FAST, tokens=512 * 3, micro_batch_tokens=256, log_every=1, eval_every=0)
    train(TINY, data, OptimConfig(), cfg, log, progress=None)
    assert [m["tokens"] for _, m in log.events if "train/loss" in m] == [512, 1024, 1536]


def test_progress_line_shows_step_tokens_loss_throughput_and_eta(data):
    lines = []
    cfg = dataclasses.replace(FAST, tokens=512 * 4, progress_every=2, eval_every=0)
    train(TINY, data, OptimConfig(), cfg, ListLogger(), progress=lines.append)
    assert len(lines) == 2
    assert lines[0].startswith("step 2/4 | tokens 1,024 | loss ")
    assert "tok/s" in lines[0] and "ETA 0:00:" in lines[0]


def test_eval_schedule_is_log_spaced_early_then_regular_and_always_the_last_step():
    from moe.train.plan import is_eval_step

    default = TrainConfig(eval_every=20)
    assert [s for s in range(1, 246) if is_eval_step(default, s, 245)] == [
        1,
        2,
        4,
        8,
        16,
        20,
        40,
        60,
        80,
        100,
        120,
        140,
        160,
        180,
        200,
        220,
        240,
        245,
    ]
    regular = TrainConfig(eval_every=20, eval_early=False)
    assert [s for s in range(1, 61) if is_eval_step(regular, s, 60)] == [20, 40, 60]
    end_only = TrainConfig(eval_every=0, eval_early=False)
    assert [s for s in range(1, 11) if is_eval_step(end_only, s, 10)] == [10]


def test_a_checkpoint_evaluated_on_other_validation_windows_is_refused_on_resume(data, tmp_path):
    """A run is measured on one set of val tokens: a checkpoint from before the windows were spread over
    the split (its plan lacks val_windows: the first windows) does not continue under the new ones."""
    from moe.train.checkpoint import load_latest
    from moe.train.outcome import TrainingInterrupted

    cfg = dataclasses.replace(FAST, checkpoint_every=2, tokens=512 * 4)
    with pytest.raises(TrainingInterrupted):
        train(
            TINY,
            data,
            OptimConfig(),
            cfg,
            ListLogger(),
            progress=None,
            checkpoint_dir=tmp_path,
            stop_requested=lambda: True,
        )
    state = load_latest(tmp_path)
    del state["plan"]["val_windows"]
    with pytest.raises(
        ValueError, match="evaluated on the 'first' validation windows, this run uses 'spread'"
    ):
        train(TINY, data, OptimConfig(), cfg, ListLogger(), progress=None, resume=state)


def test_final_evaluation_on_more_windows_has_a_smaller_standard_error(data):
    log = ListLogger()
    cfg = dataclasses.replace(FAST, tokens=512 * 10, final_eval_tokens=16384)
    result = train(TINY, data, OptimConfig(lr=1e-2), cfg, log, progress=None)
    ((step, final),) = log.history("val/loss_final")
    assert step == 10 and final == result.final_eval.loss
    curve_se = dict(log.history("val/loss_se"))[10]
    assert result.final_eval.windows == 16384 // TINY.seq_len
    assert 0 < result.final_eval.se < curve_se, "16 times the windows of the curve's evaluations"
    assert abs(final - result.final_val_loss) < 3 * curve_se, "the same model on more of the same split"
    with pytest.raises(ValueError, match="train.final_eval_tokens=0"):
        TrainConfig(final_eval_tokens=0)
