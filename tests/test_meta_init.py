"""A sharded layout builds its model on the meta device and allocates only each rank's shards
(moe.parallel.layout.Parallel.materialize_), yet starts from exactly the weights one process gets from the
same seed: the fairness of a comparison (function-matched fine-grained init) holds at any layout."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import start_ranks
from test_distributed import TINY, free_port

from moe.model.config import ModelConfig
from moe.model.transformer import Transformer
from moe.parallel.layout import Parallel, ParallelConfig, parallelize, resolve_layout

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


def _sharded_build(cfg: ModelConfig, world: int, ep: int = 1) -> tuple[Transformer, Parallel]:
    """What moe.train.loop does for a sharded layout: seed, build on meta, shard, materialize."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    par = parallelize(
        model, resolve_layout(ParallelConfig(mode="fsdp", ep=ep), world, cfg), torch.device("cpu"), bf16=False
    )
    par.materialize_(torch.device("cpu"), seed=0)
    return model, par


def _rank(rank: int, world: int, port: int, case: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, _, ep = CASES[case]
        model, par = _sharded_build(cfg, world, ep)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        full = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in par.model_tensors().items()
        }
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        torch.save(
            {"full": full, "local": local, "rng": torch.get_rng_state(), "on_meta": on_meta},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


# 16 blocks of ~1M parameters (the largest submodule a quarter of a block): 17M parameters, 68 MB fp32
WIDE = ModelConfig(
    vocab_size=512,
    d_model=128,
    n_layers=16,
    n_heads=2,
    d_ff=256,
    seq_len=32,
    moe=dataclasses.replace(TINY.moe, num_experts=8, granularity=1),
)


def _host_peak_mb(build) -> float:
    """Peak resident memory growth (MB) while `build` runs: the kernel's high-water mark, reset first."""

    def status(key: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024

    gc.collect()  # what an earlier build freed goes back to the kernel, so this build's pages are new
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = status("VmRSS:")
    kept = build()
    peak = status("VmHWM:") - before
    del kept
    return peak


def _memory_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:

        def sharded(cfg: ModelConfig = WIDE):
            return _sharded_build(cfg, world)[0]

        def whole():
            torch.manual_seed(0)
            return Transformer(WIDE)

        sharded(TINY)  # the first use loads FSDP's and DTensor's code: not the model's memory
        peaks = {"sharded": _host_peak_mb(sharded), "whole": _host_peak_mb(whole)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(peaks))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_no_rank_holds_the_whole_model_while_a_sharded_layout_builds_it(tmp_path):
    """4 FSDP ranks: each rank's host peak while building and initialising is its quarter plus one
    submodule, well under the whole model, which the same measurement sees in full for a plain build."""
    world = 4
    mp.start_processes(
        _memory_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="spawn"
    )
    model_mb = sum(p.numel() for p in Transformer(WIDE).parameters()) * 4 / 2**20
    for r in range(world):
        peaks = json.loads((tmp_path / f"rank{r}.json").read_text())
        print(
            f"rank {r}: model {model_mb:.0f} MB, host peak sharded {peaks['sharded']:.0f} MB, "
            f"whole {peaks['whole']:.0f} MB"
        )
        assert peaks["whole"] > 0.75 * model_mb  # the measurement sees a whole model (some pages reused)
        assert peaks["sharded"] < 0.5 * model_mb


def _single_process(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model.state_dict(), torch.get_rng_state()


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if CASES[c][1] > 2 else []) for c in CASES]
)
def test_a_sharded_build_starts_from_the_single_process_weights_holding_only_its_shards(case, tmp_path):
    cfg, world, _ = CASES[case]
    start_ranks(_rank, (world, free_port(), case, str(tmp_path)), world)
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
