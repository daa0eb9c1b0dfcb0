"""Routers: turn router logits into a dispatch plan sorted by expert, plus balancing losses and stats.

Shape legend:
  T = tokens (batch*seq), D = d_model, N = routed experts (E*G), K = experts per token (k*G),
  A = kept token->expert assignments, C = capacity (assignments an expert may keep),
  B = sequences in the micro-batch, S = positions (T = B*S, token t = b*S + s).

Every routing (token choice, expert choice, with or without capacity dropping) becomes one `Routing`:
assignments grouped by expert in expert order, each with its token index and gate weight, and a count
per expert. Both expert backends consume only that, so they cannot disagree about who goes where.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.model.config import MoEConfig


@dataclass
class Routing:
    """Dispatch plan of one forward: kept assignments grouped by expert, and what the losses need."""

    token_A: Tensor
    """int64 token index of each kept assignment; expert 0's assignments first, then expert 1's, ..."""
    gate_A: Tensor
    """fp32 gate weight of each kept assignment (differentiable w.r.t. the router)."""
    counts_N: Tensor
    """int64 kept assignments per expert (sums to A)."""
    routed_N: Tensor
    """int64 assignments per expert before capacity dropping (the f_i of the Switch loss)."""
    logits_TN: Tensor
    """fp32 router logits (z-loss)."""
    probs_TN: Tensor
    """fp32 softmax over all experts (Switch P_i and the entropy diagnostic)."""
    top1_T: Tensor
    """Detached largest gate weight each token received (0 for a token whose assignments all dropped)."""
    gate_sum_T: Tensor
    """Detached sum of the gate weights each token received (0 for a token with no kept assignment)."""
    dropped_frac: Tensor
    """Detached 0-dim: token choice, fraction of assignments dropped; expert choice, fraction of
    tokens that no expert picked."""


def capacity(cf: float, n_tokens: int, k_routed: int, n_routed: int) -> int:
    """Assignments one expert may keep: ceil(cf * T * k*G / (E*G)), at least 1, at most T."""
    return max(1, min(n_tokens, math.ceil(cf * n_tokens * k_routed / n_routed)))


def sort_by_expert(expert_TK: Tensor, gate_TK: Tensor, n_routed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group token-choice assignments by expert (stable: token order within an expert)."""
    T, K = expert_TK.shape
    expert_A = expert_TK.reshape(-1)
    order_A = torch.argsort(expert_A, stable=True)
    counts_N = torch.zeros(n_routed, dtype=torch.int64, device=expert_A.device)
    # scatter_add_ keeps a static output shape (bincount's depends on the data; bad for compile).
    counts_N.scatter_add_(0, expert_A, torch.ones_like(expert_A))
    return order_A // K, gate_TK.reshape(-1)[order_A], counts_N


def drop_over_capacity(
    token_A: Tensor, gate_A: Tensor, counts_N: Tensor, cap: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each expert's first `cap` assignments (token order); the rest contribute nothing."""
    A = token_A.shape[0]
    starts_N = torch.cumsum(counts_N, 0) - counts_N
    expert_A = torch.repeat_interleave(
        torch.arange(counts_N.shape[0], device=counts_N.device), counts_N, output_size=A
    )
    keep_A = torch.arange(A, device=token_A.device) - starts_N[expert_A] < cap
    return token_A[keep_A], gate_A[keep_A], counts_N.clamp(max=cap)


@torch.no_grad()
def per_token_gates(token_A: Tensor, gate_A: Tensor, n_tokens: int) -> tuple[Tensor, Tensor]:
    """Largest and summed kept gate weight per token (0 for a token with no kept assignment)."""
    g_A = gate_A.detach()
    zeros_T = torch.zeros(n_tokens, device=g_A.device, dtype=g_A.dtype)
    top1_T = zeros_T.scatter_reduce(0, token_A, g_A, "amax", include_self=True)
    return top1_T, zeros_T.index_add(0, token_A, g_A)


class Router(nn.Module):
    """Linear router over N = E*G experts with token- or expert-choice selection.

    Logits and scores are fp32 whatever the input dtype. `expert_bias` (aux-loss-free balancing,
    DeepSeek-V3 style) shifts scores for *selection* only; gate weights never include it.
    """

    def __init__(self, d_model: int, moe: MoEConfig):
        super().__init__()
        self.cfg = moe
        self.n_routed, self.k_routed = moe.n_routed, moe.k_routed
        self.weight = nn.Parameter(torch.empty(moe.n_routed, d_model))
        self.register_buffer("expert_bias", torch.zeros(moe.n_routed, dtype=torch.float32))

    def forward(self, x_TD: Tensor, n_seq: int = 1) -> Routing:
        """Route the T tokens of `n_seq` sequences of equal length (token t = b*S + s)."""
        cfg = self.cfg
        if self.training and cfg.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TN = F.linear(x_TD.float(), self.weight.float())
        probs_TN = torch.softmax(logits_TN, dim=-1)
        scores_TN = probs_TN if cfg.score == "softmax" else torch.sigmoid(logits_TN)
        if cfg.router == "expert_choice":
            return self._expert_choice(logits_TN, probs_TN, scores_TN, n_seq)
        return self._token_choice(logits_TN, probs_TN, scores_TN)

    def _token_choice(self, logits_TN: Tensor, probs_TN: Tensor, scores_TN: Tensor) -> Routing:
        cfg, T = self.cfg, logits_TN.shape[0]
        select_TN = scores_TN.detach()
        if cfg.bias_update_rate > 0:
            select_TN = select_TN + self.expert_bias.float()
        expert_TK = select_TN.topk(self.k_routed, dim=-1).indices
        if cfg.order != "before_topk" and self.k_routed == 1:
            # Normalising over one score gives exactly 1 (and no router gradient: why validation
            # rejects it); s/s would leave rounding noise in both.
            gate_TK = torch.ones_like(expert_TK, dtype=scores_TN.dtype)
        elif cfg.order == "after_topk" and cfg.score == "softmax":
            gate_TK = torch.softmax(logits_TN.gather(1, expert_TK), dim=-1)
        else:
            gate_TK = scores_TN.gather(1, expert_TK)
            if cfg.order != "before_topk":  # renormalise the kept scores (sigmoid after_topk too)
                gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
        token_A, gate_A, routed_N = sort_by_expert(expert_TK, gate_TK, self.n_routed)
        counts_N = routed_N
        if cfg.capacity_factor is not None:
            cap = capacity(cfg.capacity_factor, T, self.k_routed, self.n_routed)
            token_A, gate_A, counts_N = drop_over_capacity(token_A, gate_A, routed_N, cap)
            top1_T, gate_sum_T = per_token_gates(token_A, gate_A, T)
            dropped = 1.0 - token_A.shape[0] / max(1, T * self.k_routed)
            dropped_frac = torch.tensor(dropped, device=gate_A.device)
        else:
            top1_T, gate_sum_T = gate_TK.detach().amax(dim=-1), gate_TK.detach().sum(dim=-1)
            dropped_frac = torch.zeros((), device=gate_A.device)
        return Routing(
            token_A, gate_A, counts_N, routed_N, logits_TN, probs_TN, top1_T, gate_sum_T, dropped_frac
        )

    def _expert_choice(self, logits_TN: Tensor, probs_TN: Tensor, scores_TN: Tensor, n_seq: int) -> Routing:
        T, N = logits_TN.shape
        cf = 1.0 if self.cfg.capacity_factor is None else self.cfg.capacity_factor
        if self.cfg.expert_choice_scope == "batch":
            cap = capacity(cf, T, self.k_routed, N)
            gate_NC, token_NC = scores_TN.t().topk(cap, dim=-1)  # each expert picks its top-C tokens
            token_A, gate_A = token_NC.reshape(-1), gate_NC.reshape(-1)
            per_expert = cap
        else:
            # One ranking per position s over the B tokens at s: token (b, s) competes only with
            # tokens at the same position of other sequences, none of which is in its own future.
            if T % n_seq:
                raise ValueError(f"{T} tokens do not split into {n_seq} sequences")
            S = T // n_seq
            cap = capacity(cf, n_seq, self.k_routed, N)
            scores_SNB = scores_TN.view(n_seq, S, N).permute(1, 2, 0)
            gate_SNC, seq_SNC = scores_SNB.topk(cap, dim=-1)
            pos_S11 = torch.arange(S, device=seq_SNC.device).view(S, 1, 1)
            token_NSC = (seq_SNC * S + pos_S11).permute(1, 0, 2)  # grouped by expert
            token_A, gate_A = token_NSC.reshape(-1), gate_SNC.permute(1, 0, 2).reshape(-1)
            per_expert = S * cap
        counts_N = torch.full((N,), per_expert, dtype=torch.int64, device=token_A.device)
        top1_T, gate_sum_T = per_token_gates(token_A, gate_A, T)
        with torch.no_grad():
            picked_T = torch.zeros(T, device=gate_A.device).index_fill_(0, token_A, 1.0)
            dropped_frac = 1.0 - picked_T.mean()
        return Routing(
            token_A, gate_A, counts_N, counts_N, logits_TN, probs_TN, top1_T, gate_sum_T, dropped_frac
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """bias += rate * sign(mean load - load): under-loaded experts become likelier to be selected."""
        rate = self.cfg.bias_update_rate
        if rate == 0:
            return
        load_N = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(rate * torch.sign(load_N.mean() - load_N).to(self.expert_bias.dtype))


def balancing_losses(r: Routing, granularity: int = 1) -> tuple[Tensor, Tensor]:
    """Unscaled fp32 (Switch aux, z) losses: N * sum_i f_i P_i and mean_T (logsumexp(logits) - ln G)^2.

    f_i = fraction of token->expert assignments (before dropping) routed to expert i; P_i = mean
    softmax probability of expert i over tokens. N = E*G routed experts, so uniform routing gives 1.
    Both are unchanged when a G=1 router is split into G equal rows per expert: f and P shrink by G while
    N grows by G, and the G repeated logits raise logsumexp by exactly ln G, which the z term removes.
    """
    n_routed = r.probs_TN.shape[1]
    f_N = r.routed_N.float() / r.routed_N.sum().clamp_min(1)
    aux = n_routed * torch.sum(f_N * r.probs_TN.mean(dim=0))
    z = (torch.logsumexp(r.logits_TN, dim=-1) - math.log(granularity)).square().mean()
    return aux, z


@torch.no_grad()
def routing_stats(r: Routing, aux: Tensor, z: Tensor, k_routed: int) -> dict[str, Tensor]:
    """Detached 0-dim diagnostics named as in docs/outputs.md.

    Raw values (top1_mass, entropy) depend on G even for a uniform router (1/(E*G), ln(E*G)); the
    `_norm` versions read the same at every G: entropy / ln N (1 = uniform), and the top-1 share of each
    token's gate mass rescaled so that an even split over its k*G experts reads 0 and all mass on one
    expert reads 1. Imbalance uses the loads before capacity dropping (what the router asked for)."""
    load_N = r.routed_N.float()
    n_routed = r.probs_TN.shape[1]
    entropy = torch.special.entr(r.probs_TN).sum(dim=-1).mean()
    # Mean over tokens that kept an assignment, without data-dependent shapes (torch.compile).
    got_T = (r.gate_sum_T > 0).float()
    share_T = r.top1_T / r.gate_sum_T.clamp_min(1e-30)
    share = (share_T * got_T).sum() / got_T.sum().clamp_min(1)
    share_norm = (k_routed * share - 1) / (k_routed - 1) if k_routed > 1 else torch.ones_like(share)
    return {
        "top1_mass": r.top1_T.float().mean(),
        "top1_share": share.float(),
        "top1_share_norm": share_norm.float(),
        "imbalance": load_N.max() / load_N.mean().clamp_min(1e-9),
        "entropy": entropy,
        "entropy_norm": entropy / math.log(n_routed) if n_routed > 1 else torch.ones_like(entropy),
        "dropped_frac": r.dropped_frac.float(),
        "empty_experts": (r.counts_N == 0).sum().float(),
        "aux_loss": aux.detach(),
        "z_loss": z.detach(),
    }
