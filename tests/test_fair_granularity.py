"""A fine-grained model cut from a G=1 model computes the G=1 function (docs/method.md §6).

The split (moe.model.matched.split_state_dict) cuts every coarse expert into G hidden slices and repeats its
router row G times; with the default moe.routed_scale the derived model's logits, losses and gradients
equal the G=1 model's, for every score function and ordering, token and expert choice, with shared
experts and capacity dropping.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config

from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.layer import MoELayer
from moe.model.matched import derive, split_state_dict
from moe.model.transformer import Transformer
from studies.job.config import load_run_config
from studies.job.point import derive_model

G = 4


def _base(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, **moe),
    )


def _coarse_grads(named_grads: dict[str, torch.Tensor], granularity: int) -> dict[str, torch.Tensor]:
    """Gradients of a split model mapped onto the G=1 parameters (sum over the copies of a router row)."""
    out = {}
    for name, g in named_grads.items():
        if name.endswith(("experts.w1", "experts.w3")):
            N, D, F_ = g.shape
            E = N // granularity
            out[name] = g.reshape(E, granularity, D, F_).permute(0, 2, 1, 3).reshape(E, D, granularity * F_)
        elif name.endswith("experts.w2"):
            N, F_, D = g.shape
            out[name] = g.reshape(N // granularity, granularity * F_, D)
        elif name.endswith("router.weight"):
            N, D = g.shape
            out[name] = g.reshape(N // granularity, granularity, D).sum(1)
        else:
            out[name] = g
    return out


def _loss_and_grads(model: Transformer, idx, targets):
    model.zero_grad(set_to_none=True)
    out = model(idx, targets)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


ROUTERS = [
    pytest.param({"score": "softmax", "order": "before_topk"}, id="softmax-before"),
    pytest.param({"score": "softmax", "order": "before_topk_renorm"}, id="softmax-renorm"),
    pytest.param({"score": "softmax", "order": "after_topk"}, id="softmax-after"),
    pytest.param({"score": "sigmoid", "order": "before_topk"}, id="sigmoid-before"),
    pytest.param({"score": "sigmoid", "order": "before_topk_renorm"}, id="sigmoid-renorm"),
    pytest.param({"score": "sigmoid", "order": "after_topk"}, id="sigmoid-after"),
    pytest.param({"num_shared": 1, "shared_gate": True}, id="shared-gated"),
    pytest.param({"num_shared": 1, "output_norm": True}, id="shared-output-norm"),
    pytest.param({"capacity_factor": 1.0}, id="token-choice-capacity"),
    pytest.param({"router": "expert_choice", "capacity_factor": 1.0}, id="expert-choice-by-position"),
    pytest.param({"router": "expert_choice", "expert_choice_scope": "batch"}, id="expert-choice-batch"),
    pytest.param({"router": "expert_choice", "score": "sigmoid"}, id="expert-choice-sigmoid"),
    pytest.param({"bias_update_rate": 0.01, "z_loss_coef": 0.1}, id="bias-and-z-loss"),
]


@pytest.mark.parametrize("moe", ROUTERS)
def test_split_fine_grained_model_reproduces_coarse_logits_and_gradients(moe):
    torch.manual_seed(0)
    base = _base(**moe)
    coarse = Transformer(base)
    fine_cfg = derive(base, granularity=G)
    fine = Transformer(fine_cfg)
    fine.load_state_dict(split_state_dict(coarse.state_dict(), base, G))
    idx = torch.randint(0, base.vocab_size, (8, base.seq_len))
    targets = torch.randint(0, base.vocab_size, (8, base.seq_len))

    out_c, grads_c = _loss_and_grads(coarse, idx, targets)
    out_f, grads_f = _loss_and_grads(fine, idx, targets)

    torch.testing.assert_close(out_f.logits, out_c.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_f.loss, out_c.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_f.aux_loss, out_c.aux_loss, atol=1e-5, rtol=1e-5)
    mapped = _coarse_grads(grads_f, G)
    assert mapped.keys() == grads_c.keys()
    for name, g in grads_c.items():
        torch.testing.assert_close(mapped[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_without_routed_scale_the_split_model_outputs_a_gth_of_the_coarse_layer():
    """The bias the compensation removes: gates of a split layer are G times smaller."""
    torch.manual_seed(0)
    base = _base()
    coarse = MoELayer(base)
    fine_cfg = replace(derive(base, granularity=G), **{"moe.routed_scale": 1.0})
    fine = MoELayer(fine_cfg)
    prefixed = {f"ffn.{k}": v for k, v in coarse.state_dict().items()}
    fine.load_state_dict({k[4:]: v for k, v in split_state_dict(prefixed, base, G).items()})
    x = torch.randn(4, 8, base.d_model)
    y_c, _ = coarse(x)
    y_f, _ = fine(x)
    torch.testing.assert_close(y_f * G, y_c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("moe", "expected"),
    [
        ({"score": "softmax", "order": "before_topk"}, G),
        ({"score": "softmax", "order": "after_topk"}, G),
        ({"score": "sigmoid", "order": "before_topk_renorm"}, G),
        ({"score": "sigmoid", "order": "before_topk"}, 1.0),
        ({"router": "expert_choice", "score": "sigmoid"}, 1.0),
        ({"routed_scale": 2.5}, 2.5),
    ],
)
def test_routed_scale_default_follows_granularity_and_ordering(moe, expected):
    assert derive(_base(**moe), granularity=G).moe.routed_scale_used == expected


@pytest.mark.parametrize(
    ("key", "value"), [("routed_scale", 0.0), ("routed_scale", -1.0), ("output_norm_eps", 0.0)]
)
def test_non_positive_routed_scale_or_norm_eps_is_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"moe\.{key}={value}"):
        Transformer(_base(**{key: value}))


def _moe_output_rms(overrides: list[str]) -> float:
    """RMS at init of the first MoE block's output for the real composed preset."""
    run = load_run_config(compose_config(overrides))
    model_cfg = derive_model(run, run.data.vocab_size)
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    block = model.blocks[model.moe_layer_indices[0]]
    with torch.no_grad():
        x = model.embed(torch.randint(0, model_cfg.vocab_size, (4, model_cfg.seq_len)))
        y, _ = block.ffn(block.ffn_norm(x))
    return float(y.square().mean().sqrt())


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_output_norm_gives_unit_rms_at_every_granularity(preset):
    rms = {
        g: _moe_output_rms([f"model={preset}", "model.moe.output_norm=true", f"granularity={g}"])
        for g in (1, 8)
    }
    assert rms[1] == pytest.approx(1.0, abs=1e-3)
    assert rms[8] == pytest.approx(1.0, abs=1e-3)
    assert rms[8] / rms[1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_moe_output_scale_at_init_does_not_shrink_with_granularity(preset):
    ratio = _moe_output_rms([f"model={preset}", "granularity=8"]) / _moe_output_rms([f"model={preset}"])
    # Independent inits differ by sampling noise only; the uncompensated layer read ~1/8.
    assert 0.7 < ratio < 1.4, ratio
    unscaled = _moe_output_rms([f"model={preset}", "granularity=8", "model.moe.routed_scale=1.0"])
    assert unscaled / _moe_output_rms([f"model={preset}"]) < 0.2


def _causal_logits_unchanged_by_future(cfg: ModelConfig, train_mode: bool) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train(train_mode)
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len))
    cut = cfg.seq_len // 2
    changed = idx.clone()
    changed[0, cut:] = torch.randint(0, cfg.vocab_size, (cfg.seq_len - cut,))
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    return float((a[:, :cut] - b[:, :cut]).abs().max())


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_expert_choice_by_position_is_causal(train_mode):
    cfg = _base(router="expert_choice", capacity_factor=1.0)
    assert _causal_logits_unchanged_by_future(cfg, train_mode) == 0.0


def test_expert_choice_over_the_batch_leaks_the_future():
    cfg = _base(router="expert_choice", capacity_factor=1.0, expert_choice_scope="batch")
    assert _causal_logits_unchanged_by_future(cfg, False) > 1e-6


def test_normalised_router_diagnostics_read_the_same_for_a_uniform_router_at_every_granularity():
    reads = {}
    for g in (1, 8):
        cfg = derive(_base(), granularity=g)
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.weight.zero_()  # uniform scores
        _, aux = layer(torch.randn(4, 8, cfg.d_model))
        reads[g] = {k: float(v) for k, v in aux.stats.items()}
    for g in (1, 8):
        assert reads[g]["entropy_norm"] == pytest.approx(1.0, abs=1e-6)
        assert reads[g]["entropy"] == pytest.approx(math.log(4 * g), abs=1e-5)
        assert reads[g]["top1_share_norm"] == pytest.approx(0.0, abs=1e-5)
