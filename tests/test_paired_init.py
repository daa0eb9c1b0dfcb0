"""Paired arms share their random numbers: at one seed, a model that differs only in G starts from the
G-split of the coarse model's experts and from the same attention, embedding and head (moe.model.transformer
stream_seed), so the paired G-difference is not dominated by init noise (docs/method.md §6)."""

from __future__ import annotations

import pytest
import torch

from moe.model.config import ModelConfig, MoEConfig
from moe.model.matched import derive, split_state_dict
from moe.model.transformer import Transformer, stream_seed


def _coarse(activation: str = "swiglu", init: str = "normal") -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        seq_len=16,
        activation=activation,
        init=init,
        tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2, num_shared=1),
    )


def _build(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Transformer(cfg).state_dict()


@pytest.mark.parametrize("activation,init", [("swiglu", "normal"), ("gelu", "fan_in")])
@pytest.mark.parametrize("G", [2, 4])
def test_a_fine_model_starts_from_the_split_of_the_coarse_model_at_the_same_seed(activation, init, G):
    coarse = _coarse(activation, init)
    split = split_state_dict(_build(coarse, 3), coarse, G)
    fine = _build(derive(coarse, granularity=G), 3)
    assert fine.keys() == split.keys()
    for name, t in fine.items():
        if name.endswith("router.weight"):  # E*G iid rows: the one tensor whose size changes with G
            assert t.shape == split[name].shape and not torch.equal(t, split[name])
        else:
            assert torch.equal(t, split[name]), name


def test_different_seeds_give_different_weights_in_every_init_stream():
    a, b = _build(_coarse(), 0), _build(_coarse(), 1)
    drawn = [n for n in a if not n.endswith(("norm.weight", "expert_bias"))]
    assert drawn and all(not torch.equal(a[n], b[n]) for n in drawn)


def test_building_a_model_leaves_the_host_generator_where_the_seed_put_it():
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    Transformer(_coarse())
    assert torch.equal(torch.rand(4), expected) and torch.initial_seed() == 7


def test_stream_seeds_are_stable_and_distinct_per_submodule():
    assert stream_seed(0, "embed") == stream_seed(0, "embed")
    names = ["embed", "blocks.0.attn", "blocks.0.ffn", "blocks.1.ffn", "lm_head"]
    assert len({stream_seed(5, n) for n in names}) == len(names)
    assert stream_seed(5, "embed") != stream_seed(6, "embed")
