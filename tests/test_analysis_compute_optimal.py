"""analysis.compute_optimal's router-FLOP convention: stated, selectable, validated."""

import pytest
from torch.testing import assert_close

from analysis.compute_optimal import ComputeModel, compute_optimal
from analysis.laws import law_from_preset
from moe.model.accounting import count_params, flops_per_token
from moe.model.config import ModelConfig, MoEConfig


def test_router_flops_paper_is_c_r_14_and_matmul_is_6():
    assert ComputeModel().router_flops == "paper" and ComputeModel().c_r == 14.0
    assert ComputeModel(router_flops="matmul").c_r == 6.0


def test_matmul_convention_equals_moe_accountings_router_flops_per_param():
    cfg = ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        moe=MoEConfig(num_experts=4, top_k=1, granularity=2),
    )
    per_param = 3 * flops_per_token(cfg).router_forward / count_params(cfg).router
    assert_close(per_param, ComputeModel(router_flops="matmul").c_r, rtol=1e-12, atol=0)


def test_invalid_router_flops_names_the_field():
    with pytest.raises(ValueError, match="compute.router_flops='flops' must be one of paper, matmul"):
        ComputeModel(router_flops="flops")
    with pytest.raises(ValueError, match="compute.expansion=0 must be > 0"):
        ComputeModel(expansion=0)


def test_compute_optimum_states_its_router_flop_convention():
    law = law_from_preset("krajewski2024")
    opt = compute_optimal(law, 3e18)
    assert "router_flops=paper (c_r = 14" in opt.convention and opt.convention in opt.describe()
    assert opt.describe().startswith("3e+18 FLOPs: G = 8, ")
    m = compute_optimal(law, 3e18, compute=ComputeModel(router_flops="matmul"))
    assert "router_flops=matmul (c_r = 6" in m.describe()


def test_cheaper_router_flops_move_the_compute_optimal_granularity_up():
    # The paper's G = 8 at 3e18 rests on c_r = 14; counting the router as a matmul makes large G cheaper.
    law = law_from_preset("krajewski2024")
    paper = compute_optimal(law, 3e18)
    matmul = compute_optimal(law, 3e18, compute=ComputeModel(router_flops="matmul"))
    assert (paper.granularity, matmul.granularity) == (8, 16)
    cm = ComputeModel(router_flops="matmul")
    assert_close(cm.flops(matmul.n_blocks, matmul.tokens, matmul.granularity), 3e18, rtol=1e-9, atol=0)
