import copy
import dataclasses

import pytest

from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.validate import validate_model_config

GOOD = [
    ModelConfig(),
    ModelConfig(moe=None),
    replace(ModelConfig(), **{"moe.granularity": 8}),
    replace(ModelConfig(), **{"moe.order": "after_topk", "moe.top_k": 1, "moe.granularity": 2}),
    replace(ModelConfig(), **{"moe.order": "after_topk", "moe.top_k": 1, "moe.allow_no_router_grad": True}),
    replace(ModelConfig(), **{"moe.router": "expert_choice", "moe.capacity_factor": 1.25}),
    replace(ModelConfig(n_kv_heads=2, first_dense_layers=1, tie_embeddings=False), **{"moe.num_shared": 1}),
    replace(ModelConfig(), **{"moe.backend": "grouped", "moe.granularity": 16}),  # d_fine = 64
    ModelConfig(moe=None, first_dense_layers=4),
]


@pytest.mark.parametrize("cfg", GOOD, ids=range(len(GOOD)))
def test_valid_configs_pass_and_are_not_mutated(cfg):
    before = copy.deepcopy(cfg)
    validate_model_config(cfg)
    assert cfg == before


# (changes, substrings that the message must contain)
BAD = [
    ({"vocab_size": 0}, ["model.vocab_size=0"]),
    ({"d_model": -8}, ["model.d_model=-8"]),
    ({"n_layers": 0}, ["model.n_layers=0"]),
    ({"n_layers": 2.0}, ["model.n_layers=2.0"]),
    ({"n_heads": 0}, ["model.n_heads=0"]),
    ({"d_ff": 0}, ["model.d_ff=0"]),
    ({"seq_len": 0}, ["model.seq_len=0"]),
    ({"n_kv_heads": 0}, ["model.n_kv_heads=0"]),
    ({"rope_theta": 0.0}, ["model.rope_theta=0.0"]),
    ({"norm_eps": -1e-5}, ["model.norm_eps"]),
    ({"init_std": float("nan")}, ["model.init_std=nan"]),
    ({"activation": "relu"}, ["model.activation='relu'", "swiglu"]),
    ({"init": "xavier"}, ["model.init='xavier'", "fan_in"]),
    ({"n_heads": 3}, ["model.n_heads=3", "model.d_model=256"]),
    ({"d_model": 96, "n_heads": 32}, ["model.d_model/model.n_heads", "=3", "even"]),
    ({"n_kv_heads": 3}, ["model.n_kv_heads=3", "model.n_heads=4"]),
    ({"first_dense_layers": -1}, ["model.first_dense_layers=-1"]),
    ({"first_dense_layers": 5}, ["model.first_dense_layers=5", "model.n_layers=4"]),
    ({"first_dense_layers": 4}, ["model.first_dense_layers=4", "no MoE layer"]),
    ({"tie_embeddings": 1}, ["model.tie_embeddings=1"]),
    ({"moe.num_experts": 0}, ["moe.num_experts=0"]),
    ({"moe.granularity": 0}, ["moe.granularity=0"]),
    ({"moe.top_k": 0}, ["moe.top_k=0"]),
    ({"moe.top_k": 9}, ["moe.top_k=9", "moe.num_experts=8"]),
    ({"moe.granularity": 3}, ["moe.granularity=3", "moe.d_expert=1024", "model.d_ff"]),
    ({"moe.d_expert": 96, "moe.granularity": 5}, ["moe.granularity=5", "moe.d_expert=96"]),
    ({"moe.d_expert": 0}, ["moe.d_expert=0"]),
    ({"moe.router": "hash"}, ["moe.router='hash'", "expert_choice"]),
    ({"moe.score": "tanh"}, ["moe.score='tanh'"]),
    ({"moe.order": "topk_first"}, ["moe.order='topk_first'"]),
    ({"moe.backend": "triton"}, ["moe.backend='triton'"]),
    ({"moe.backend": "grouped", "moe.d_expert": 1020}, ["moe.backend='grouped'", "1020", "8"]),
    ({"moe.backend": "grouped", "moe.granularity": 256}, ["moe.backend='grouped'", "=4"]),
    ({"moe.capacity_factor": 0.0}, ["moe.capacity_factor=0.0"]),
    ({"moe.capacity_factor": -1.0}, ["moe.capacity_factor=-1.0"]),
    ({"moe.aux_loss_coef": -0.01}, ["moe.aux_loss_coef=-0.01"]),
    ({"moe.z_loss_coef": -1e-3}, ["moe.z_loss_coef=-0.001"]),
    ({"moe.bias_update_rate": -1e-3}, ["moe.bias_update_rate=-0.001"]),
    ({"moe.jitter": -0.1}, ["moe.jitter=-0.1"]),
    ({"moe.jitter": 1.0}, ["moe.jitter=1.0"]),
    ({"moe.num_shared": -1}, ["moe.num_shared=-1"]),
    ({"moe.num_shared": 1, "moe.d_shared": 0}, ["moe.d_shared=0"]),
    ({"moe.d_shared": 256}, ["moe.d_shared=256", "moe.num_shared=0"]),
    ({"moe.shared_gate": True}, ["moe.shared_gate", "moe.num_shared=0"]),
    ({"moe.output_norm": "yes"}, ["moe.output_norm='yes'"]),
    (
        {"moe.order": "after_topk", "moe.top_k": 1},
        ["moe.order='after_topk'", "no gradient", "allow_no_router_grad"],
    ),
    (
        {"moe.order": "after_topk", "moe.top_k": 1, "moe.score": "sigmoid"},
        ["moe.order='after_topk'", "no gradient"],
    ),
    (
        {"moe.router": "expert_choice", "moe.order": "after_topk"},
        ["moe.order='after_topk'", "expert_choice"],
    ),
    (
        {"moe.router": "expert_choice", "moe.order": "before_topk_renorm"},
        ["moe.order='before_topk_renorm'"],
    ),
    (
        {"moe.router": "expert_choice", "moe.bias_update_rate": 1e-3},
        ["moe.bias_update_rate=0.001", "expert_choice"],
    ),
    ({"moe.router": "expert_choice", "moe.allow_no_router_grad": True}, ["moe.allow_no_router_grad"]),
]


@pytest.mark.parametrize(("changes", "fragments"), BAD, ids=[str(c) for c, _ in BAD])
def test_bad_config_raises_value_error_naming_the_key(changes, fragments):
    cfg = replace(ModelConfig(), **changes)
    with pytest.raises(ValueError) as info:
        validate_model_config(cfg)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_wrong_nested_type_is_rejected():
    cfg = dataclasses.replace(ModelConfig(), moe={"num_experts": 8})
    with pytest.raises(ValueError, match="model.moe must be a MoEConfig"):
        validate_model_config(cfg)


def test_grouped_alignment_applies_to_experts_not_to_dense_ffn():
    validate_model_config(ModelConfig(moe=None, d_ff=1004))
    with pytest.raises(ValueError, match="moe.backend='grouped'"):
        validate_model_config(ModelConfig(d_ff=1004, moe=MoEConfig(backend="grouped")))
