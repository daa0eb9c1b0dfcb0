"""studies.plan: published totals of the presets, paper-2 matching, Hydra sweep expansion, GPU-hours, CLI.

Every test composes the real conf/ through the planner (Hydra's compose machinery), as the CLI does.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moe.model.accounting import count_params, flops_per_token
from moe.model.matched import derive
from studies.job.config import load_run_config
from studies.job.point import build_point
from studies.launch.sweep import compose_jobs
from studies.plan import GPU_PEAK_FLOPS, hardware, main, plan_sweep

# Paper-scale presets need a batch that holds whole sequences (Mixtral's context is 32768).
BIG_BATCH = ["train.batch_tokens=4194304", "tokens=1000000000000"]


class AllocationCounter(TorchDispatchMode):
    """Counts bytes of every non-meta tensor an aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bytes += t.untyped_storage().nbytes()
        return out


def _one(overrides: list[str], **kwargs):
    (plan,) = plan_sweep(overrides, **kwargs)
    return plan


def test_mixtral_8x7b_matches_published_46_7b_total_and_12_9b_active():
    plan = _one(["model=mixtral_8x7b", *BIG_BATCH])
    assert plan.params_total == pytest.approx(46.7e9, rel=0.005)
    assert plan.params_active == pytest.approx(12.9e9, rel=0.005)
    assert plan.vocab_size == 32000


def test_planning_at_mixtral_published_context_adds_only_attention_flops():
    short = _one(["model=mixtral_8x7b", *BIG_BATCH])
    long = _one(["model=mixtral_8x7b", "model.seq_len=32768", "train.eval_tokens=32768", *BIG_BATCH])
    assert long.params_total == short.params_total
    # QK^T and AV: 4 * n_layers * seq_len * d_model forward FLOPs per token (non-causal), x3 to train.
    extra = 3 * 4 * 32 * (32768 - 4096) * 4096
    assert long.flops_per_token_train - short.flops_per_token_train == pytest.approx(extra)


def test_olmoe_1b_7b_matches_published_6_9b_total_and_rounds_to_1_3b_active():
    plan = _one(["model=olmoe_1b_7b", *BIG_BATCH])
    assert plan.params_total == pytest.approx(6.9e9, rel=0.005)
    # Published to one decimal: 1.3B active means [1.25B, 1.35B).
    assert round(plan.params_active / 1e9, 1) == 1.3
    # QK-norm is not modelled: an RMSNorm of width d_model on queries and keys in each of 16 blocks.
    qk_norm = 16 * 2 * 2048
    assert (plan.params_total + qk_norm) == pytest.approx(6.9e9, rel=0.005)
    assert qk_norm / plan.params_total < 1e-4


def test_paper2_presets_round_to_published_sizes_and_granularity_keeps_them_matched():
    plans = plan_sweep(["granularity=1,8", "model=beyond50b_56b", *BIG_BATCH], multirun=True)
    g1, g8 = plans
    assert (g1.variant, g8.variant) == ("moe-E8-k2-G1", "moe-E8-k2-G8")
    assert round(g1.params_total / 1e9) == 56 and round(g1.params_active / 1e9) == 17
    # Matched: identical except the router, which grows from d_model x 8 to d_model x 64 per block.
    router_growth = 32 * 4096 * (64 - 8)
    assert g8.params_total - g1.params_total == router_growth
    assert g8.params_active - g1.params_active == router_growth
    assert g8.flops_per_token_train - g1.flops_per_token_train == pytest.approx(3 * 2 * router_growth)
    small = _one(["model=beyond50b_11b", *BIG_BATCH])
    assert round(small.params_total / 1e9) == 11
    assert small.variant == "moe-E8-k1-G1"


def test_paper2_11b_fine_grained_variant_routes_64_experts_top_8_with_matched_matmul_flops():
    ((job, cfg),) = compose_jobs(["model=beyond50b_11b", "granularity=8", *BIG_BATCH], multirun=False)
    run = load_run_config(cfg)
    g8 = build_point(run, vocab_size=run.model.vocab_size).model
    g1 = derive(g8, granularity=1)
    assert (g8.moe.n_routed, g8.moe.k_routed) == (64, 8)
    assert flops_per_token(g8).matmul_forward == flops_per_token(g1).matmul_forward
    assert count_params(g8).routed_total == count_params(g1).routed_total


def test_planning_a_56b_sweep_allocates_no_tensor_storage_and_takes_seconds():
    counter = AllocationCounter()
    with counter:
        torch.zeros(1000)  # the counter sees real allocations ...
    assert counter.bytes >= 4000
    counter = AllocationCounter()
    t0 = time.perf_counter()
    with counter:  # ... and planning makes none, not even with the meta-device check
        plans = plan_sweep(
            ["granularity=1,8", "model=beyond50b_56b", *BIG_BATCH], multirun=True, check_meta=True
        )
    elapsed = time.perf_counter() - t0
    assert counter.bytes == 0
    assert counter.ops > 0  # the meta build did run through the dispatcher
    assert [p.meta_numel for p in plans] == [p.params_total for p in plans]
    assert elapsed < 30  # ~5 s measured on a busy 2-core machine; weights would be 223 GB in fp32


def test_sweep_expands_study_params_and_command_line_as_hydra_basic_sweeper():
    jobs = [job for job, _ in compose_jobs(["study=granularity", "model=small"], multirun=True)]
    pairs = {
        (next(o for o in j if o.startswith("granularity=")), next(o for o in j if o.startswith("seed=")))
        for j in jobs
    }
    assert len(jobs) == 20
    assert pairs == {(f"granularity={g}", f"seed={s}") for g in (1, 2, 4, 8) for s in (0, 1, 2, 3, 4)}
    assert all("model=small" in j for j in jobs)
    # A command-line value replaces the study's sweep of the same key, as in Hydra.
    jobs = [job for job, _ in compose_jobs(["study=granularity", "seed=5"], multirun=True)]
    assert len(jobs) == 4 and all("seed=5" in j for j in jobs)
    # Without -m, Hydra runs one job and ignores the study's sweeper params.
    assert len(compose_jobs(["study=granularity"], multirun=False)) == 1


def test_planned_point_carries_the_same_accounting_studies_run_logs():
    ((job, cfg),) = compose_jobs(["granularity=8", "tokens=100000"], multirun=False)
    point = build_point(load_run_config(cfg))
    plan = _one(["granularity=8", "tokens=100000"])
    acct = point.accounting()
    assert plan.params_total == acct["acct.params_total"]
    assert plan.params_active_non_embedding == acct["acct.params_active_non_embedding"]
    assert plan.flops_per_token_train == acct["acct.flops_per_token_train"]
    assert plan.steps == acct["acct.steps"] == 13  # ceil(100000 / 8192)
    assert plan.tokens == 13 * 8192
    assert plan.train_flops == pytest.approx(plan.flops_per_token_train * plan.tokens)


def test_gpu_hours_scale_with_mfu_and_peak():
    plan = _one(["model=olmoe_1b_7b", *BIG_BATCH], hw=hardware("a100", mfu=0.5))
    assert plan.gpu_hours == pytest.approx(plan.train_flops / (0.5 * 312e12) / 3600)
    h100 = _one(["model=olmoe_1b_7b", *BIG_BATCH], hw=hardware("h100", mfu=0.5))
    assert plan.gpu_hours / h100.gpu_hours == pytest.approx(GPU_PEAK_FLOPS["h100"] / GPU_PEAK_FLOPS["a100"])
    assert hardware("a100", peak_flops=1e15).peak_flops == 1e15
    with pytest.raises(ValueError, match="--mfu=1.5"):
        hardware(mfu=1.5)
    with pytest.raises(ValueError, match="--gpu='tpu'"):
        hardware("tpu")


def test_a_preset_plans_at_its_pinned_vocabulary_and_a_set_one_changes_only_the_embeddings():
    by_model = _one(["model=mixtral_8x7b", *BIG_BATCH])
    by_data = _one(["model=mixtral_8x7b", "model.vocab_size=4096", *BIG_BATCH])
    assert by_data.vocab_size == 4096
    assert by_model.params_total - by_data.params_total == 2 * 4096 * (32000 - 4096)
    assert by_model.params_non_embedding == by_data.params_non_embedding


def test_cli_prints_json_with_assumptions_and_a_table_with_notes(capsys):
    assert main(["-m", "--json", "--gpu", "a100", "--mfu", "0.3", "granularity=1,8", "tokens=81920"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["assumptions"] == {"gpu": "a100", "peak_flops": 312e12, "mfu": 0.3, "seconds_per_hour": 3600}
    assert [p["variant"] for p in out["points"]] == ["moe-E8-k2-G1", "moe-E8-k2-G8"]
    assert out["total"]["gpu_hours"] == pytest.approx(sum(p["gpu_hours"] for p in out["points"]))
    assert main(["model=mixtral_8x7b", *BIG_BATCH]) == 0
    table = capsys.readouterr().out
    assert "46.7B" in table and "12.9B" in table and "MFU 0.40 of h100 peak 989 TFLOP/s" in table
    assert "vocabulary 32000" in table


def test_cli_reports_invalid_points_with_the_key_and_exits_nonzero(capsys):
    assert main(["model=mixtral_8x7b", "model.seq_len=32768"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_tokens=8192 must be a positive multiple of model.seq_len=32768" in err
    assert main(["-m", "granularity=1,3"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 sweep points are invalid" in err and "granularity=3" in err


def test_the_56b_preset_gets_a_feasible_layout_on_h100_80gb_nodes(capsys):
    assert main(["--layout", "8", "64", "model=beyond50b_56b"]) == 0
    out = capsys.readouterr().out
    expected = (
        "layout model=beyond50b_56b: 4 node(s) x 8 GPUs: parallel.mode=fsdp parallel.dp_shard=4 "
        "parallel.ep=8 parallel.activation_checkpointing=true, micro-batch 2 seqs"
    )
    assert expected in out, out[-2000:]
    assert "GiB per rank" in out


def test_a_layout_that_cannot_exist_is_refused_with_the_flag(capsys):
    assert main(["--layout", "0", "4"]) == 2
    assert "--layout 0 4" in capsys.readouterr().err
