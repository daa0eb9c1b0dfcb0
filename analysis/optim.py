"""Batched L-BFGS: many independent small minimisations advanced together with numpy.

Scaling-law fits start L-BFGS from a grid of thousands of points (Hoffmann et al. approach 3) and
bootstrap refits repeat that; one scipy call per start spends its time in Python overhead, so here
every start is a row of one array and each iteration costs a few vectorised objective evaluations.
Shapes: B = problems (starts x replicates), P = parameters, M = stored curvature pairs.

Each row follows the textbook method (Nocedal & Wright, Alg. 7.4 two-loop recursion) with a
backtracking Armijo line search; the convergence tests mirror scipy's L-BFGS-B defaults (projected
gradient <= gtol, relative decrease <= ftol) so results match a scipy loop started from the same point.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# fun(theta_BP, rows_B) -> (f_B, grad_BP); rows are the indices of the problems being evaluated, so a
# caller can keep per-problem data (e.g. bootstrap weights) and pick the rows still running.
BatchedObjective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class BatchedResult:
    """Outcome of `minimize_batched`, one row per problem."""

    x: np.ndarray
    """(B, P) final parameters."""
    fun: np.ndarray
    """(B,) objective at x."""
    converged: np.ndarray
    """(B,) bool: stopped on the gradient or decrease test (not on maxiter or a failed line search)."""
    n_iter: np.ndarray
    """(B,) iterations used."""


def minimize_batched(
    fun: BatchedObjective,
    x0_BP: np.ndarray,
    *,
    memory: int = 10,
    maxiter: int = 2000,
    gtol: float = 1e-5,
    ftol: float = 2.220446049250313e-09,
    max_backtracks: int = 40,
) -> BatchedResult:
    """Minimise B independent smooth objectives from the rows of x0_BP."""
    x = np.array(x0_BP, dtype=np.float64, copy=True)
    B, P = x.shape
    all_rows = np.arange(B)
    f, g = fun(x, all_rows)
    S_BMP = np.zeros((B, memory, P))
    Y_BMP = np.zeros((B, memory, P))
    rho_BM = np.zeros((B, memory))  # 0 marks an empty slot, so it contributes nothing
    n_pairs = np.zeros(B, dtype=np.int64)
    n_iter = np.zeros(B, dtype=np.int64)
    converged = np.abs(g).max(axis=1) <= gtol
    active = ~converged & np.isfinite(f)

    for _ in range(maxiter):
        rows = all_rows[active]
        if rows.size == 0:
            break
        xr, fr, gr = x[rows], f[rows], g[rows]
        d = -_two_loop(gr, S_BMP[rows], Y_BMP[rows], rho_BM[rows])
        slope = np.einsum("bp,bp->b", d, gr)
        bad = ~(slope < 0) | ~np.isfinite(slope)
        if bad.any():  # lost descent: restart that row from steepest descent
            d[bad] = -gr[bad]
            slope[bad] = -np.einsum("bp,bp->b", gr[bad], gr[bad])
            n_pairs[rows[bad]] = 0
            rho_BM[rows[bad]] = 0.0
        first = n_pairs[rows] == 0
        step = np.ones(rows.size)
        # scipy's first step has unit length; later steps start at 1 (the quasi-Newton scale)
        step[first] = np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(d[first], axis=1), 1e-300))

        x_new, f_new, g_new = xr.copy(), fr.copy(), gr.copy()
        pending = np.ones(rows.size, dtype=bool)
        for _ in range(max_backtracks):
            idx = np.flatnonzero(pending)
            if idx.size == 0:
                break
            trial = xr[idx] + step[idx, None] * d[idx]
            ft, gt = fun(trial, rows[idx])
            ok = np.isfinite(ft) & (ft <= fr[idx] + 1e-4 * step[idx] * slope[idx])
            acc = idx[ok]
            x_new[acc], f_new[acc], g_new[acc] = trial[ok], ft[ok], gt[ok]
            pending[acc] = False
            step[idx[~ok]] *= 0.5
        failed = pending  # no acceptable step: at a (numerical) minimum along d, stop this row

        s = x_new - xr
        y = g_new - gr
        sy = np.einsum("bp,bp->b", s, y)
        upd = ~failed & (sy > 1e-12 * np.maximum(np.einsum("bp,bp->b", y, y), 1e-300))
        if upd.any():  # history kept oldest -> newest: shift left, append at the end
            ur = rows[upd]
            for H, new in ((S_BMP, s[upd]), (Y_BMP, y[upd]), (rho_BM, 1.0 / sy[upd])):
                H[ur, :-1] = H[ur, 1:]
                H[ur, -1] = new
            n_pairs[ur] += 1

        rel_drop = (fr - f_new) / np.maximum(np.maximum(np.abs(fr), np.abs(f_new)), 1.0)
        x[rows], f[rows], g[rows] = x_new, f_new, g_new
        n_iter[rows] += 1
        done = (np.abs(g_new).max(axis=1) <= gtol) | (~failed & (rel_drop <= ftol))
        converged[rows[done]] = True
        active[rows[done | failed]] = False

    return BatchedResult(x=x, fun=f, converged=converged, n_iter=n_iter)


def _two_loop(g_BP, S_BMP, Y_BMP, rho_BM):
    """H_k @ g for every row (Nocedal & Wright Alg. 7.4); slot M-1 is the newest pair, empty slots
    have rho = 0 and drop out."""
    M = S_BMP.shape[1]
    q = g_BP.copy()
    alpha_BM = np.zeros(rho_BM.shape)
    for j in reversed(range(M)):
        alpha_BM[:, j] = rho_BM[:, j] * np.einsum("bp,bp->b", S_BMP[:, j], q)
        q -= alpha_BM[:, j, None] * Y_BMP[:, j]
    y_BP = Y_BMP[:, -1]
    yy = np.einsum("bp,bp->b", y_BP, y_BP)
    has = (rho_BM[:, -1] > 0) & (yy > 0)
    # gamma = s'y / y'y scales the initial Hessian (Nocedal & Wright eq. 7.20)
    gamma = np.where(has, 1.0 / np.where(has, rho_BM[:, -1] * yy, 1.0), 1.0)
    r = gamma[:, None] * q
    for j in range(M):
        b = rho_BM[:, j] * np.einsum("bp,bp->b", Y_BMP[:, j], r)
        r += (alpha_BM[:, j] - b)[:, None] * S_BMP[:, j]
    return r


def minimize_batched_threads(
    fun: BatchedObjective, x0_BP: np.ndarray, *, workers: int = 2, **kw
) -> BatchedResult:
    """`minimize_batched` on `workers` contiguous row blocks in threads (numpy releases the GIL)."""
    B = len(x0_BP)
    workers = max(1, min(workers, B))
    if workers == 1:
        return minimize_batched(fun, x0_BP, **kw)
    bounds = np.linspace(0, B, workers + 1).astype(int)

    def run(lo_hi):
        lo, hi = lo_hi
        return minimize_batched(lambda x, rows: fun(x, rows + lo), x0_BP[lo:hi], **kw)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(run, zip(bounds[:-1], bounds[1:], strict=True)))
    return BatchedResult(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "fun", "converged", "n_iter"))
    )
