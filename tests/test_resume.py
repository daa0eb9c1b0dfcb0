"""Checkpoints (moe.train.checkpoint) and exact resume of moe.train.loop.train, in process, on a real tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metrics_without_wall_clock, run_study, start_study, without_wall_clock
from torch.testing import assert_close

from moe.data.config import DataConfig
from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig, MoEConfig
from moe.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from moe.train.loop import train
from moe.train.outcome import NonFiniteLossError, TrainingInterrupted
from moe.train.plan import OptimConfig, TrainConfig, plan_training
from moe.train.rng import capture_rng, restore_rng
from studies.job.execute import run_point

# jitter > 0 makes the run draw from the global torch RNG every step, so a resume that forgot the RNG
# state would diverge; bias balancing makes a buffer (not a parameter) part of the state.
TINY = ModelConfig(
    vocab_size=512,
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_ff=64,
    seq_len=32,
    moe=MoEConfig(num_experts=4, top_k=2, jitter=0.1, bias_update_rate=1e-3),
)
FAST = TrainConfig(
    tokens=512 * 16,
    batch_tokens=512,
    eval_every=4,
    eval_tokens=1024,
    log_every=1,
    progress_every=0,
    checkpoint_every=3,
    keep_last=2,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class ListLogger:
    def __init__(self):
        self.events: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.events.append((step, without_wall_clock(metrics)))


def jsonl_history(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput."""
    return metrics_without_wall_clock(run_dir / "metrics.jsonl")


def stop_after(n_steps: int):
    """A stop_requested that says stop once n_steps steps have run (train polls it after each step)."""
    calls = iter(range(1, 1 << 30))
    return lambda: next(calls) >= n_steps


@pytest.fixture(scope="module")
def data(data_cache):
    return prepare_data(
        DataConfig(vocab_size=512, max_chars=200_000, val_fraction=0.2, cache_dir=str(data_cache))
    )


@pytest.fixture(scope="module")
def reference(data):
    # Module scope runs before the per-test one_thread fixture: set it here, since the thread count
    # changes fp32 summation order and the comparisons below are exact.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    log = ListLogger()
    result = train(TINY, data, OptimConfig(lr=1e-2), FAST, log, progress=None)
    torch.set_num_threads(before)
    return log.events, result


def test_resume_after_a_stop_logs_the_identical_history_and_final_val_loss(data, reference, tmp_path):
    ref_events, ref_result = reference
    first = ListLogger()
    with pytest.raises(TrainingInterrupted) as stopped:
        train(
            TINY,
            data,
            OptimConfig(lr=1e-2),
            FAST,
            first,
            progress=None,
            checkpoint_dir=tmp_path,
            stop_requested=stop_after(7),
        )
    assert stopped.value.step == 7 and stopped.value.checkpoint == checkpoint_path(tmp_path, 7)
    second = ListLogger()
    state = load_latest(tmp_path)
    result = train(TINY, data, OptimConfig(lr=1e-2), FAST, second, progress=None, resume=state)
    assert result.resumed_from == 7
    assert first.events + second.events == ref_events  # exact float equality, event by event
    assert result.final_val_loss == ref_result.final_val_loss
    assert result.final_train_loss == ref_result.final_train_loss


def test_resume_from_an_older_checkpoint_repeats_the_lost_steps_identically(data, reference, tmp_path):
    # What a SIGKILL after step 7 leaves: checkpoints of steps 3 and 6 (every 3), nothing of step 7.
    ref_events, ref_result = reference
    with pytest.raises(TrainingInterrupted):
        train(
            TINY,
            data,
            OptimConfig(lr=1e-2),
            FAST,
            ListLogger(),
            progress=None,
            checkpoint_dir=tmp_path,
            stop_requested=stop_after(7),
        )
    checkpoint_path(tmp_path, 7).unlink()
    state = load_latest(tmp_path)
    assert state["step"] == 6
    resumed = ListLogger()
    result = train(TINY, data, OptimConfig(lr=1e-2), FAST, resumed, progress=None, resume=state)
    assert resumed.events == [(s, m) for s, m in ref_events if s > 6]
    assert result.final_val_loss == ref_result.final_val_loss


def test_resume_refuses_a_checkpoint_of_another_plan(data, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(
            TINY,
            data,
            OptimConfig(),
            FAST,
            ListLogger(),
            progress=None,
            checkpoint_dir=tmp_path,
            stop_requested=stop_after(2),
        )
    longer = dataclasses.replace(FAST, tokens=FAST.tokens * 2)
    with pytest.raises(ValueError, match="written for plan"):
        train(TINY, data, OptimConfig(), longer, ListLogger(), progress=None, resume=load_latest(tmp_path))


def test_periodic_checkpoints_keep_only_the_last_k(data, tmp_path):
    train(TINY, data, OptimConfig(), FAST, ListLogger(), progress=None, checkpoint_dir=tmp_path)
    # every 3 steps of 16 and the last one (a finished run keeps its final weights), keep_last=2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [16, 15]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000015.pt",
        "step_000000015.pt.sha256",
        "step_000000016.pt",
        "step_000000016.pt.sha256",
    ]


def test_nan_loss_stops_training_with_the_step_it_first_appeared(data, tmp_path):
    log = ListLogger()
    cfg = dataclasses.replace(FAST, log_every=5, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError) as err:
        train(TINY, data, OptimConfig(lr=1e6, grad_clip=0), cfg, log, progress=None, checkpoint_dir=tmp_path)
    assert err.value.metric == "train/loss" and 1 <= err.value.step <= 5
    assert "train/loss is nan at step" in str(err.value) or "inf" in str(err.value)
    # nothing diverged was logged or checkpointed
    assert all(s < err.value.step for s, _ in log.events)
    assert all(s < err.value.step for s, _ in list_checkpoints(tmp_path))


# moe.train.checkpoint on its own ---------------------------------------------------------------------


def small_state(value: float) -> dict:
    return {"w": torch.full((3, 2), value), "meta": {"lr": value, "names": ["a", "b"], "none": None}}


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path, 5, small_state(1.5), keep_last=3)
    state = load_checkpoint(path)
    assert state["step"] == 5 and state["meta"] == {"lr": 1.5, "names": ["a", "b"], "none": None}
    assert_close(state["w"], torch.full((3, 2), 1.5))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temp files left behind"


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, small_state(float(step)), keep_last=3)
    newest = checkpoint_path(tmp_path, 3)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(newest)
    assert latest_step(tmp_path) == 2
    assert_close(load_latest(tmp_path)["w"], torch.full((3, 2), 2.0))


def test_checkpoint_without_its_digest_counts_as_unfinished(tmp_path):
    save_checkpoint(tmp_path, 1, small_state(1.0), keep_last=3)
    save_checkpoint(tmp_path, 2, small_state(2.0), keep_last=3)
    (tmp_path / "step_000000002.pt.sha256").unlink()  # a crash between the .pt and its digest
    assert load_latest(tmp_path)["step"] == 1


def test_unloadable_file_with_a_matching_digest_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, small_state(1.0), keep_last=3)
    path = save_checkpoint(tmp_path, 2, small_state(2.0), keep_last=3)
    path.write_bytes(b"not a zip file")  # digest rewritten to match: only torch.load can tell
    path.with_name(path.name + ".sha256").write_text(
        __import__("hashlib").sha256(b"not a zip file").hexdigest()
    )
    with pytest.raises(CheckpointError, match="torch.load failed"):
        load_checkpoint(path)
    assert load_latest(tmp_path)["step"] == 1


def test_no_usable_checkpoint_means_none(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    (tmp_path / "step_000000004.pt").write_bytes(b"partial")
    assert load_latest(tmp_path) is None and latest_step(tmp_path) is None


def test_rng_state_round_trips_python_numpy_and_torch(tmp_path):
    save_checkpoint(tmp_path, 1, {"rng": capture_rng()}, keep_last=1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(load_latest(tmp_path)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2]
    assert_close(got[2], expected[2], rtol=0, atol=0)


def test_plan_rejects_negative_checkpoint_cadence_and_empty_retention():
    with pytest.raises(ValueError, match="train.checkpoint_every=-1"):
        plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, checkpoint_every=-1))
    with pytest.raises(ValueError, match="train.keep_last=0"):
        plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, keep_last=0))


# A real process killed with SIGKILL, then started again ----------------------------------------------


@pytest.mark.slow
def test_sigkilled_run_started_again_ends_with_the_uninterrupted_history(compose, shrunk, tmp_path):
    overrides = [*shrunk, "tokens=40960", "train.log_every=1", "train.checkpoint_every=5"]
    reference = run_point(compose([*overrides, f"paths.root={tmp_path / 'ref'}"]), cwd=tmp_path)

    args, env = [*overrides, "infra.threads=1"], {"MOE_THREADS": "1"}
    run_dir = tmp_path / "outputs" / "default" / "runs" / reference.run_key
    proc = start_study(args, tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        # kill once a checkpoint exists and metrics.jsonl has gone past it (lines the resume must cut)
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            ckpt = latest_step(run_dir / "checkpoints")
            lines = (
                (run_dir / "metrics.jsonl").read_text().splitlines()
                if (run_dir / "metrics.jsonl").exists()
                else []
            )
            if ckpt and lines and json.loads(lines[-1])["step"] > ckpt:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    status = json.loads((run_dir / "status.json").read_text())
    killed_at = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert status["status"] == "RUNNING" and killed_at < reference.tokens // 512

    again = run_study(args, tmp_path, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume from step" in again.stdout
    assert jsonl_history(run_dir) == jsonl_history(Path(reference.run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 5 <= summary["resumed_from"] <= killed_at
    assert summary["final"]["val/loss"] == reference.val_loss  # bitwise: fp32 on CPU, one thread
