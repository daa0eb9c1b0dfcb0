"""Per-run loss-curve fits L(t) = E + A * t^-alpha, their inverse (steps to reach a loss), and the
degenerate-fit flag.

Same recipe as the scaling laws (log space, summed Huber, L-BFGS from a grid of starts); warmup and
the first steps do not follow a power law, so the fit starts at a fraction of the run (a knob).

The fit is unconstrained (analysis.laws.CURVE_SPECS fits log E, so E's bound is 0, and alpha is free).
On short runs the optimum often runs E to that bound (E ~ 1e-8: the "curve" is a straight line in
log-log that falls forever) or alpha to an edge; such a fit says nothing about where the curve is
heading, so `degenerate_reason` flags it and savings, plots and the report do not use it.
"""

from __future__ import annotations

import numpy as np

from analysis.laws import CURVE_SPECS, LawFit, fit_law
from analysis.lse import grid

CURVE = CURVE_SPECS["curve"]
# 6 x 6 x 5 = 180 starts, wide enough for LM losses of 1-11 nats over 10-1e6 steps.
CURVE_GRID = grid(
    log_E=(-1.0, 0.0, 0.5, 1.0, 1.5, 2.0),
    log_A=(0.0, 1.0, 2.0, 3.0, 4.0, 6.0),
    alpha=(0.05, 0.1, 0.25, 0.5, 1.0),
)
E_MIN = 0.05
"""Nats. E below this sits at its bound 0: no language model's loss tends to ~0, so the fit has traded
the asymptote for a line in log-log (28 of 38 committed fits before issue 23 had E < 0.05)."""
ALPHA_RANGE = (0.01, 2.0)
"""Outside it the exponent ran off: ~0 is a flat line, > 2 a curve that stops falling within a few steps."""


def fit_loss_curve(steps, loss, *, fit_from_frac: float = 0.1, delta: float = 1e-3) -> LawFit:
    """Fit E + A*t^-alpha to (steps, loss) points with step >= fit_from_frac * last step.

    Raises ValueError with too few points and analysis.laws.FitError when no start converges.
    """
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    if t.shape != y.shape:
        raise ValueError(f"steps and loss differ in shape: {t.shape} vs {y.shape}")
    if not 0.0 <= fit_from_frac < 1.0:
        raise ValueError(f"fit_from_frac={fit_from_frac} must be in [0, 1)")
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > 0)
    if keep.any():
        keep &= t >= fit_from_frac * t[keep].max()
    return fit_law(CURVE, {"step": t[keep], "loss": y[keep]}, starts=CURVE_GRID, delta=delta)


def degenerate_reason(fit: LawFit) -> str:
    """Why a loss-curve fit is degenerate ("" when it is usable): E at its bound, alpha off its range."""
    E, A, alpha = fit["E"], fit["A"], fit["alpha"]
    if not all(np.isfinite(v) for v in (E, A, alpha)):
        return f"non-finite coefficients (E={E:.4g}, A={A:.4g}, alpha={alpha:.4g})"
    if E < E_MIN:
        return f"E={E:.3g} at its bound 0 (< {E_MIN:g} nats)"
    lo, hi = ALPHA_RANGE
    if not lo <= alpha <= hi:
        return f"alpha={alpha:.3g} outside [{lo:g}, {hi:g}]"
    return ""


def is_degenerate(fit: LawFit) -> bool:
    """True when `degenerate_reason` flags the fit: never use it to extrapolate or draw."""
    return bool(degenerate_reason(fit))


def steps_to_reach(fit: LawFit, target: float) -> float:
    """Step at which the fitted curve reaches `target`; inf when target <= E (never reached)."""
    E, A, alpha = fit["E"], fit["A"], fit["alpha"]
    if target <= E or alpha <= 0:
        return float("inf")
    return float((A / (target - E)) ** (1.0 / alpha))
