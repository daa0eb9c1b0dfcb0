"""The MoE feed-forward layer: router -> routed experts (+ shared experts) -> optional LayerNorm.

Shape legend: B = batch, S = sequence, T = B*S tokens, D = d_model, N = routed experts (E*G).

  y = out_norm( s * experts(x; routing) + sum_j gate_j(x) * shared_j(x) ),   s = moe.routed_scale_used

s (G by default) makes the layer function-matched across granularity: splitting every expert of a G=1
layer into G hidden slices and repeating its router row G times gives each slice 1/G of the coarse gate,
so without s the split layer would output y_G1 / G (docs/method.md §6). s is folded into the gate weights,
which costs A multiplications. The optional LayerNorm (`moe.output_norm`, 2402.07871) normalises the sum of routed and shared outputs,
i.e. the whole layer's contribution before the block adds the residual. A token whose assignments were
all dropped gets 0 from the routed experts, so with no shared experts and no output norm it passes
through the residual unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.model.config import InitScheme, ModelConfig
from moe.model.experts import Experts
from moe.model.ffn import FeedForward, init_weight_
from moe.model.router import Router, balancing_losses, routing_stats


@dataclass
class MoEAux:
    """What one MoE layer returns beside its output; the training loop adds `loss` and logs `stats`."""

    loss: Tensor
    """Differentiable fp32 0-dim: aux_loss_coef * aux + z_loss_coef * z."""
    tokens_per_expert: Tensor
    """Detached (E*G,) float: assignments routed to each expert before capacity dropping (the load the
    router asked for: what the bias balancing corrects)."""
    stats: dict[str, Tensor]
    """Detached 0-dim diagnostics (moe.model.router.routing_stats): top1_mass, top1_share(_norm), imbalance,
    entropy(_norm), dropped_frac, empty_experts, aux_loss, z_loss (the last two unscaled)."""


class MoELayer(nn.Module):
    """Fine-grained MoE FFN: E*G experts of hidden d_expert/G, k*G routed per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from moe.model.validate import validate_model_config  # model side owns validation

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
        self.out_norm = nn.LayerNorm(cfg.d_model, eps=m.output_norm_eps) if m.output_norm else None
        self.routed_scale = m.routed_scale_used
        self.d_expert = d_fine * m.granularity
        # Usable standalone; moe.model.transformer re-initialises with the same convention.
        self.reset_parameters(cfg.init, cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, MoEAux]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD, n_seq=x_BSD.shape[0] if x_BSD.dim() == 3 else 1)
        if self.routed_scale != 1.0:
            routing = dataclasses.replace(routing, gate_A=routing.gate_A * self.routed_scale)
        y_TD = self.experts(x_TD, routing)
        if len(self.shared):
            gate_TS = torch.sigmoid(self.shared_gate(x_TD)) if self.shared_gate is not None else None
            for j, ffn in enumerate(self.shared):
                s_TD = ffn(x_TD)
                y_TD = y_TD + (s_TD * gate_TS[:, j : j + 1].to(s_TD.dtype) if gate_TS is not None else s_TD)
        if self.out_norm is not None:
            y_TD = self.out_norm(y_TD)
        aux, z = balancing_losses(routing, self.cfg.granularity)
        loss = self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
        tokens_per_expert = routing.routed_N.detach().float()
        stats = routing_stats(routing, aux, z, self.cfg.k_routed)
        return y_TD.reshape(x_BSD.shape), MoEAux(loss, tokens_per_expert, stats)

    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """Aux-loss-free balancing step (no-op when moe.bias_update_rate == 0); call after optimiser step."""
        self.router.update_bias(tokens_per_expert)

    def reset_parameters(self, init: InitScheme, std: float, out_std: float) -> None:
        """Router and shared gate like input projections; experts and shared FFNs via their own init.
        The router, whose size grows with G, draws last: from one generator state, layers that differ
        only in G draw the same experts (as a G-split) and the same shared FFNs."""
        d_model = self.router.weight.shape[1]
        # fan_in counts the coarse expert's hidden size for w2: a fine layer is then distributed as a
        # split of a G=1 layer (its G slices of one coarse expert sum to one output).
        self.experts.reset_parameters(init, std, out_std, out_fan_in=self.d_expert)
        for ffn in self.shared:
            ffn.reset_parameters(init, std, out_std)
        if self.shared_gate is not None:
            init_weight_(self.shared_gate.weight, init, std, d_model)
        if self.out_norm is not None:
            self.out_norm.reset_parameters()
        init_weight_(self.router.weight, init, std, d_model)
        self.router.expert_bias.zero_()
