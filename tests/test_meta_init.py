"""A sharded layout builds its model on the meta device and allocates only each rank's shards
(moe.parallel.Parallel.materialize_), yet starts from exactly the weights one process gets from the
same seed: the fairness of a comparison (function-matched fine-grained init) holds at any layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import TINY, free_port

from moe.config import ModelConfig
from moe.model import Transformer
from moe.parallel import ParallelConfig, parallelize, resolve_layout

# 3 experts x G=2 with a dense first block and untied head: experts sharded on their width by dp=2
# under EP=2, a FeedForward block, and an lm_head to initialise.
MIXED = dataclasses.replace(
    TINY,
    n_layers=3,
    tie_embeddings=False,
    first_dense_layers=1,
    moe=dataclasses.replace(TINY.moe, num_experts=3),
)
CASES = {
    "fsdp2": (TINY, 2, 1),
    "ep2": (TINY, 2, 2),
    "fsdp2_x_ep2_mixed": (MIXED, 4, 2),
    "fsdp4_mixed": (MIXED, 4, 1),
}


def _rank(rank: int, world: int, port: int, case: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, _, ep = CASES[case]
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(cfg)
        par = parallelize(model, resolve_layout(ParallelConfig(mode="fsdp", ep=ep), world, cfg),
                          torch.device("cpu"), bf16=False)  # fmt: skip
        par.materialize_(torch.device("cpu"), seed=0)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        full = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in par.model_tensors().items()
        }
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        torch.save({"full": full, "local": local, "rng": torch.get_rng_state(), "on_meta": on_meta},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _single_process(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model.state_dict(), torch.get_rng_state()


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if CASES[c][1] > 2 else []) for c in CASES]
)
def test_a_sharded_build_starts_from_the_single_process_weights_holding_only_its_shards(case, tmp_path):
    cfg, world, _ = CASES[case]
    mp.start_processes(
        _rank, args=(world, free_port(), case, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    ref, ref_rng = _single_process(cfg)
    n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["on_meta"] == []
        assert got["full"].keys() == ref.keys()
        for name, tensor in ref.items():
            assert torch.equal(got["full"][name], tensor), f"rank {r}: {name} differs from one process's"
        assert torch.equal(got["rng"], ref_rng), "the generator must be where one process leaves it"
        assert got["local"] <= n_params // world + n_params // 10  # its shards (padding aside), not the model


@pytest.mark.parametrize("init", ["normal", "fan_in"])
def test_reset_parameters_writes_every_element_of_every_parameter_and_buffer(init):
    """Weights come from init_steps alone (submodules are built on meta): nothing may be left as the
    uninitialised memory of to_empty, in any optional part."""
    moe = dataclasses.replace(TINY.moe, num_shared=1, shared_gate=True, output_norm=True)
    cfg = dataclasses.replace(MIXED, n_heads=4, n_kv_heads=2, init=init, moe=moe)
    model = Transformer(cfg)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan"))
    model.reset_parameters()
    bad = [k for k, t in model.state_dict().items() if not torch.isfinite(t).all()]
    assert bad == []


def test_init_steps_cover_every_parameter_and_buffer_in_reset_parameters_order():
    torch.manual_seed(0)
    model = Transformer(MIXED)
    names = [name for name, _ in model.init_steps()]
    owned = {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}
    assert owned == set(model.state_dict())
    assert (
        names[0] == "embed" and names[-1] == "lm_head" and names.index("blocks.0.attn") < names.index("norm")
    )
