"""FSDP2, expert parallelism and sharded checkpoints (moe.parallel) on real gloo ranks, against one process."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_worker import ListLogger
from test_distributed import FAST, ROOT, TINY, free_port, history, single_process, spec_of, torchrun
from torch.testing import assert_close

from moe.accounting import count_params
from moe.checkpoint import list_checkpoints, load_latest, model_weights
from moe.config import ModelConfig, MoEConfig
from moe.data import DataConfig, prepare_data
from moe.layer import MoELayer
from moe.memory import estimate_memory
from moe.model import Transformer
from moe.optim import build_optimizer
from moe.parallel import ParallelConfig, parallelize, resolve_layout
from moe.parallel_ep import ExpertShard, shard_experts_
from moe.train import OptimConfig, TrainingInterrupted, train

FSDP = dataclasses.asdict(ParallelConfig(mode="fsdp"))
EP2 = dataclasses.asdict(ParallelConfig(mode="fsdp", ep=2))


@pytest.fixture(scope="module")
def data_cfg(data_cache) -> DataConfig:
    return DataConfig(vocab_size=512, max_chars=200_000, val_fraction=0.2, cache_dir=str(data_cache))


def assert_same_curve(got_events, ref_events, rel=1e-5):
    got, ref = history(got_events, "train/loss"), history(ref_events, "train/loss")
    assert [s for s, _ in got] == [s for s, _ in ref] and got
    for (_, a), (_, b) in zip(got, ref, strict=True):
        assert a == pytest.approx(b, rel=rel, abs=1e-6)
    got_val, ref_val = history(got_events, "val/loss"), history(ref_events, "val/loss")
    assert [s for s, _ in got_val] == [s for s, _ in ref_val]
    for (_, a), (_, b) in zip(got_val, ref_val, strict=True):
        assert a == pytest.approx(b, rel=rel)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, world, match",
    [(dict(mode="fsdp", ep=3), 6, r"parallel.ep=3 does not divide the routed experts .* = 8"),
     (dict(mode="fsdp", ep=2), 3, "parallel.ep=2 does not divide the world size 3"),
     (dict(mode="fsdp", dp_shard=3), 4, r"parallel.dp_shard=3 x parallel.ep=1 = 3 ranks, but the world size is 4"),
     (dict(mode="ddp", ep=2), 2, "parallel.ep=2 needs parallel.mode='fsdp'"),
     (dict(mode="zero3"), 2, "parallel.mode='zero3' is not one of ddp, fsdp"),
     (dict(ep=0), 2, "parallel.ep=0 must be an integer >= 1")],
)  # fmt: skip
def test_bad_layouts_are_refused_naming_the_key(cfg, world, match):
    with pytest.raises(ValueError, match=match):
        resolve_layout(ParallelConfig(**cfg), world, TINY)


def test_a_layout_is_checked_before_anything_is_built(data_cfg):
    with pytest.raises(ValueError, match="parallel.ep=3 does not divide the routed experts"):
        train(TINY, prepare_data(data_cfg), OptimConfig(), FAST, ListLogger(), progress=None,
              parallel=ParallelConfig(mode="fsdp", ep=3))  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_resume_of_a_checkpoint_of_another_model_is_refused_naming_the_key(data_cfg, tmp_path):
    data = prepare_data(data_cfg)
    cfg = dataclasses.replace(FAST, checkpoint_every=2, tokens=128 * 4)
    with pytest.raises(TrainingInterrupted):
        train(TINY, data, OptimConfig(), cfg, ListLogger(), progress=None, checkpoint_dir=tmp_path,
              stop_requested=lambda: True)  # fmt: skip
    other = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, top_k=2))
    with pytest.raises(ValueError, match="model.moe.top_k=1, this run model.moe.top_k=2"):
        train(other, data, OptimConfig(), cfg, ListLogger(), progress=None, resume=load_latest(tmp_path))


# --- expert parallelism: the layer ----------------------------------------------------------------

LAYER = ModelConfig(
    vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, seq_len=8,
    moe=MoEConfig(num_experts=4, top_k=2, granularity=2, num_shared=1, aux_loss_coef=0.01, z_loss_coef=1e-3),
)  # fmt: skip
LAYER_CASES = {
    "dropless_grouped": {},
    "capacity_reference": {"capacity_factor": 0.75, "backend": "reference"},
    "expert_choice": {"router": "expert_choice"},
}


def _layer_inputs(case: str, rank: int):
    moe = dataclasses.replace(LAYER.moe, **LAYER_CASES[case])
    torch.manual_seed(0)
    layer = MoELayer(dataclasses.replace(LAYER, moe=moe))
    g = torch.Generator().manual_seed(100 + rank)
    x_BSD = torch.randn(3, 8, 16, generator=g)
    dy_BSD = torch.randn(3, 8, 16, generator=g)
    return layer, x_BSD, dy_BSD


def _forward_backward(layer, x_BSD, dy_BSD):
    x = x_BSD.clone().requires_grad_()
    y_BSD, aux = layer(x)
    torch.autograd.backward([y_BSD, aux.loss], [dy_BSD, torch.ones_like(aux.loss)])
    return y_BSD.detach(), x.grad


def _ep_rank(rank: int, world: int, port: int, case: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        layer, x_BSD, dy_BSD = _layer_inputs(case, rank)
        shard_experts_(layer.experts, ExpertShard(dist.group.WORLD, rank, world))
        y, dx = _forward_backward(layer, x_BSD, dy_BSD)
        grads = {n: p.grad for n, p in layer.named_parameters()}
        torch.save({"y": y, "dx": dx, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_expert_parallel_layer_equals_the_single_process_layer_output_and_gradients(case, tmp_path):
    world = 2
    mp.start_processes(
        _ep_rank, args=(world, free_port(), case, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    layer, _, _ = _layer_inputs(case, 0)
    for r in range(world):  # one process, each rank's micro-batch in turn (grads accumulate)
        _, x_BSD, dy_BSD = _layer_inputs(case, r)
        y, dx = _forward_backward(layer, x_BSD, dy_BSD)
        assert_close(ranks[r]["y"], y, rtol=1e-5, atol=1e-6)
        assert_close(ranks[r]["dx"], dx, rtol=1e-5, atol=1e-6)
    n_local = layer.experts.w1.shape[0] // world
    for name, p in layer.named_parameters():
        if name.startswith(
            "experts."
        ):  # each rank holds its slice of the experts, gradient summed over ranks
            got = torch.cat([ranks[r]["grads"][name] for r in range(world)])
            assert got.shape[0] == world * n_local
        else:  # replicated: each rank has its micro-batch's share
            got = sum(ranks[r]["grads"][name] for r in range(world))
        assert_close(got, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert p.grad.abs().sum() > 0


# 3 experts x G=2: 3 per EP rank of 2, which dp=2 does not divide: sharded on their width (dim 1)
UNEVEN = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, num_experts=3))
SHARDED_EXPERTS = {"dp2_x_ep2": (TINY, 2), "dp2_x_ep2_on_width": (UNEVEN, 2), "fsdp4_on_width": (UNEVEN, 1)}


def _step_inputs(cfg: ModelConfig, rank: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), generator=torch.Generator().manual_seed(rank))


def _sharded_experts_rank(rank: int, world: int, port: int, case: str, out: str) -> None:
    """One step on 4 ranks: writes the numel of this rank's expert shards, the global gradient norm and
    the full expert gradients (EP: through the checkpoints' global view)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, ep = SHARDED_EXPERTS[case]
        torch.manual_seed(0)
        model = Transformer(cfg)
        par = parallelize(model, resolve_layout(ParallelConfig(mode="fsdp", ep=ep), world, cfg),
                          torch.device("cpu"), bf16=False)  # fmt: skip
        opt = build_optimizer(model, OptimConfig(), par.expert_params)
        step = model(_step_inputs(cfg, rank), _step_inputs(cfg, rank))
        (step.loss + step.aux_loss).backward()
        par.finish_gradients()
        norm = par.clip_grad_norm_(1e9)
        experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
        grads = {n: (par._global(p.grad) if ep > 1 else p.grad).full_tensor() for n, p in experts.items()}
        opt.step()

        def numel(tensors) -> int:
            return sum(t.to_local().numel() for t in tensors)

        params = list(experts.values())
        numels = {"params": numel(params), "grads": numel(p.grad for p in params),
                  **{k: numel(opt.state[p][k] for p in params) for k in ("exp_avg", "exp_avg_sq")}}  # fmt: skip
        torch.save({"numels": numels, "norm": norm, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SHARDED_EXPERTS))
def test_sharded_experts_hold_a_quarter_of_their_states_on_each_of_four_ranks_with_the_average_gradient(
    case, tmp_path
):
    world = 4
    mp.start_processes(_sharded_experts_rank, args=(world, free_port(), case, str(tmp_path)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    cfg, ep = SHARDED_EXPERTS[case]
    p = count_params(cfg)
    share = p.routed_total // world
    est = estimate_memory(cfg, 1, precision="fp32", dp_shard=world // ep, ep=ep, device="cpu")
    assert est.params // 4 - math.ceil((p.total - p.routed_total) / world) == share  # the estimate's experts
    for r in range(world):
        assert ranks[r]["numels"] == {"params": share, "grads": share, "exp_avg": share, "exp_avg_sq": share}
    torch.manual_seed(0)  # one process accumulating the four ranks' micro-batches
    model = Transformer(cfg)
    for r in range(world):
        step = model(_step_inputs(cfg, r), _step_inputs(cfg, r))
        ((step.loss + step.aux_loss) / world).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    for r in range(world):
        assert_close(ranks[r]["norm"], norm, rtol=1e-5, atol=1e-7)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert ranks[0]["grads"].keys() == {n for n in grads if ".experts." in n} and ranks[0]["grads"]
    for name, grad in ranks[0]["grads"].items():
        assert_close(grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


# --- training: FSDP2 and EP follow the single-process curve -----------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_fsdp_on_two_ranks_reproduces_the_single_process_loss_curve(data_cfg, tmp_path):
    ranks = torchrun(tmp_path, 2, spec_of(data_cfg, parallel=FSDP))
    one = single_process(data_cfg)
    assert_same_curve(ranks[0]["events"], one.events)
    assert history(one.events, "train/loss")[-1][1] < history(one.events, "train/loss")[0][1] - 0.1
    assert ranks[1]["events"] == []


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "parallel",
    [FSDP, dataclasses.asdict(ParallelConfig(mode="fsdp", ep=2)),
     dataclasses.asdict(ParallelConfig(mode="fsdp", ep=4, activation_checkpointing=True))],
    ids=["fsdp4", "fsdp2_x_ep2", "ep4_recompute"],
)  # fmt: skip
def test_four_ranks_reproduce_the_single_process_loss_curve(parallel, data_cfg, tmp_path):
    cfg = dataclasses.replace(FAST, micro_batch_tokens=32)  # one sequence per rank per step
    ranks = torchrun(tmp_path, 4, spec_of(data_cfg, cfg, parallel=parallel))
    assert_same_curve(ranks[0]["events"], single_process(data_cfg, cfg).events)


@pytest.mark.usefixtures("one_thread")
def test_activation_checkpointing_leaves_the_loss_curve_unchanged(data_cfg):
    logger = ListLogger()
    train(TINY, prepare_data(data_cfg), OptimConfig(), FAST, logger, progress=None,
          parallel=ParallelConfig(activation_checkpointing=True))  # fmt: skip
    assert_same_curve(logger.events, single_process(data_cfg).events, rel=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_expert_parallel_on_two_ranks_reproduces_the_single_process_loss_curve(data_cfg, tmp_path):
    ranks = torchrun(tmp_path, 2, spec_of(data_cfg, parallel=EP2))
    one = single_process(data_cfg)
    assert_same_curve(ranks[0]["events"], one.events)
    # the balancing biases saw every rank's loads: router stats match too
    for key in ("router/imbalance", "train/aux_loss"):
        got, ref = history(ranks[0]["events"], key), history(one.events, key)
        assert len(got) == len(ref) == 24


# --- sharded checkpoints reshard on resume ----------------------------------------------------------


def _resume_in_process(data_cfg, ckpt: Path | None, cfg, model_cfg: ModelConfig = TINY) -> ListLogger:
    """Train in this process, from the latest checkpoint in `ckpt` (None: from scratch, no checkpoints)."""
    logger = ListLogger()
    train(model_cfg, prepare_data(data_cfg), OptimConfig(), cfg, logger, progress=None, checkpoint_dir=ckpt,
          resume=load_latest(ckpt) if ckpt else None)  # fmt: skip
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
    resumed = torchrun(tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(tmp_path / "ckpt_ep2"),
                                            resume=True, parallel=EP2, model=model), name="ep2")  # fmt: skip
    assert resumed[0]["result"]["resumed_from"] == 5
    assert_same_curve(resumed[0]["events"], tail)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_single_process_checkpoint_resumes_on_two_fsdp_ranks_on_the_same_curve(data_cfg, tmp_path):
    cfg = dataclasses.replace(FAST, checkpoint_every=100)
    ckpt = tmp_path / "ckpt"
    calls = iter(range(1, 100))
    with pytest.raises(TrainingInterrupted):
        train(TINY, prepare_data(data_cfg), OptimConfig(), cfg, ListLogger(), progress=None, checkpoint_dir=ckpt,
              stop_requested=lambda: next(calls) == 5)  # fmt: skip
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


# --- rank failures ------------------------------------------------------------------------------------


def _launch_ranks(tmp_path: Path, spec: dict, world: int) -> list[subprocess.Popen]:
    """Ranks as plain processes sharing MASTER_ADDR/PORT (as srun starts them): no torchrun agent that
    would end the survivors itself."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        env.pop("TORCHELASTIC_RUN_ID", None)
        cmd = [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(out / "spec.json"), str(out)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0], ids=["worker_dies", "store_host_dies"])
def test_a_rank_killed_mid_training_ends_the_others_within_a_minute_naming_it(dead, data_cfg, tmp_path):
    spec = spec_of(data_cfg, dataclasses.replace(FAST, tokens=128 * 400), die=[dead, 4], peer_timeout_s=15.0,
                   parallel=FSDP)  # fmt: skip
    procs = _launch_ranks(tmp_path, spec, 2)
    survivor = procs[1 - dead]
    try:
        assert procs[dead].wait(timeout=240) == -signal.SIGKILL
        died = time.monotonic()
        survivor.wait(timeout=90)
        ended = time.monotonic() - died
        out = survivor.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert survivor.returncode != 0
    assert ended < 60, out[-3000:]
    result = json.loads((tmp_path / "out" / f"rank{1 - dead}.json").read_text())
    assert result["failed_rank"] == dead, out[-3000:]
    assert result["error"].startswith(f"rank {dead} failed: ")
