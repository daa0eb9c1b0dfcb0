"""Compute-optimal (N, D, G) for a FLOPs budget under the fine-grained paper's compute model.

Krajewski et al. 2024 (arXiv 2402.07871; docs/method.md §1):
  F = (12 d^2 c_f + d E G c_r) * D * n_blocks,  c_f = 6, c_r = 14,  d = 64 * n_blocks,
  N = d^2 (8E + 4) n_blocks  (total non-embedding parameters).
For each candidate G the model depth is optimised (continuous n_blocks), D follows from the budget;
the (N, D, G) with the lowest predicted loss wins.

Router FLOPs, one stated convention (`ComputeModel.router_flops`):
  "paper"   c_r = 14 per router parameter per token, the paper's: it counts the routing work beyond
            the router matmul (softmax, top-k/expert-choice selection, gathering and scattering tokens).
            Default, because the published compute-optimal G (8 at 3e18, 64 at 5e25) rests on it.
  "matmul"  c_r = 6, moe.model.accounting's convention (2 forward + 4 backward per parameter, as for any
            matmul weight; used by studies.plan and by every acct.flops_* param a run logs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar

from analysis.laws import LawFit

ROUTER_FLOPS = {"paper": 14.0, "matmul": 6.0}
"""FLOPs per router parameter per token under each convention (module doc)."""
RouterFlops = Literal["paper", "matmul"]


@dataclass(frozen=True)
class ComputeModel:
    """Training-FLOPs and parameter-count model of the fine-grained paper."""

    expansion: int = 64
    """E: expansion rate (experts at G = 1); the paper fixes 64."""
    c_f: float = 6.0
    """FLOPs per dense parameter per token (forward + backward)."""
    router_flops: RouterFlops = "paper"
    """paper (c_r = 14, routing overhead counted, Krajewski et al. 2024) or matmul (c_r = 6, as
    moe.model.accounting counts the router)."""
    d_per_block: float = 64.0
    """Shape rule d_model = d_per_block * n_blocks."""

    def __post_init__(self):
        if self.router_flops not in ROUTER_FLOPS:
            raise ValueError(
                f"compute.router_flops={self.router_flops!r} must be one of {', '.join(ROUTER_FLOPS)}"
            )
        for name in ("expansion", "c_f", "d_per_block"):
            if not getattr(self, name) > 0:
                raise ValueError(f"compute.{name}={getattr(self, name)} must be > 0")

    @property
    def c_r(self) -> float:
        """FLOPs per router parameter per token, from `router_flops`."""
        return ROUTER_FLOPS[self.router_flops]

    def describe(self) -> str:
        """One line stating the FLOP convention, for anything that prints a compute-optimal result."""
        why = (
            "Krajewski et al. 2024, routing overhead counted"
            if self.router_flops == "paper"
            else "moe.model.accounting's convention, router as a matmul"
        )
        return (
            f"compute model: F = (12 d^2 c_f + d E G c_r) D n_blocks, c_f = {self.c_f:g}, "
            f"router_flops={self.router_flops} (c_r = {self.c_r:g}, {why}), E = {self.expansion}, "
            f"d_model = {self.d_per_block:g} n_blocks"
        )

    def params(self, n_blocks):
        d = self.d_per_block * n_blocks
        return d**2 * (8 * self.expansion + 4) * n_blocks

    def flops(self, n_blocks, tokens, granularity):
        d = self.d_per_block * n_blocks
        return (12 * d**2 * self.c_f + d * self.expansion * granularity * self.c_r) * tokens * n_blocks

    def tokens_for(self, flops, n_blocks, granularity):
        return flops / self.flops(n_blocks, 1.0, granularity)


@dataclass(frozen=True)
class ComputeOptimum:
    """The allocation minimising predicted loss at one FLOPs budget."""

    flops: float
    """Training FLOPs budget."""
    granularity: int
    """Chosen G."""
    n_blocks: float
    """Depth (continuous optimum)."""
    d_model: float
    """Width, d_per_block * n_blocks."""
    params: float
    """N, total non-embedding parameters."""
    tokens: float
    """D, training tokens."""
    loss: float
    """Predicted loss."""
    convention: str
    """`ComputeModel.describe()` of the compute model it was found under."""

    def describe(self) -> str:
        return (
            f"{self.flops:.3g} FLOPs: G = {self.granularity}, N = {self.params:.3g}, D = {self.tokens:.3g}, "
            f"d_model = {self.d_model:.4g}, predicted loss {self.loss:.4g} [{self.convention}]"
        )


def compute_optimal(
    law: LawFit,
    flops: float,
    *,
    granularities=tuple(2**i for i in range(11)),
    compute: ComputeModel = ComputeModel(),
    max_blocks: float = 1e4,
) -> ComputeOptimum:
    """Minimise law-predicted loss over G in `granularities` and depth, at a FLOPs budget."""
    if not flops > 0:
        raise ValueError(f"flops={flops} must be > 0")
    if not granularities:
        raise ValueError("granularities must list at least one G")
    best = None
    for G in granularities:

        def loss_at(log_n, G=G):
            n = np.exp(log_n)
            D = compute.tokens_for(flops, n, G)
            return float(law.predict({"params": [compute.params(n)], "tokens": [D], "granularity": [G]})[0])

        res = minimize_scalar(
            loss_at, bounds=(0.0, np.log(max_blocks)), method="bounded", options={"xatol": 1e-6}
        )
        n = float(np.exp(res.x))
        cand = ComputeOptimum(
            flops=flops,
            granularity=int(G),
            n_blocks=n,
            d_model=compute.d_per_block * n,
            params=float(compute.params(n)),
            tokens=float(compute.tokens_for(flops, n, G)),
            loss=float(res.fun),
            convention=compute.describe(),
        )
        if best is None or cand.loss < best.loss:
            best = cand
    return best
