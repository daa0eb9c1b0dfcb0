"""The MoE feed-forward layer: router -> routed experts (+ shared experts) -> optional LayerNorm.

Shape legend: B = batch, S = sequence, T = B*S tokens, D = d_model, N = routed experts (E*G).

  y = out_norm( experts(x; routing) + sum_j gate_j(x) * shared_j(x) )

The optional LayerNorm (`moe.output_norm`, 2402.07871) normalises the sum of routed and shared outputs,
i.e. the whole layer's contribution before the block adds the residual. A token whose assignments were
all dropped gets 0 from the routed experts, so with no shared experts and no output norm it passes
through the residual unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.config import InitScheme, ModelConfig
from moe.experts import Experts
from moe.ffn import FeedForward, init_weight_
from moe.router import Router, balancing_losses, routing_stats


@dataclass
class MoEAux:
    """What one MoE layer returns beside its output; the training loop adds `loss` and logs `stats`."""

    loss: Tensor
    """Differentiable fp32 0-dim: aux_loss_coef * aux + z_loss_coef * z."""
    tokens_per_expert: Tensor
    """Detached (E*G,) float: assignments each expert processed (after dropping)."""
    stats: dict[str, Tensor]
    """Detached 0-dim diagnostics: top1_mass, imbalance, entropy, dropped_frac, empty_experts,
    aux_loss, z_loss (the last two unscaled)."""


class MoELayer(nn.Module):
    """Fine-grained MoE FFN: E*G experts of hidden d_expert/G, k*G routed per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from moe.validate import validate_model_config  # model side owns validation

        validate_model_config(cfg)
        if cfg.moe is None:
            raise ValueError("model.moe is None: build a FeedForward for a dense layer")
        m = self.cfg = cfg.moe
        d_fine = (m.d_expert if m.d_expert is not None else cfg.d_ff) // m.granularity
        d_shared = m.d_shared if m.d_shared is not None else m.k_routed * d_fine
        self.router = Router(cfg.d_model, m)
        self.experts = Experts(m.n_routed, cfg.d_model, d_fine, cfg.activation, m.backend)
        self.shared = nn.ModuleList(
            FeedForward(cfg.d_model, d_shared, cfg.activation) for _ in range(m.num_shared)
        )
        self.shared_gate = nn.Linear(cfg.d_model, m.num_shared, bias=False) if m.shared_gate else None
        self.out_norm = nn.LayerNorm(cfg.d_model) if m.output_norm else None
        # Usable standalone; moe.model re-initialises with the same convention.
        self.reset_parameters(cfg.init, cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, MoEAux]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        y_TD = self.experts(x_TD, routing)
        if len(self.shared):
            gate_TS = torch.sigmoid(self.shared_gate(x_TD)) if self.shared_gate is not None else None
            for j, ffn in enumerate(self.shared):
                s_TD = ffn(x_TD)
                y_TD = y_TD + (s_TD * gate_TS[:, j : j + 1].to(s_TD.dtype) if gate_TS is not None else s_TD)
        if self.out_norm is not None:
            y_TD = self.out_norm(y_TD)
        aux, z = balancing_losses(routing)
        loss = self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
        tokens_per_expert = routing.counts_N.detach().float()
        return y_TD.reshape(x_BSD.shape), MoEAux(loss, tokens_per_expert, routing_stats(routing, aux, z))

    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """Aux-loss-free balancing step (no-op when moe.bias_update_rate == 0); call after optimiser step."""
        self.router.update_bias(tokens_per_expert)

    def reset_parameters(self, init: InitScheme, std: float, out_std: float) -> None:
        """Router and shared gate like input projections; experts and shared FFNs via their own init."""
        d_model = self.router.weight.shape[1]
        init_weight_(self.router.weight, init, std, d_model)
        self.router.expert_bias.zero_()
        self.experts.reset_parameters(init, std, out_std)
        for ffn in self.shared:
            ffn.reset_parameters(init, std, out_std)
        if self.shared_gate is not None:
            init_weight_(self.shared_gate.weight, init, std, d_model)
        if self.out_norm is not None:
            self.out_norm.reset_parameters()
