"""Scaling-law fits: Chinchilla approach 3 and the fine-grained MoE law, with bootstrap intervals.

Fitting recipe (docs/method.md §4, Hoffmann et al. 2022 / Besiroglu et al. 2024): minimise the
*summed* Huber loss (delta = 1e-3) between the log of the law and log loss, with L-BFGS from a grid of
starts, keep the best converged result. The fine-grained paper fitted Huber(delta=0.1) on the loss with
BFGS and weight decay; we fit it the same way as Chinchilla (log space, delta knob) so both laws share
one well-conditioned objective — a documented choice, see docs/analysis.md.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.lse import LawSpec, grid, make_objective, starts_matrix
from analysis.optim import minimize_batched_threads

try:  # BLAS threads fight the fit's own threads over skinny products; threadpoolctl comes with mlflow
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - then BLAS keeps its default threads

    def threadpool_limits(limits=None):
        return contextlib.nullcontext()


# Grid starts stop on scipy's L-BFGS-B defaults; the best few optima are then polished tightly,
# because summed Huber objectives on log loss are tiny (~1e-3) and scipy's ftol is relative to max(|f|, 1).
GRID_TOL = {"gtol": 1e-5, "ftol": 2.220446049250313e-09}
POLISH_TOL = {"gtol": 1e-10, "ftol": 1e-14, "maxiter": 5000}
BOOT_TOL = {"gtol": 1e-8, "ftol": 1e-12}

CHINCHILLA = LawSpec(
    name="chinchilla",
    params=("log_E", "log_A", "alpha", "log_B", "beta"),
    covariates=("params", "tokens"),
    terms=((0, ()), (1, ((2, 0),)), (3, ((4, 1),))),
)
FINEGRAINED = LawSpec(
    name="finegrained",
    params=("log_c", "log_g", "gamma", "log_a", "alpha", "log_b", "beta"),
    covariates=("params", "tokens", "granularity"),
    terms=((0, ()), (1, ((2, 2), (4, 0))), (3, ((4, 0),)), (5, ((6, 1),))),
)
LAWS = {"chinchilla": CHINCHILLA, "finegrained": FINEGRAINED}

# The published grid of starts (Hoffmann et al. approach 3; 4,500 points).
CHINCHILLA_GRID = grid(
    log_E=np.arange(-1.0, 1.01, 0.5),
    log_A=np.arange(0.0, 25.1, 5.0),
    alpha=np.arange(0.0, 2.01, 0.5),
    log_B=np.arange(0.0, 25.1, 5.0),
    beta=np.arange(0.0, 2.01, 0.5),
)
# The fine-grained paper publishes no grid: this one brackets its Table 1 values (18,000 points),
# pre-screened by objective value before L-BFGS (see `fit_law(keep_starts=...)`).
FINEGRAINED_GRID = grid(
    log_c=(-1.0, -0.5, 0.0, 0.5),
    log_g=(0.0, 2.5, 5.0, 10.0, 20.0),
    gamma=(0.25, 0.5, 1.0),
    log_a=(0.0, 2.5, 5.0, 10.0, 20.0),
    alpha=(0.1, 0.3, 0.6, 1.0),
    log_b=(0.0, 2.5, 5.0, 10.0, 20.0),
    beta=(0.1, 0.3, 0.6),
)
GRIDS = {"chinchilla": CHINCHILLA_GRID, "finegrained": FINEGRAINED_GRID}

# Published coefficients, for comparison and planning.
HOFFMANN_2022 = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
BESIROGLU_2024 = {"E": 1.8172, "A": 482.01, "alpha": 0.3478, "B": 2085.43, "beta": 0.3658}
KRAJEWSKI_2024_MOE = {"c": 0.47, "g": 2.1, "gamma": 0.58, "a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147}
PRESETS = {
    "hoffmann2022": ("chinchilla", HOFFMANN_2022),
    "besiroglu2024": ("chinchilla", BESIROGLU_2024),
    "krajewski2024": ("finegrained", KRAJEWSKI_2024_MOE),
}


class FitError(RuntimeError):
    """No start of a fit converged to a finite objective."""


class NotIdentifiable(FitError):
    """The data cannot pin the law's coefficients down: many coefficient vectors fit equally well."""


# Rank tolerance of the Jacobian of the log-prediction (relative to its largest singular value). Fits
# of real and exact-law data sit at 1e-3..1e-5 (1e-7 on a nearly flat loss curve); identical rows, or
# points whose covariates move together, sit below 1e-30, as does a fit that switched a term off.
IDENTIFIABLE_RTOL = 1e-10


@dataclass(frozen=True)
class LawFit:
    """A fitted law: named coefficients, objective, and bootstrap intervals."""

    law: str
    """Law name ("chinchilla", "finegrained", "curve")."""
    coefficients: dict[str, float]
    """Named coefficients (E, A, alpha, ...), log-scale parameters exponentiated."""
    objective: float
    """Summed Huber objective at the optimum."""
    rmse_log: float
    """Root mean squared log residual over the fitted points."""
    n_points: int
    """Number of data points fitted."""
    n_starts: int
    """Starts run through L-BFGS."""
    n_converged: int
    """Of those, how many converged."""
    delta: float
    """Huber delta used."""
    theta: tuple[float, ...]
    """Raw parameter vector in the spec's order (log-scale coefficients as logs)."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap percentile interval per coefficient; empty without bootstrap."""
    n_bootstrap: int = 0
    """Bootstrap replicates behind `intervals`."""
    bootstrap_thetas: tuple[tuple[float, ...], ...] = ()
    """Raw parameter vector (as `theta`) of each bootstrap replicate that converged; empty without."""

    def __getitem__(self, name: str) -> float:
        return self.coefficients[name]

    @property
    def spec(self) -> LawSpec:
        return LAWS[self.law] if self.law in LAWS else CURVE_SPECS[self.law]

    def predict(self, data: pd.DataFrame | dict) -> np.ndarray:
        """Predicted loss for rows with the law's covariate columns."""
        logx = _log_covariates(self.spec, data)
        return np.exp(self.spec.log_predict(np.array(self.theta), logx)[0])

    def predict_interval(self, data: pd.DataFrame | dict, ci: float) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval (central mass `ci`) of the predicted loss over the bootstrap replicates."""
        if not self.bootstrap_thetas:
            raise ValueError(f"law {self.law!r} was fitted without bootstrap: no replicates to predict from")
        if not 0.0 < ci < 1.0:
            raise ValueError(f"ci={ci} must be in (0, 1)")
        logx = _log_covariates(self.spec, data)
        pred_BN = np.exp(self.spec.log_predict(np.array(self.bootstrap_thetas), logx))
        lo, hi = np.percentile(pred_BN, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2], axis=0)
        return lo, hi


CURVE_SPECS = {
    "curve": LawSpec(
        name="curve",
        params=("log_E", "log_A", "alpha"),
        covariates=("step",),
        terms=((0, ()), (1, ((2, 0),))),
    )
}


def law_from_preset(name: str) -> LawFit:
    """A LawFit holding published coefficients (no data, no intervals), for prediction and planning."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    law, coefs = PRESETS[name]
    spec = LAWS[law]
    return LawFit(
        law=law,
        coefficients=dict(coefs),
        objective=float("nan"),
        rmse_log=float("nan"),
        n_points=0,
        n_starts=0,
        n_converged=0,
        delta=float("nan"),
        theta=tuple(float(v) for v in spec.theta(coefs)),
    )


def _log_covariates(spec: LawSpec, data) -> np.ndarray:
    cols = []
    for c in spec.covariates:
        if c not in data:
            raise ValueError(f"law {spec.name!r} needs column {c!r}; got {sorted(data.keys())}")
        v = np.asarray(data[c], dtype=np.float64)
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"column {c!r} must be finite and > 0 for law {spec.name!r}")
        cols.append(np.log(v))
    return np.stack(cols, axis=1) if cols else np.zeros((0, 0))


def fit_law(
    spec: LawSpec,
    data: pd.DataFrame | dict,
    *,
    starts: dict[str, np.ndarray] | None = None,
    delta: float = 1e-3,
    keep_starts: int | None = None,
    bootstrap: int = 0,
    ci: float = 0.8,
    bootstrap_frac: float = 1.0,
    polish: int = 4,
    seed: int = 0,
    workers: int = min(2, os.cpu_count() or 1),
    loss_column: str = "loss",
) -> LawFit:
    """Fit `spec` to data (covariate columns + loss) from a grid of starts; raise if nothing converges.

    keep_starts: run L-BFGS only from the best `keep_starts` grid points by objective value (None: all).
    bootstrap: replicates; each resamples points (with replacement, or a `bootstrap_frac` subsample
    without replacement when < 1) and refits from the `polish` best distinct optima of the full fit.
    polish: distinct grid optima re-run with tight tolerances; the best one is the result.
    workers: threads sharing the starts (numpy releases the GIL in the vectorised objective).
    ci: central mass of the percentile interval (0.8 gives the 10th and 90th percentiles).
    """
    logx = _log_covariates(spec, data)
    if loss_column not in data:
        raise ValueError(f"law {spec.name!r} needs column {loss_column!r}")
    y = np.asarray(data[loss_column], dtype=np.float64)
    if not np.all(np.isfinite(y) & (y > 0)):
        raise ValueError(f"column {loss_column!r} must be finite and > 0")
    n, p = len(y), len(spec.params)
    if n <= p:
        raise ValueError(f"law {spec.name!r} has {p} parameters but only {n} data points; need > {p}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci} must be in (0, 1)")
    if not delta > 0:
        raise ValueError(f"delta={delta} must be > 0 (the Huber delta on log loss)")
    if bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap} must be >= 0 (replicates; 0 for none)")
    if not 0.0 < bootstrap_frac <= 1.0:
        raise ValueError(f"bootstrap_frac={bootstrap_frac} must be in (0, 1]")
    logy = np.log(y)
    x0 = starts_matrix(spec, starts if starts is not None else GRIDS[spec.name])

    ones = np.ones((1, n))
    with threadpool_limits(1):
        if keep_starts is not None and keep_starts < len(x0):
            screen = make_objective(spec, logx, logy, ones, delta, np.zeros(len(x0), dtype=np.int64))
            f0, _ = _chunked(screen, x0)
            x0 = x0[np.argsort(np.where(np.isfinite(f0), f0, np.inf))[:keep_starts]]
        fun = make_objective(spec, logx, logy, ones, delta, np.zeros(len(x0), dtype=np.int64))
        res = minimize_batched_threads(fun, x0, workers=workers, **GRID_TOL)
        ok = res.converged & np.isfinite(res.fun)
        if not ok.any():
            raise FitError(f"law {spec.name!r}: none of {len(x0)} starts converged on {n} points")
        top = _distinct(res.x[np.flatnonzero(ok)[np.argsort(res.fun[ok])]], polish)
        pol = minimize_batched_threads(fun, top, workers=1, **POLISH_TOL)
        # polishing only moves downhill, but keep the grid result if a polish run went non-finite
        f_top = np.where(np.isfinite(pol.fun), pol.fun, np.inf)
        order = np.argsort(f_top)
        optima = pol.x[order]
        best, best_f = optima[0], float(f_top[order[0]])
        _check_identifiable(spec, best, logx)
        resid = spec.log_predict(best, logx)[0] - logy
        intervals: dict[str, tuple[float, float]] = {}
        thetas: tuple[tuple[float, ...], ...] = ()
        if bootstrap > 0:
            intervals, thetas = _bootstrap(
                spec, logx, logy, optima, delta, bootstrap, ci, bootstrap_frac, seed, workers
            )
    return LawFit(
        law=spec.name,
        coefficients=spec.coefficients(best),
        objective=best_f,
        rmse_log=float(np.sqrt(np.mean(resid**2))),
        n_points=n,
        n_starts=len(x0),
        n_converged=int(ok.sum()),
        delta=delta,
        theta=tuple(float(v) for v in best),
        intervals=intervals,
        n_bootstrap=bootstrap,
        bootstrap_thetas=thetas,
    )


def _check_identifiable(spec: LawSpec, theta_P: np.ndarray, logx_NC: np.ndarray) -> None:
    """Raise NotIdentifiable when the log-prediction's Jacobian at the optimum is rank-deficient.

    d log L_n / d theta_p = sum_j w_jn A_pjn, with w the softmax weights of the terms (lse.LawSpec)."""
    P, J, N = len(spec.params), len(spec.terms), len(logx_NC)
    A_PJN = spec.design(logx_NC).reshape(P, J, N)
    T_JN = np.einsum("p,pjn->jn", theta_P, A_PJN)
    w_JN = np.exp(T_JN - T_JN.max(axis=0))
    w_JN /= w_JN.sum(axis=0)
    s = np.linalg.svd(np.einsum("jn,pjn->np", w_JN, A_PJN), compute_uv=False)
    rank = int((s > IDENTIFIABLE_RTOL * s[0]).sum())
    if rank == P:
        return
    distinct = ", ".join(
        f"{len(np.unique(logx_NC[:, i]))} distinct {c}" for i, c in enumerate(spec.covariates)
    )
    rows = len(np.unique(logx_NC, axis=0))
    coefs = ", ".join(f"{k} {v:.4g}" for k, v in spec.coefficients(theta_P).items())
    raise NotIdentifiable(
        f"law {spec.name!r} is not identifiable from these {N} points ({distinct}; {rows} distinct "
        f"covariate rows): they pin down only {rank} of its {P} parameter combinations (Jacobian rank), so "
        f"the best fit ({coefs}) is one of many equally good ones; add points that vary each of "
        f"{', '.join(spec.covariates)}"
    )


def _chunked(fun, x, chunk=4096):
    fs, gs = [], []
    for i in range(0, len(x), chunk):
        f, g = fun(x[i : i + chunk], np.arange(i, min(i + chunk, len(x))))
        fs.append(f)
        gs.append(g)
    return np.concatenate(fs), np.concatenate(gs)


def _distinct(thetas: np.ndarray, k: int) -> np.ndarray:
    """Up to k rows of (sorted) optima that differ from every earlier kept row."""
    kept = [thetas[0]]
    for t in thetas[1:]:
        if len(kept) >= k:
            break
        if all(np.max(np.abs(t - u)) > 1e-3 for u in kept):
            kept.append(t)
    return np.array(kept)


def _bootstrap(spec, logx, logy, starts, delta, reps, ci, frac, seed, workers):
    rng = np.random.default_rng(seed)
    n = len(logy)
    if frac >= 1.0:
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)
    else:
        m = max(int(round(frac * n)), len(spec.params) + 1)
        W = np.zeros((reps, n))
        for r in range(reps):
            W[r, rng.choice(n, size=m, replace=False)] = 1.0
    k = len(starts)
    x0 = np.tile(starts, (reps, 1))
    which = np.repeat(np.arange(reps), k)
    res = minimize_batched_threads(
        make_objective(spec, logx, logy, W, delta, which), x0, workers=workers, **BOOT_TOL
    )
    f = np.where(res.converged & np.isfinite(res.fun), res.fun, np.inf).reshape(reps, k)
    good = np.isfinite(f).any(axis=1)
    if not good.any():
        raise FitError(f"law {spec.name!r}: no bootstrap replicate converged")
    best = res.x.reshape(reps, k, -1)[np.arange(reps), f.argmin(axis=1)][good]
    coefs = [spec.coefficients(t) for t in best]
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    intervals = {
        name: (
            float(np.percentile([c[name] for c in coefs], lo)),
            float(np.percentile([c[name] for c in coefs], hi)),
        )
        for name in coefs[0]
    }
    return intervals, tuple(tuple(float(v) for v in t) for t in best)


def fit_chinchilla(data: pd.DataFrame | dict, **kw) -> LawFit:
    """L = E + A/N^alpha + B/D^beta (approach 3) on columns params, tokens, loss; full published grid."""
    return fit_law(CHINCHILLA, data, **kw)


def fit_finegrained(data: pd.DataFrame | dict, **kw) -> LawFit:
    """L = c + (g/G^gamma + a)/N^alpha + b/D^beta on columns params, tokens, granularity, loss."""
    kw.setdefault("keep_starts", 512)
    return fit_law(FINEGRAINED, data, **kw)


def levels(values, rel: float = 0.05) -> int:
    """Distinct levels of a covariate, values within `rel` of the previous level counting as one: the
    router makes N differ a little between the G of one model size, which is not another size."""
    out: list[float] = []
    for v in sorted(float(x) for x in values):
        if not out or v > out[-1] * (1 + rel):
            out.append(v)
    return len(out)
