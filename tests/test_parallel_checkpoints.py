"""Sharded checkpoints reshard on resume across layouts; a checkpoint of another model is refused."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from dist_worker import ListLogger
from test_distributed import (
    EP2,
    FAST,
    FSDP,
    TINY,
    UNEVEN,
    assert_same_curve,
    single_process,
    spec_of,
    torchrun,
)
from torch.testing import assert_close

from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig
from moe.model.transformer import Transformer
from moe.parallel.layout import ParallelConfig
from moe.train.checkpoint import list_checkpoints, load_latest, model_weights
from moe.train.loop import train
from moe.train.outcome import TrainingInterrupted
from moe.train.plan import OptimConfig


@pytest.mark.usefixtures("one_thread")
def test_resume_of_a_checkpoint_of_another_model_is_refused_naming_the_key(data_cfg, tmp_path):
    data = prepare_data(data_cfg)
    cfg = dataclasses.replace(FAST, checkpoint_every=2, tokens=128 * 4)
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
    other = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, top_k=2))
    with pytest.raises(ValueError, match="model.moe.top_k=1, this run model.moe.top_k=2"):
        train(other, data, OptimConfig(), cfg, ListLogger(), progress=None, resume=load_latest(tmp_path))


# --- sharded checkpoints reshard on resume ----------------------------------------------------------


def _resume_in_process(data_cfg, ckpt: Path | None, cfg, model_cfg: ModelConfig = TINY) -> ListLogger:
    """Train in this process, from the latest checkpoint in `ckpt` (None: from scratch, no checkpoints)."""
    logger = ListLogger()
    train(
        model_cfg,
        prepare_data(data_cfg),
        OptimConfig(),
        cfg,
        logger,
        progress=None,
        checkpoint_dir=ckpt,
        resume=load_latest(ckpt) if ckpt else None,
    )
    return logger


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("parallel", [FSDP, EP2], ids=["fsdp2_to_1", "ep2_to_1"])
def test_a_sharded_checkpoint_of_two_ranks_resumes_in_one_process_on_the_same_curve(
    parallel, data_cfg, tmp_path
):
    cfg = dataclasses.replace(FAST, checkpoint_every=100)
    ckpt = tmp_path / "ckpt"
    stopped = torchrun(
        tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), stop=[1, 5], parallel=parallel)
    )
    assert stopped[0]["interrupted_at"] == 5
    assert [p.name for _, p in list_checkpoints(ckpt)] == ["step_000000005.dcp"]
    assert (ckpt / "step_000000005.dcp.sha256").is_file()  # the completion marker
    resumed = _resume_in_process(data_cfg, ckpt, cfg)
    unbroken = single_process(data_cfg, cfg)
    tail = [(s, m) for s, m in unbroken.events if s > 5]
    assert_same_curve(resumed.events, tail)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_cfg", [TINY, UNEVEN], ids=["experts_dim0", "experts_on_width"])
def test_a_fsdp_x_ep_checkpoint_of_four_ranks_resumes_in_one_process_and_on_two_ep_ranks_on_the_same_curve(
    model_cfg, data_cfg, tmp_path
):
    cfg = dataclasses.replace(FAST, checkpoint_every=100, micro_batch_tokens=32)  # one sequence per rank of 4
    ckpt, model = tmp_path / "ckpt", dataclasses.asdict(model_cfg)
    dp2_ep2 = dataclasses.asdict(ParallelConfig(mode="fsdp", dp_shard=2, ep=2))
    stopped = torchrun(
        tmp_path,
        4,
        spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), stop=[3, 5], parallel=dp2_ep2, model=model),
    )
    assert stopped[0]["interrupted_at"] == 5
    shutil.copytree(ckpt, tmp_path / "ckpt_ep2")
    tail = [(s, m) for s, m in _resume_in_process(data_cfg, None, cfg, model_cfg).events if s > 5]
    assert_same_curve(_resume_in_process(data_cfg, ckpt, cfg, model_cfg).events, tail)
    resumed = torchrun(
        tmp_path,
        2,
        spec_of(
            data_cfg, cfg, checkpoint_dir=str(tmp_path / "ckpt_ep2"), resume=True, parallel=EP2, model=model
        ),
        name="ep2",
    )
    assert resumed[0]["result"]["resumed_from"] == 5
    assert_same_curve(resumed[0]["events"], tail)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_single_process_checkpoint_resumes_on_two_fsdp_ranks_on_the_same_curve(data_cfg, tmp_path):
    cfg = dataclasses.replace(FAST, checkpoint_every=100)
    ckpt = tmp_path / "ckpt"
    calls = iter(range(1, 100))
    with pytest.raises(TrainingInterrupted):
        train(
            TINY,
            prepare_data(data_cfg),
            OptimConfig(),
            cfg,
            ListLogger(),
            progress=None,
            checkpoint_dir=ckpt,
            stop_requested=lambda: next(calls) == 5,
        )
    assert [p.name for _, p in list_checkpoints(ckpt)] == ["step_000000005.pt"]
    resumed = torchrun(
        tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), resume=True, parallel=FSDP)
    )
    assert resumed[0]["result"]["resumed_from"] == 5
    tail = [(s, m) for s, m in single_process(data_cfg, cfg).events if s > 5]
    assert_same_curve(resumed[0]["events"], tail)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("parallel", [FSDP, EP2], ids=["fsdp2", "ep2"])
def test_a_finished_sharded_run_keeps_its_final_weights_which_load_in_one_process(
    parallel, data_cfg, tmp_path
):
    cfg = dataclasses.replace(FAST, checkpoint_every=100)  # no periodic checkpoint: only the final one
    ckpt, ref_ckpt = tmp_path / "ckpt", tmp_path / "ref"
    torchrun(tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), parallel=parallel))
    assert [p.name for _, p in list_checkpoints(ckpt)] == ["step_000000024.dcp"]
    train(
        TINY, prepare_data(data_cfg), OptimConfig(), cfg, ListLogger(), progress=None, checkpoint_dir=ref_ckpt
    )
    reference = load_latest(ref_ckpt)["model"]
    weights = model_weights(load_latest(ckpt), Transformer(TINY))
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_an_incomplete_sharded_checkpoint_is_skipped_for_the_previous_one(data_cfg, tmp_path):
    cfg = dataclasses.replace(FAST, checkpoint_every=3, keep_last=3)
    ckpt = tmp_path / "ckpt"
    torchrun(tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), stop=[0, 7], parallel=FSDP))
    assert [s for s, _ in list_checkpoints(ckpt)] == [7, 6, 3]
    (ckpt / "step_000000007.dcp.sha256").unlink()  # as if killed before the marker was written
    shard = next((ckpt / "step_000000006.dcp").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))  # and a corrupted shard
    assert load_latest(ckpt)["step"] == 3
