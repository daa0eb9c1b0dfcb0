import time

import pytest
import torch

from moe.model.accounting import count_params, count_params_of_module, flops_per_token
from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.transformer import Transformer

# ~56B total parameters (paper 2's largest scale): 64 fine experts, top-16 at G=8.
BIG = ModelConfig(
    vocab_size=50304,
    d_model=4096,
    n_layers=38,
    n_heads=32,
    n_kv_heads=8,
    d_ff=14336,
    seq_len=4096,
    tie_embeddings=False,
    moe=MoEConfig(num_experts=8, top_k=2, granularity=8),
)

TINY = ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, d_ff=64, seq_len=16)
GRID = {
    "dense": replace(TINY, moe=None),
    "dense_gelu_untied": replace(TINY, moe=None, activation="gelu", tie_embeddings=False),
    "moe_G1": TINY,
    **{f"moe_G{g}": replace(TINY, **{"moe.granularity": g}) for g in (2, 4, 8, 16)},
    "moe_gqa_untied": replace(TINY, n_kv_heads=2, tie_embeddings=False),
    "moe_gelu_d_expert": replace(TINY, activation="gelu", **{"moe.d_expert": 48, "moe.granularity": 2}),
    "moe_shared_gate": replace(TINY, **{"moe.num_shared": 2, "moe.shared_gate": True, "moe.granularity": 4}),
    "moe_shared_sized": replace(TINY, **{"moe.num_shared": 1, "moe.d_shared": 24}),
    "moe_output_norm": replace(TINY, **{"moe.output_norm": True, "moe.granularity": 8}),
    "moe_first_dense": replace(TINY, first_dense_layers=1),
    "moe_qk_norm": replace(TINY, qk_norm=True),
    "moe_expert_choice": replace(TINY, **{"moe.router": "expert_choice", "moe.capacity_factor": 1.5}),
    "moe_everything": replace(
        TINY,
        n_kv_heads=1,
        tie_embeddings=False,
        activation="gelu",
        first_dense_layers=2,
        **{"moe.granularity": 4, "moe.num_shared": 1, "moe.shared_gate": True, "moe.output_norm": True},
    ),
}


@pytest.mark.parametrize("name", list(GRID))
def test_param_count_equals_numel_of_model_built_on_meta(name):
    cfg = GRID[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    p = count_params(cfg)
    assert p.total == count_params_of_module(model)
    assert p.total == sum(
        p.as_dict()[k]
        for k in (
            "embedding",
            "lm_head",
            "attention",
            "dense_ffn",
            "routed_total",
            "shared",
            "router",
            "norms",
        )
    )


def _numel(model, *fragments):
    return sum(p.numel() for n, p in model.named_parameters() if any(f in n for f in fragments))


@pytest.mark.parametrize("name", ["moe_everything", "moe_shared_gate", "dense_gelu_untied"])
def test_each_named_group_equals_numel_of_its_parameters(name):
    cfg = GRID[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    p = count_params(cfg)
    assert p.embedding == _numel(model, "embed.")
    assert p.lm_head == _numel(model, "lm_head.")
    assert p.attention == _numel(model, ".attn.")
    assert p.routed_total == _numel(model, ".experts.")
    assert p.router == _numel(model, ".router.", ".shared_gate.")
    assert p.shared == _numel(model, ".shared.")
    assert p.norms == _numel(model, "norm.")
    dense_blocks = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    assert p.dense_ffn == _numel(model, *[f"blocks.{i}.ffn." for i in dense_blocks])


def test_active_params_count_k_times_g_fine_experts():
    cfg = GRID["moe_everything"]
    p = count_params(cfg)
    n_moe = cfg.n_layers - cfg.first_dense_layers
    d_fine = cfg.d_ff // cfg.moe.granularity
    assert p.routed_active == n_moe * cfg.moe.k_routed * 2 * cfg.d_model * d_fine  # gelu: w1, w2
    assert p.active == p.total - p.routed_total + p.routed_active
    assert p.non_embedding == p.total - p.embedding - p.lm_head
    assert p.active_non_embedding == p.active - p.embedding - p.lm_head


def test_tied_embedding_counts_once_and_untied_adds_a_head():
    tied, untied = count_params(TINY), count_params(replace(TINY, tie_embeddings=False))
    assert tied.lm_head == 0
    assert untied.total - tied.total == TINY.vocab_size * TINY.d_model
    assert untied.non_embedding == tied.non_embedding


@pytest.mark.parametrize("g", [1, 2, 4, 8, 16])
def test_params_match_the_fine_grained_paper_formula(g):
    # 2402.07871 §1: N = d^2 (8E + 4) n_blocks for gelu, d_ff = 4d, excluding router and norms.
    d, n, e = 64, 3, 8
    cfg = ModelConfig(
        vocab_size=100,
        d_model=d,
        n_layers=n,
        n_heads=4,
        d_ff=4 * d,
        activation="gelu",
        moe=MoEConfig(num_experts=e, top_k=1, granularity=g),
    )
    p = count_params(cfg)
    assert p.non_embedding - p.router - p.norms == d * d * (8 * e + 4) * n
    assert p.router == d * e * g * n
    # Their compute model: matmul training FLOPs 12 d^2 c_f n_blocks per token with c_f = 6 (k = 1).
    f = flops_per_token(cfg)
    head = 2 * d * cfg.vocab_size
    assert 3 * (f.matmul_forward - head) == 12 * d * d * 6 * n


def test_flops_follow_the_stated_convention():
    cfg = replace(GRID["moe_everything"], seq_len=128)
    p, f = count_params(cfg), flops_per_token(cfg)
    matmul_params = p.attention + p.dense_ffn + p.routed_active + p.shared
    assert f.matmul_forward == 2 * matmul_params + 2 * cfg.d_model * cfg.vocab_size
    assert f.attention_forward == 4 * cfg.n_layers * cfg.seq_len * cfg.d_model  # non-causal QK^T + AV
    assert f.router_forward == 2 * p.router
    assert f.forward == f.matmul_forward + f.attention_forward + f.router_forward
    assert f.train == 3 * f.forward
    assert set(f.as_dict()) == {"forward", "train", "matmul_forward", "attention_forward", "router_forward"}


def test_dense_training_flops_are_six_n_plus_attention():
    cfg = replace(TINY, moe=None, tie_embeddings=False)
    p, f = count_params(cfg), flops_per_token(cfg)
    n = p.non_embedding - p.norms + p.lm_head  # Kaplan's N plus the unembedding matmul
    assert f.train == 6 * n + 3 * f.attention_forward


def test_expert_choice_flops_scale_with_capacity_factor():
    tc = flops_per_token(TINY)
    ec = flops_per_token(GRID["moe_expert_choice"])
    routed = 2 * count_params(TINY).routed_active
    assert ec.matmul_forward - tc.matmul_forward == pytest.approx(0.5 * routed)


def test_accounting_of_a_56b_config_takes_milliseconds_and_allocates_nothing():
    start = time.perf_counter()
    p, f = count_params(BIG), flops_per_token(BIG)
    assert time.perf_counter() - start < 0.05
    assert 50e9 < p.total < 60e9
    assert 10e9 < p.active < 20e9
    assert f.train > 6 * p.active_non_embedding


@pytest.mark.slow
def test_56b_model_builds_on_meta_and_matches_accounting():
    with torch.device("meta"):
        model = Transformer(BIG)
    assert all(p.is_meta for p in model.parameters())
    assert count_params_of_module(model) == count_params(BIG).total
