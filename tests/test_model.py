import math

import pytest
import torch
import torch.nn.functional as F

from moe.model.accounting import count_params, count_params_of_module
from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.transformer import ModelOutput, Transformer, apply_rope, rope_tables

TINY = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    seq_len=16,
    moe=MoEConfig(num_experts=4, top_k=2, granularity=2),
)
DENSE = replace(TINY, moe=None)
CONFIGS = {"dense": DENSE, "moe": TINY}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny shapes: a second thread only adds contention on the shared 2-core machines.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_gives_same_output(name):
    x = _batch(CONFIGS[name])[:, :-1]
    a, b = _model(CONFIGS[name])(x), _model(CONFIGS[name])(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert not torch.equal(a.logits, _model(CONFIGS[name], seed=1)(x).logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_model_overfits_a_fixed_batch(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    xy = _batch(cfg, batch=4)
    first = None
    for _ in range(120):
        out = model(xy[:, :-1], xy[:, 1:])
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
        model.update_balancing(out.router)
        first = out.loss.item() if first is None else first
    assert first > math.log(cfg.vocab_size) - 0.5  # started near uniform
    assert out.loss.item() < 0.1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_fields_and_loss_is_fp32_cross_entropy(name):
    cfg = CONFIGS[name]
    xy = _batch(cfg)
    out = _model(cfg)(xy[:, :-1], xy[:, 1:])
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert out.loss.dtype == torch.float32 and out.aux_loss.shape == ()
    expected = F.cross_entropy(out.logits.flatten(0, 1), xy[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    assert len(out.router) == (cfg.n_layers if cfg.moe else 0)
    if cfg.moe is None:
        assert out.aux_loss.item() == 0.0
    else:
        torch.testing.assert_close(out.aux_loss, sum(a.loss for a in out.router))
        assert out.aux_loss.item() > 0


def test_targets_marked_minus_100_are_ignored():
    xy = _batch(DENSE)
    model = _model(DENSE)
    y = xy[:, 1:].clone()
    y[:, : DENSE.seq_len // 2] = -100
    out = model(xy[:, :-1], y)
    kept = out.logits[:, DENSE.seq_len // 2 :].flatten(0, 1)
    torch.testing.assert_close(out.loss, F.cross_entropy(kept, y[:, DENSE.seq_len // 2 :].flatten()))


def test_without_targets_loss_is_none():
    assert _model(DENSE)(_batch(DENSE)[:, :-1]).loss is None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_is_causal(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    x = _batch(cfg)[:, :-1]
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % cfg.vocab_size
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gqa_equals_mha_with_each_kv_head_repeated():
    gqa_cfg = replace(DENSE, n_kv_heads=2)
    gqa, mha = _model(gqa_cfg), _model(DENSE)
    shared = {k: v for k, v in gqa.state_dict().items() if ".wk." not in k and ".wv." not in k}
    mha.load_state_dict(shared, strict=False)
    hd, rep = DENSE.head_dim, DENSE.n_heads // 2
    with torch.no_grad():
        for bg, bm in zip(gqa.blocks, mha.blocks, strict=True):
            for name in ("wk", "wv"):
                w_JKD = getattr(bg.attn, name).weight.view(2, hd, DENSE.d_model)
                getattr(bm.attn, name).weight.copy_(w_JKD.repeat_interleave(rep, dim=0).flatten(0, 1))
    x = _batch(DENSE)[:, :-1]
    torch.testing.assert_close(gqa(x).logits, mha(x).logits)
    assert count_params_of_module(gqa) < count_params_of_module(mha)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q_K, k_K = torch.randn(8), torch.randn(8)
    cos, sin = rope_tables(12, 8, 10000.0, torch.device("cpu"))

    def score(m, n):
        q = apply_rope(q_K.expand(1, 1, 12, 8), cos, sin)[0, 0, m]
        k = apply_rope(k_K.expand(1, 1, 12, 8), cos, sin)[0, 0, n]
        return q @ k

    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(score(0, 0), q_K @ k_K)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_tied_head_reuses_the_embedding_and_untied_has_its_own():
    tied = _model(DENSE)
    assert tied.lm_head is None
    x = _batch(DENSE)[:, :-1]
    tied(x, x).loss.backward()
    assert tied.embed.weight.grad is not None
    untied = _model(replace(DENSE, tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_normal_init_scales_output_projections_by_depth():
    cfg = replace(DENSE, d_model=128, d_ff=512, n_layers=8, vocab_size=512)
    model = _model(cfg)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[0].attn.wq.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[3].attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.blocks[3].ffn.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    torch.testing.assert_close(model.norm.weight, torch.ones(cfg.d_model))


def test_fan_in_init_is_truncated_normal_with_std_one_over_sqrt_fan_in():
    cfg = replace(DENSE, d_model=128, d_ff=512, vocab_size=512, init="fan_in", tie_embeddings=False)
    model = _model(cfg)
    for w in (model.blocks[0].attn.wq.weight, model.blocks[0].attn.wo.weight, model.lm_head.weight):
        s = 1 / math.sqrt(w.shape[1])
        assert w.abs().max().item() <= 2 * s + 1e-6
        # a N(0, s) truncated at 2s has std 0.88 s
        assert w.std().item() == pytest.approx(0.88 * s, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_autocast_forward_runs_on_cpu(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    xy = _batch(cfg)
    ref = model(xy[:, :-1], xy[:, 1:]).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xy[:, :-1], xy[:, 1:])
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_first_dense_layers_are_dense_and_moe_indices_follow():
    model = _model(replace(TINY, n_layers=3, first_dense_layers=1))
    assert model.moe_layer_indices == [1, 2]
    assert [b.is_moe for b in model.blocks] == [False, True, True]
    assert len(model(_batch(TINY)[:, :-1]).router) == 2


def test_update_balancing_moves_router_bias_when_enabled():
    cfg = replace(TINY, **{"moe.bias_update_rate": 0.01, "moe.aux_loss_coef": 0.0})
    model = _model(cfg)
    out = model(_batch(cfg)[:, :-1])
    before = [model.blocks[i].ffn.router.expert_bias.clone() for i in model.moe_layer_indices]
    model.update_balancing(out.router)
    after = [model.blocks[i].ffn.router.expert_bias for i in model.moe_layer_indices]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError, match="router outputs"):
        model.update_balancing(out.router[:1])


def test_meta_build_then_to_empty_and_reset_gives_a_working_model():
    with torch.device("meta"):
        model = Transformer(TINY)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    out = model(*_batch(TINY).split([TINY.seq_len, 1], dim=1)[:1])
    assert torch.isfinite(out.logits).all()
    assert count_params_of_module(model) == count_params(TINY).total


def test_bad_config_fails_at_build_and_long_input_in_forward():
    with pytest.raises(ValueError, match="moe.granularity=3"):
        Transformer(replace(TINY, **{"moe.granularity": 3}))
    with pytest.raises(ValueError, match="model.seq_len=16"):
        _model(DENSE)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_compile_matches_eager_forward_and_gradients(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    xy = _batch(cfg)
    eager = model(xy[:, :-1], xy[:, 1:])
    eager_grads = torch.autograd.grad(eager.loss + eager.aux_loss, list(model.parameters()))
    compiled = torch.compile(model)(xy[:, :-1], xy[:, 1:])
    compiled_grads = torch.autograd.grad(compiled.loss + compiled.aux_loss, list(model.parameters()))
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-4, atol=1e-4)


def test_qk_norm_makes_attention_independent_of_the_scale_of_queries_and_keys():
    cfg = replace(TINY, qk_norm=True)
    model, x = _model(cfg), _batch(cfg)[:, :-1]
    before = model(x).logits
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wq.weight.mul_(8.0)
            block.attn.wk.weight.mul_(3.0)
    torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)
    plain = _model(TINY)
    with torch.no_grad():
        reference = plain(x).logits
        plain.blocks[0].attn.wq.weight.mul_(8.0)
    assert not torch.allclose(plain(x).logits, reference, atol=1e-3), "without qk_norm the scale matters"


def test_logit_z_loss_joins_the_aux_loss_never_the_lm_loss():
    cfg = replace(TINY, logit_z_loss=1e-3)
    batch = _batch(cfg)
    x, y = batch[:, :-1], batch[:, 1:]
    with_z, without = _model(cfg)(x, y), _model(TINY)(x, y)
    torch.testing.assert_close(with_z.loss, without.loss)
    z = 1e-3 * torch.logsumexp(without.logits.float(), dim=-1).pow(2).mean()
    torch.testing.assert_close(with_z.aux_loss, without.aux_loss + z)
    with pytest.raises(ValueError, match="model.logit_z_loss"):
        Transformer(replace(TINY, logit_z_loss=-1.0))
