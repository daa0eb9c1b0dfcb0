import math

import pytest
import torch
import torch.nn.functional as F

from moe.model.ffn import FeedForward


def test_swiglu_feedforward_computes_w2_of_silu_w1_times_w3():
    torch.manual_seed(0)
    ffn = FeedForward(16, 24, "swiglu")
    x = torch.randn(5, 16)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ffn(x), expected)


def test_gelu_feedforward_has_two_bias_free_matrices_and_computes_w2_gelu_w1():
    torch.manual_seed(0)
    ffn = FeedForward(16, 24, "gelu")
    names = {n: tuple(p.shape) for n, p in ffn.named_parameters()}
    assert names == {"w1.weight": (24, 16), "w2.weight": (16, 24)}
    x = torch.randn(5, 16)
    torch.testing.assert_close(ffn(x), F.gelu(x @ ffn.w1.weight.T) @ ffn.w2.weight.T)


def test_normal_init_uses_std_for_inputs_and_out_std_for_output():
    torch.manual_seed(0)
    ffn = FeedForward(256, 512, "swiglu")
    ffn.reset_parameters("normal", std=0.02, out_std=0.005)
    for w, s in ((ffn.w1.weight, 0.02), (ffn.w3.weight, 0.02), (ffn.w2.weight, 0.005)):
        assert w.mean().abs() < s * 0.02
        assert w.std().item() == pytest.approx(s, rel=0.02)


def test_fan_in_init_is_truncated_normal_scaled_by_fan_in():
    torch.manual_seed(0)
    ffn = FeedForward(256, 1024, "gelu")
    ffn.reset_parameters("fan_in", std=123.0, out_std=456.0)  # std values are ignored by fan_in
    # A normal truncated at +-2 sigma keeps std 0.8796 sigma.
    for w, fan_in in ((ffn.w1.weight, 256), (ffn.w2.weight, 1024)):
        s = 1 / math.sqrt(fan_in)
        assert w.abs().max().item() <= 2 * s
        assert w.std().item() == pytest.approx(0.8796 * s, rel=0.02)
