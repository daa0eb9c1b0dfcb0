"""Dense feed-forward block (SwiGLU or GELU) and the activation math shared with the experts.

`hidden` is the single definition of the activation used by `FeedForward` and by both expert
backends in `moe.model.experts`, so a dense FFN and a one-expert MoE compute exactly the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.model.config import Activation, InitScheme


def hidden(a1: Tensor, a3: Tensor | None, activation: Activation) -> Tensor:
    """Hidden activation from the input projections: silu(a1) * a3 (swiglu) or gelu(a1)."""
    if activation == "swiglu":
        return F.silu(a1) * a3
    return F.gelu(a1)


def init_weight_(w: Tensor, init: InitScheme, std: float, fan_in: int) -> None:
    """normal: N(0, std); fan_in: normal with std 1/sqrt(fan_in), truncated at +-2 std."""
    with torch.no_grad():
        if init == "normal":
            w.normal_(0.0, std)
        else:
            s = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(w, mean=0.0, std=s, a=-2 * s, b=2 * s)


class FeedForward(nn.Module):
    """x -> w2(hidden(w1 x, w3 x)); bias-free, the dense baseline and the shared expert."""

    def __init__(self, d_model: int, d_hidden: int, activation: Activation):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a3 = self.w3(x) if self.w3 is not None else None
        return self.w2(hidden(self.w1(x), a3, self.activation))

    def reset_parameters(self, init: InitScheme, std: float, out_std: float) -> None:
        """Input projections N(0, std), output projection N(0, out_std); or fan-in truncated normal."""
        d_model, d_hidden = self.w1.in_features, self.w1.out_features
        init_weight_(self.w1.weight, init, std, d_model)
        if self.w3 is not None:
            init_weight_(self.w3.weight, init, std, d_model)
        init_weight_(self.w2.weight, init, out_std, d_hidden)
