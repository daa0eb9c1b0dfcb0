"""FSDP2 and expert-parallel layouts (moe.parallel.layout) on real gloo ranks match one process."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_worker import ListLogger
from helpers import start_ranks
from test_distributed import (
    EP2,
    FAST,
    FSDP,
    TINY,
    UNEVEN,
    assert_same_curve,
    free_port,
    history,
    single_process,
    spec_of,
    torchrun,
)
from torch.testing import assert_close

from moe.data.prepare import prepare_data
from moe.model.accounting import count_params
from moe.model.config import ModelConfig, MoEConfig
from moe.model.layer import MoELayer
from moe.model.transformer import Transformer
from moe.parallel.ep import ExpertShard, shard_experts_
from moe.parallel.layout import ParallelConfig, parallelize, resolve_layout
from moe.parallel.memory import estimate_memory
from moe.train.loop import train
from moe.train.optim import build_optimizer
from moe.train.plan import OptimConfig

# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, world, match",
    [
        (dict(mode="fsdp", ep=3), 6, r"parallel.ep=3 does not divide the routed experts .* = 8"),
        (dict(mode="fsdp", ep=2), 3, "parallel.ep=2 does not divide the world size 3"),
        (
            dict(mode="fsdp", dp_shard=3),
            4,
            r"parallel.dp_shard=3 x parallel.ep=1 = 3 ranks, but the world size is 4",
        ),
        (dict(mode="ddp", ep=2), 2, "parallel.ep=2 needs parallel.mode='fsdp'"),
        (dict(mode="zero3"), 2, "parallel.mode='zero3' is not one of ddp, fsdp"),
        (dict(ep=0), 2, "parallel.ep=0 must be an integer >= 1"),
    ],
)
def test_bad_layouts_are_refused_naming_the_key(cfg, world, match):
    with pytest.raises(ValueError, match=match):
        resolve_layout(ParallelConfig(**cfg), world, TINY)


def test_a_layout_is_checked_before_anything_is_built(data_cfg):
    with pytest.raises(ValueError, match="parallel.ep=3 does not divide the routed experts"):
        train(
            TINY,
            prepare_data(data_cfg),
            OptimConfig(),
            FAST,
            ListLogger(),
            progress=None,
            parallel=ParallelConfig(mode="fsdp", ep=3),
        )


# --- expert parallelism: the layer ----------------------------------------------------------------

LAYER = ModelConfig(
    vocab_size=64,
    d_model=16,
    n_layers=1,
    n_heads=2,
    d_ff=32,
    seq_len=8,
    moe=MoEConfig(num_experts=4, top_k=2, granularity=2, num_shared=1, aux_loss_coef=0.01, z_loss_coef=1e-3),
)
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
    start_ranks(_ep_rank, (world, free_port(), case, str(tmp_path)), world)
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
        par = parallelize(
            model,
            resolve_layout(ParallelConfig(mode="fsdp", ep=ep), world, cfg),
            torch.device("cpu"),
            bf16=False,
        )
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
        numels = {
            "params": numel(params),
            "grads": numel(p.grad for p in params),
            **{k: numel(opt.state[p][k] for p in params) for k in ("exp_avg", "exp_avg_sq")},
        }
        torch.save({"numels": numels, "norm": norm, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SHARDED_EXPERTS))
def test_sharded_experts_hold_a_quarter_of_their_states_on_each_of_four_ranks_with_the_average_gradient(
    case, tmp_path
):
    world = 4
    start_ranks(_sharded_experts_rank, (world, free_port(), case, str(tmp_path)), world)
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
    [
        FSDP,
        dataclasses.asdict(ParallelConfig(mode="fsdp", ep=2)),
        dataclasses.asdict(ParallelConfig(mode="fsdp", ep=4, activation_checkpointing=True)),
    ],
    ids=["fsdp4", "fsdp2_x_ep2", "ep4_recompute"],
)
def test_four_ranks_reproduce_the_single_process_loss_curve(parallel, data_cfg, tmp_path):
    cfg = dataclasses.replace(FAST, micro_batch_tokens=32)  # one sequence per rank per step
    ranks = torchrun(tmp_path, 4, spec_of(data_cfg, cfg, parallel=parallel))
    assert_same_curve(ranks[0]["events"], single_process(data_cfg, cfg).events)


@pytest.mark.usefixtures("one_thread")
def test_activation_checkpointing_leaves_the_loss_curve_unchanged(data_cfg):
    logger = ListLogger()
    train(
        TINY,
        prepare_data(data_cfg),
        OptimConfig(),
        FAST,
        logger,
        progress=None,
        parallel=ParallelConfig(activation_checkpointing=True),
    )
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
