"""Expert parallelism: each rank of an EP group holds N/P of the routed experts; tokens travel to them.

Shape legend:
  T = tokens on this rank, D = d_model, N = routed experts (E*G), P = EP group size, L = N/P experts
  held here, A = this rank's kept assignments (sorted by expert, as `Routing` gives them), R = rows
  received from the group (grouped by source rank, then by local expert).

EP rank p holds global experts p*L .. p*L + L - 1. The `Routing` plan of this rank's tokens is computed
exactly as without EP (same router, same capacity dropping); because its assignments are sorted by
expert they are already grouped by destination rank, so dispatch is one all-to-all of the gathered rows
(with each row's gate weight as an extra column, so the gate is applied where the expert runs, as in
the local backends), the experts run on the received rows regrouped by local expert, and combine is
the reverse all-to-all followed by the same index_add over token indices the local backends do.
Autograd runs the two all-to-alls in reverse in backward; expert weight gradients are the sum over
the group's tokens (the training loop then averages them over ranks, moe.parallel.layout).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.model.router import Routing


@dataclass(frozen=True)
class ExpertShard:
    """Where an `Experts` module's share of the experts sits in its EP group."""

    group: dist.ProcessGroup
    """The EP process group."""
    rank: int
    """This rank's index in the EP group."""
    size: int
    """P: ranks in the EP group."""

    def dispatch_combine(self, x_TD: Tensor, gate_A: Tensor, r: Routing, local) -> Tensor:
        """moe.model.experts.ExpertDispatch: the rows travel to this group's ranks and back."""
        return dispatch_combine(x_TD, gate_A, r, self, local)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x_AX: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_RX = x_AX.new_empty((sum(out_splits), *x_AX.shape[1:]))
        dist.all_to_all_single(out_RX, x_AX.contiguous(), out_splits, in_splits, group=group)
        return out_RX

    @staticmethod
    def backward(ctx, dout_RX: Tensor):
        out_splits, in_splits = ctx.splits
        dx_AX = dout_RX.new_empty((sum(in_splits), *dout_RX.shape[1:]))
        dist.all_to_all_single(dx_AX, dout_RX.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx_AX, None, None, None


def shard_experts_(experts: nn.Module, shard: ExpertShard) -> list[nn.Parameter]:
    """Keep only this rank's L = N/P experts of a full `Experts` module (built identically on every
    rank, so the kept slices are those of the single-process model); returns the new parameters."""
    n = experts.w1.shape[0]
    if n % shard.size:
        raise ValueError(f"parallel.ep={shard.size} does not divide the {n} routed experts")
    n_local = n // shard.size
    lo = shard.rank * n_local
    kept = []
    for name in ("w1", "w3", "w2"):
        w = getattr(experts, name)
        if w is not None:
            p = nn.Parameter(w.detach()[lo : lo + n_local].clone())
            setattr(experts, name, p)
            kept.append(p)
    experts.ep = shard
    return kept


def expert_shard_dim(n_local: int, dp: int, d_model: int, d_hidden: int) -> int:
    """The dim FSDP shards this rank's expert weights on over `dp` ranks, (L, D, F) w1/w3 and (L, F, D)
    w2: 0 (whole experts) when dp divides L; else 1 (D of w1/w3, F of w2) when dp divides both, as
    torchtitan does: FSDP2 pads dim 0 to ceil(L/dp) rows on every rank, so with L < dp each rank would
    hold a whole expert of every layer. Otherwise 0, unevenly."""
    return 1 if n_local % dp and not d_model % dp and not d_hidden % dp else 0


def expert_share(n_local: int, dp: int, d_model: int, d_hidden: int) -> Fraction:
    """The fraction of an EP rank's expert parameters that its fullest dp rank holds (moe.parallel.memory):
    1/dp, or ceil(L/dp)/L where dim 0 is sharded unevenly."""
    if n_local % dp == 0 or expert_shard_dim(n_local, dp, d_model, d_hidden) == 1:
        return Fraction(1, dp)
    return Fraction(math.ceil(n_local / dp), n_local)


def dispatch_combine(x_TD: Tensor, gate_A: Tensor, r: Routing, shard: ExpertShard, local) -> Tensor:
    """out_TD = sum over kept assignments a of gate_a * expert_a(x_token(a)), the experts living on the
    EP group. `local(x_RD, routing)` runs this rank's experts on received rows (the local backends)."""
    P = shard.size
    L = r.counts_N.shape[0] // P
    counts_PL = r.counts_N.view(P, L)
    recv_PL = torch.empty_like(counts_PL)  # row p: what rank p sends to each of my experts
    dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=shard.group)
    send = counts_PL.sum(1).tolist()
    recv = recv_PL.sum(1).tolist()

    rows_AX = torch.cat([x_TD.index_select(0, r.token_A), gate_A.unsqueeze(1).to(x_TD.dtype)], dim=1)
    got_RX = _AllToAll.apply(rows_AX, recv, send, shard.group)
    x_RD, g_R = got_RX[:, :-1], got_RX[:, -1]
    # Regroup by local expert (source rank order within an expert, token order within a source).
    block_R = torch.repeat_interleave(
        torch.arange(P * L, device=x_RD.device), recv_PL.reshape(-1), output_size=x_RD.shape[0]
    )
    order_R = torch.argsort((block_R % L) * P + block_R // L, stable=True)
    local_r = dataclasses.replace(
        r, token_A=order_R, gate_A=g_R.index_select(0, order_R), counts_N=recv_PL.sum(0)
    )
    y_RD = local(x_RD, local_r)  # row i of y is the gated output of received row i
    y_AD = _AllToAll.apply(y_RD, send, recv, shard.group)
    return torch.zeros_like(x_TD).index_add(0, r.token_A, y_AD)
