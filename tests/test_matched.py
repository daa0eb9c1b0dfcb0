import copy

import pytest

from moe.model.accounting import count_params, flops_per_token
from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.matched import derive

BASE = ModelConfig(
    vocab_size=512,
    d_model=128,
    n_layers=4,
    n_heads=4,
    d_ff=512,
    seq_len=64,
    moe=MoEConfig(num_experts=8, top_k=2, granularity=1),
)
SHARED = replace(BASE, first_dense_layers=1, **{"moe.num_shared": 1, "moe.shared_gate": True})
GS = [1, 2, 4, 8, 16]


def _moe_norms(cfg: ModelConfig) -> int:
    """The MoE output LayerNorm params, which have no dense counterpart."""
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    return 2 * cfg.d_model * n_moe if cfg.moe is not None and cfg.moe.output_norm else 0


def _active_without_router(cfg):
    p = count_params(cfg)
    return p.active_non_embedding - p.router - _moe_norms(cfg)


def _total_without_router(cfg):
    p = count_params(cfg)
    return p.non_embedding - p.router - _moe_norms(cfg)


def _flops_without_router(cfg):
    f = flops_per_token(cfg)
    return f.forward - f.router_forward


@pytest.mark.parametrize(
    "base", [BASE, SHARED, replace(BASE, **{"moe.output_norm": True})], ids=["plain", "shared", "norm"]
)
def test_granularity_derivation_keeps_active_params_and_flops_equal(base):
    derived = [derive(base, granularity=g) for g in GS]
    assert [c.moe.granularity for c in derived] == GS
    assert len({_active_without_router(c) for c in derived}) == 1
    assert len({_flops_without_router(c) for c in derived}) == 1
    assert len({_total_without_router(c) for c in derived}) == 1
    # only the router grows, linearly in G
    routers = [count_params(c).router for c in derived]
    n_moe = base.n_layers - base.first_dense_layers
    assert [r - routers[0] for r in routers] == [n_moe * base.d_model * 8 * (g - 1) for g in GS]


def test_granularity_derivation_keeps_experts_and_top_k():
    c = derive(BASE, granularity=8)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.n_routed, c.moe.k_routed) == (8, 2, 64, 16)
    assert c.d_ff == BASE.d_ff


@pytest.mark.parametrize(
    "base", [BASE, SHARED, replace(BASE, **{"moe.granularity": 4})], ids=["plain", "shared", "G4"]
)
@pytest.mark.parametrize("k", [1, 4, 8])
def test_top_k_derivation_keeps_active_and_total_equal(base, k):
    c = derive(base, top_k=k)
    assert c.moe.top_k == k
    assert c.moe.num_experts == base.moe.num_experts * k // base.moe.top_k
    assert _active_without_router(c) == _active_without_router(base)
    assert _total_without_router(c) == _total_without_router(base)
    assert _flops_without_router(c) == _flops_without_router(base)
    assert c.d_ff == base.d_ff  # dense blocks untouched


@pytest.mark.parametrize(
    "base",
    [BASE, SHARED, replace(BASE, **{"moe.granularity": 8, "moe.output_norm": True})],
    ids=["plain", "shared", "G8norm"],
)
def test_dense_active_derivation_matches_active_params_and_flops(base):
    c = derive(base, dense="active")
    assert c.moe is None
    assert count_params(c).active_non_embedding == _active_without_router(base)
    assert flops_per_token(c).forward == _flops_without_router(base)


def test_dense_active_width_is_k_times_d_expert_plus_shared():
    assert derive(BASE, dense="active").d_ff == 2 * 512
    # 1dense + SE: (1*512 + 3*(2*512 + 1024)) / 4
    assert derive(SHARED, dense="active").d_ff == (512 + 3 * (1024 + 1024)) // 4


@pytest.mark.parametrize(
    "base", [BASE, SHARED, replace(BASE, **{"moe.granularity": 4})], ids=["plain", "shared", "G4"]
)
def test_dense_total_derivation_matches_total_non_embedding_params(base):
    c = derive(base, dense="total")
    assert c.moe is None
    assert count_params(c).non_embedding == _total_without_router(base)
    assert derive(BASE, dense="total").d_ff == 8 * 512


def test_derive_never_mutates_base():
    base = copy.deepcopy(SHARED)
    for kw in ({"granularity": 4}, {"top_k": 4}, {"dense": "active"}, {"dense": "total"}):
        out = derive(base, **kw)
        assert out is not base and out.moe is not base.moe
    assert base == SHARED


BAD = [
    ({"granularity": 3}, "granularity=3 does not divide the expert size model.d_ff=512"),
    ({"granularity": 0}, "granularity=0"),
    ({"top_k": 3}, "is not an integer"),
    ({"top_k": 0}, "top_k=0"),
    ({"dense": "half"}, "dense='half'"),
    ({}, "exactly one"),
    ({"granularity": 2, "top_k": 4}, "exactly one"),
]


@pytest.mark.parametrize(("kw", "message"), BAD, ids=[str(k) for k, _ in BAD])
def test_impossible_derivation_raises_a_clear_error(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        derive(BASE, **kw)


def test_granularity_derivation_checks_grouped_alignment():
    base = replace(BASE, **{"moe.backend": "grouped"})
    derive(base, granularity=64)  # d_fine = 8
    with pytest.raises(ValueError, match="moe.backend='grouped'"):
        derive(base, granularity=128)  # d_fine = 4


def test_top_k_derivation_rejects_non_integral_expert_count():
    with pytest.raises(ValueError, match="moe.num_experts"):
        derive(replace(BASE, **{"moe.num_experts": 3, "moe.top_k": 2}), top_k=1)


def test_dense_derivation_rejects_non_integral_mean_width():
    base = replace(BASE, n_layers=3, first_dense_layers=1)  # (512 + 2*1024) / 3
    with pytest.raises(ValueError, match="not an integer"):
        derive(base, dense="active")


def test_derive_needs_a_moe_base():
    with pytest.raises(ValueError, match="model.moe is None"):
        derive(replace(BASE, moe=None), granularity=2)
