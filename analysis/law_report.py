"""report.md's "## Answers" and the laws behind them: the fine-grained law and Chinchilla's per G, fitted
with bootstrap intervals on the runs a forecast did not hold out; from them the compute-optimal G (an
extrapolation), each variant against the baseline per token budget, the exponents and residual RMSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import plots
from analysis.compute_optimal import ComputeModel, ComputeOptimum, compute_optimal
from analysis.forecast import Forecast, _exponent_flags  # one flag rule for the forecast and the report
from analysis.laws import (
    GRIDS,
    LAWS,
    FitError,
    LawFit,
    fit_chinchilla,
    fit_finegrained,
    law_from_preset,
    levels,
)
from analysis.paired import paired_differences
from analysis.savings import pick_baselines

BUDGETS = (1e18, 1e19, 1e20, 1e21)  # FLOPs the compute-optimal G is solved at, beside the largest trained
G_SEARCH = tuple(2**i for i in range(11))  # the G it is chosen from (analysis.compute_optimal's default)
MIN_LEVELS = 3  # distinct values per covariate: a term's coefficient and exponent need three levels
GAP_CI = 0.95  # the paired differences' t interval, as in paired.csv
LAW_FITS_FILE = "law_fits.csv"
FIGURE = "law_fit_vs_observed.png"
EXPONENTS = ("alpha", "beta", "gamma")
PUBLISHED = law_from_preset("krajewski2024")  # their Table 1; its optima reproduce their Table 2 (tests)


@dataclass(frozen=True)
class LawSettings:
    """How the report fits its laws."""

    bootstrap: int = 100
    """Bootstrap refits behind every interval and the range of the compute-optimal G."""
    bootstrap_frac: float = 0.8
    """Each refit's share of the points, drawn without replacement."""
    ci: float = 0.8
    """Central mass of the coefficient intervals (0.8: 10th to 90th percentile, as the paper)."""
    keep_starts: int | None = None
    """Grid starts run through L-BFGS; None: each law's default (analysis.laws)."""
    budgets: tuple[float, ...] = BUDGETS
    """FLOPs budgets the compute-optimal G is solved at (the largest trained is added)."""

    def __post_init__(self):
        checks = {
            "bootstrap": (self.bootstrap >= 2, ">= 2 (intervals are percentiles over refits)"),
            "bootstrap_frac": (0.0 < self.bootstrap_frac <= 1.0, "in (0, 1]"),
            "ci": (0.0 < self.ci < 1.0, "in (0, 1)"),
            "keep_starts": (self.keep_starts is None or self.keep_starts >= 1, ">= 1 or None"),
            "budgets": (all(math.isfinite(b) and b > 0 for b in self.budgets), "finite and > 0"),
        }
        if bad := [f"laws.{k}={getattr(self, k)} must be {why}" for k, (ok, why) in checks.items() if not ok]:
            raise ValueError("; ".join(bad))


@dataclass(frozen=True)
class LawOutcome:
    """One law on one set of runs: its fit, or the reason it was not fitted."""

    law: str
    """"finegrained" or "chinchilla"."""
    granularity: float | None
    """The G its runs share; None: every G together."""
    n_points: int
    """Runs offered to the fit."""
    fit: LawFit | None = None
    """The fit with bootstrap intervals; None when refused."""
    reason: str = ""
    """Why it was not fitted: too few distinct points or levels, not identifiable, no convergence."""
    rmse: float = float("nan")
    """Root mean squared residual of the loss itself (not its log) over the fitted runs."""
    flags: tuple[str, ...] = ()
    """An exponent at 0 or at its grid's top, one whose interval is wider than it, refits that failed."""

    def __post_init__(self):
        if (self.fit is None) == (not self.reason):
            raise ValueError(f"law outcome {self.law} {self.label}: needs exactly one of a fit and a reason")
        if self.fit is not None and not (math.isfinite(self.rmse) and self.rmse >= 0):
            raise ValueError(f"law outcome {self.law} {self.label}: rmse={self.rmse} must be finite, >= 0")

    @property
    def label(self) -> str:
        return "all" if self.granularity is None else f"G={self.granularity:g}"


@dataclass(frozen=True)
class OptimalG:
    """The compute-optimal allocation at one budget, its spread over the refits, and the published one."""

    optimum: ComputeOptimum
    """From the fitted fine-grained law."""
    g_lo: int
    """Smallest optimal G over the bootstrap refits."""
    g_hi: int
    """Largest optimal G over the bootstrap refits."""
    published: ComputeOptimum
    """Krajewski et al. 2024's law under their compute model, at the same budget."""

    def __post_init__(self):
        if not self.g_lo <= self.g_hi:
            raise ValueError(f"optimal G at {self.optimum.flops:g}: g_lo={self.g_lo} > g_hi={self.g_hi}")


@dataclass(frozen=True)
class GapTrend:
    """A variant's paired final-loss difference from the baseline per token budget."""

    label: str
    """The variant as the answers name it ("G=8", or its variant name)."""
    base_label: str
    """The baseline, likewise."""
    tokens: tuple[float, ...]
    """Token budgets, increasing."""
    diff: tuple[float, ...]
    """Mean of variant - baseline over the (model, seed) pairs; negative favours the variant."""
    ci: tuple[tuple[float, float], ...]
    """Its GAP_CI t interval (NaNs with one pair)."""
    n_pairs: tuple[int, ...]
    """(model, seed) pairs per budget."""
    savings_steps: tuple[float, ...]
    """savings.csv's step savings, mean over models (NaN where not measured)."""

    def __post_init__(self):
        lengths = {len(getattr(self, k)) for k in ("tokens", "diff", "ci", "n_pairs", "savings_steps")}
        if lengths == {0} or len(lengths) > 1 or list(self.tokens) != sorted(set(self.tokens)):
            raise ValueError(f"gap {self.label}: needs increasing tokens, one value each, got {self.tokens}")

    @property
    def slope(self) -> float:
        """Change of the difference per doubling of tokens (least squares; NaN with one budget)."""
        return float(np.polyfit(np.log2(self.tokens), self.diff, 1)[0]) if len(self.tokens) > 1 else math.nan

    @property
    def resolvable(self) -> bool:
        """The intervals at the smallest and the largest budget do not overlap."""
        a, b = self.ci[0], self.ci[-1]
        return all(map(math.isfinite, a + b)) and (a[1] < b[0] or b[1] < a[0])


@dataclass(frozen=True)
class LawReport:
    """Everything the answers, law_fits.csv and laws.json say."""

    finegrained: LawOutcome
    """L(N, D, G) on the fit set."""
    by_granularity: tuple[LawOutcome, ...]
    """Chinchilla per G on the fit set, by increasing G."""
    optima: tuple[OptimalG, ...]
    """Compute-optimal G per budget, increasing (empty without a fine-grained fit)."""
    gaps: tuple[GapTrend, ...]
    """Each variant against the baseline by token budget, by increasing G."""
    held_out: tuple[str, ...]
    """Run keys left out of the fits: the forecast's held-out runs."""
    largest_flops: float
    """Most training FLOPs of a fitted run (moe.model.accounting; NaN when not logged)."""
    settings: LawSettings
    """How the laws were fitted."""
    gap_note: str = ""
    """Why no variant is compared with the baseline, when none is."""
    flagged: tuple[tuple[str, str], ...] = ()
    """(run key, why) of runs left out of the fits as flagged (analysis.derive.spiking_runs)."""


def fit_checked(law: str, data: pd.DataFrame, settings: LawSettings) -> LawFit:
    """Fit `law` with bootstrap intervals. ValueError: fewer than MIN_LEVELS distinct values of a
    covariate, or fewer distinct points than coefficients + 1; FitError (NotIdentifiable) from the fit."""
    spec = LAWS[law]
    covs = list(spec.covariates)
    for c in covs:
        if (k := levels(data[c])) < MIN_LEVELS:
            raise ValueError(f"needs >= {MIN_LEVELS} distinct {c} values, has {k}")
    n_distinct, n_coefs = len(data[covs].drop_duplicates()), len(spec.params)
    if n_distinct < n_coefs + 1:
        raise ValueError(f"its {n_coefs} coefficients need {n_coefs + 1} distinct points, has {n_distinct}")
    fitter = fit_finegrained if law == "finegrained" else fit_chinchilla
    kw = {} if settings.keep_starts is None else {"keep_starts": settings.keep_starts}  # None: the law's own
    return fitter(
        data, bootstrap=settings.bootstrap, bootstrap_frac=settings.bootstrap_frac, ci=settings.ci, **kw
    )


def law_outcome(law: str, data: pd.DataFrame, settings: LawSettings, granularity=None) -> LawOutcome:
    """`fit_checked`'s fit with its loss RMSE and flags, or its refusal as the reason."""
    try:
        fit = fit_checked(law, data, settings)
    except (ValueError, FitError) as e:  # NotIdentifiable is a FitError
        return LawOutcome(law, granularity, len(data), reason=str(e))
    rmse = float(np.sqrt(np.mean((fit.predict(data) - data["loss"].to_numpy(float)) ** 2)))
    flags = _exponent_flags(fit.coefficients, fit.intervals, GRIDS[law], settings.ci)
    if (k := len(fit.bootstrap_thetas)) < settings.bootstrap:
        flags.append(f"only {k} of {settings.bootstrap} bootstrap refits converged")
    return LawOutcome(law, granularity, len(data), fit=fit, rmse=rmse, flags=tuple(flags))


def optimal_g(fit: LawFit, flops: float, compute: ComputeModel) -> OptimalG:
    """The fitted law's optimum at `flops`, re-solved for every bootstrap refit, and the published one."""

    def solve(law, cm=compute):
        return compute_optimal(law, flops, granularities=G_SEARCH, compute=cm)

    gs = [solve(replace(fit, theta=t)).granularity for t in fit.bootstrap_thetas]  # predict reads theta
    return OptimalG(solve(fit), min(gs), max(gs), published=solve(PUBLISHED, ComputeModel()))


def gap_trends(per_run: pd.DataFrame, runs: pd.DataFrame, baseline, savings: pd.DataFrame):
    """(each variant against its budget's baseline pooled over models, why none). A (model, seed) is a
    pair, so the t interval counts the models' spread too (paired_differences on the pooled runs)."""
    try:
        bases = pick_baselines(runs, baseline)
    except ValueError as e:
        return (), str(e)
    if len(set(bases.values())) > 1:  # pooling over models pairs each variant with one baseline
        return (), f"the models' baselines differ ({', '.join(sorted(set(bases.values())))}): not pooled"
    unit = pd.factorize(pd.Series(list(zip(per_run["model"].astype(str), per_run["seed"], strict=True))))[0]
    pooled = {("all", t): b for (_, t), b in bases.items()}
    paired = paired_differences(per_run.assign(model="all", seed=unit), pooled, ci=GAP_CI)
    if paired.empty or not paired["n_pairs"].any():
        return (), "no variant shares a seed and a token budget with its baseline"
    g_of = runs.drop_duplicates("variant").set_index("variant")["granularity"].astype(float)
    label = {v: f"G={g:g}" if (g_of == g).sum() == 1 else v for v, g in g_of.items()}
    measured = savings[savings["status"] == "measured"] if "status" in savings else savings
    sav = measured.groupby(["variant", "tokens"])["savings_steps"].mean() if len(measured) else {}
    out = []
    for (v, base), g in paired[paired["n_pairs"] > 0].groupby(["variant", "baseline"]):
        g = g.sort_values("tokens")
        trend = GapTrend(
            label[v],
            label[base],
            tuple(g["tokens"].astype(float)),
            tuple(g["mean_diff"]),
            tuple(zip(g["ci_lo"], g["ci_hi"], strict=True)),
            tuple(int(n) for n in g["n_pairs"]),
            tuple(float(sav.get((v, t), np.nan)) for t in g["tokens"]),
        )
        out.append((g_of[v], v, trend))
    return tuple(t for *_, t in sorted(out, key=lambda x: x[:2])), ""


def law_report(
    data,
    per_run,
    runs,
    *,
    baseline=None,
    savings=None,
    forecast: Forecast | None = None,
    settings: LawSettings | None = None,
    flagged: dict[str, str] | None = None,
) -> LawReport:
    """Fit the laws on `data` (analysis.report_tables.law_data) less the forecast's held-out runs and the
    `flagged` ones ({run key: why}), solve the optima; compare each variant with the baseline on per_run
    (analysis.derive.run_finals) and savings.csv's rows."""
    settings = settings or LawSettings()
    held = tuple(sorted({r.run_key for r in forecast.rows} & set(data["run_key"]))) if forecast else ()
    bad = tuple(sorted((k, why) for k, why in (flagged or {}).items() if k in set(data["run_key"])))
    fit_data = data[~data["run_key"].isin(held + tuple(k for k, _ in bad))].dropna(subset=["granularity"])
    fg = law_outcome("finegrained", fit_data, settings)
    by_g = tuple(law_outcome("chinchilla", g, settings, float(G)) for G, g in fit_data.groupby("granularity"))
    largest = float(fit_data["flops"].max()) if len(fit_data) else math.nan
    experts = runs["experts"].dropna().unique() if "experts" in runs else []
    compute = ComputeModel(expansion=int(experts[0])) if len(experts) == 1 else ComputeModel()
    optima = ()
    if fg.fit is not None:
        budgets = set(settings.budgets) | ({largest} if math.isfinite(largest) else set())
        optima = tuple(optimal_g(fg.fit, f, compute) for f in sorted(budgets))
    gaps, note = gap_trends(per_run, runs, baseline, pd.DataFrame() if savings is None else savings)
    return LawReport(fg, by_g, optima, gaps, held, largest, settings, note, bad)


def law_fits_table(rep: LawReport) -> pd.DataFrame:
    """law_fits.csv: a row per coefficient of each fit (value, interval, the fit's loss RMSE, runs, the
    flags naming that coefficient or the whole fit); a row with the reason per refused fit."""
    rows = []
    for o in (rep.finegrained, *rep.by_granularity):
        head = {"law": o.law, "granularity": "all" if o.granularity is None else f"{o.granularity:g}"}
        if o.fit is None:
            nans = dict.fromkeys(("value", "lo", "hi", "rmse"), math.nan)
            rows.append(
                {**head, "coefficient": "", **nans, "n_points": o.n_points, "flag": "", "reason": o.reason}
            )
            continue
        general = [f for f in o.flags if f.split(" ", 1)[0] not in o.fit.coefficients]
        for k, v in o.fit.coefficients.items():
            lo, hi = o.fit.intervals.get(k, (math.nan, math.nan))
            flag = "; ".join([f for f in o.flags if f.split(" ", 1)[0] == k] + general)
            rows.append(
                {
                    **head,
                    "coefficient": k,
                    "value": v,
                    "lo": lo,
                    "hi": hi,
                    "rmse": o.rmse,
                    "n_points": o.n_points,
                    "flag": flag,
                    "reason": "",
                }
            )
    return pd.DataFrame(rows)


def laws_json(rep: LawReport) -> dict:
    """laws.json's entries: finegrained with intervals, chinchilla_by_granularity, fit_set."""

    def entry(o: LawOutcome) -> dict:
        if o.fit is None:
            return {"error": o.reason, "n_points": o.n_points}
        f = o.fit
        return {
            "coefficients": f.coefficients,
            "intervals": {k: list(v) for k, v in f.intervals.items()},
            "objective": f.objective,
            "n_points": f.n_points,
            "rmse": o.rmse,
            "rmse_log": f.rmse_log,
            "n_bootstrap": len(f.bootstrap_thetas),
            "flags": list(o.flags),
        }

    return {
        "finegrained": entry(rep.finegrained),
        "chinchilla_by_granularity": {o.label: entry(o) for o in rep.by_granularity},
        "fit_set": {"n_runs": rep.finegrained.n_points, "held_out": list(rep.held_out)},
    }


def write_law_outputs(out: Path, rep: LawReport, data: pd.DataFrame) -> list[str]:
    """Write out/law_fits.csv and the fitted-vs-observed figure (every run with a G, held-out ones
    marked); return the figure's name, or nothing without such runs."""
    law_fits_table(rep).to_csv(out / LAW_FITS_FILE, index=False)
    points = data.dropna(subset=["granularity"])
    if points.empty:
        return []
    fig, axes = plt.subplots(1, k := points["granularity"].nunique(), figsize=(4.2 * k, 3.8), squeeze=False)
    points = points.assign(held_out=points["run_key"].isin(rep.held_out))
    plots.plot_law_by_granularity(axes[0], points, rep.finegrained.fit)
    plots.save(fig, out / FIGURE)
    return [FIGURE]
