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
from analysis.laws import GRIDS, LAWS, FitError, LawFit, fit_chinchilla, fit_finegrained, law_from_preset
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
    """Most training FLOPs of a fitted run (moe.accounting; NaN when not logged)."""
    settings: LawSettings
    """How the laws were fitted."""
    gap_note: str = ""
    """Why no variant is compared with the baseline, when none is."""


def fit_checked(law: str, data: pd.DataFrame, settings: LawSettings) -> LawFit:
    """Fit `law` with bootstrap intervals. ValueError: fewer than MIN_LEVELS distinct values of a
    covariate, or fewer distinct points than coefficients + 1; FitError (NotIdentifiable) from the fit."""
    spec = LAWS[law]
    covs = list(spec.covariates)
    for c in covs:
        if (k := data[c].nunique()) < MIN_LEVELS:
            raise ValueError(f"needs >= {MIN_LEVELS} distinct {c} values, has {k}")
    n_distinct, n_coefs = len(data[covs].drop_duplicates()), len(spec.params)
    if n_distinct < n_coefs + 1:
        raise ValueError(f"its {n_coefs} coefficients need {n_coefs + 1} distinct points, has {n_distinct}")
    fitter = fit_finegrained if law == "finegrained" else fit_chinchilla
    kw = {} if settings.keep_starts is None else {"keep_starts": settings.keep_starts}  # None: the law's own
    return fitter(data, bootstrap=settings.bootstrap, bootstrap_frac=settings.bootstrap_frac, ci=settings.ci,
                  **kw)  # fmt: skip


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
        trend = GapTrend(label[v], label[base], tuple(g["tokens"].astype(float)), tuple(g["mean_diff"]),
                         tuple(zip(g["ci_lo"], g["ci_hi"], strict=True)), tuple(int(n) for n in g["n_pairs"]),
                         tuple(float(sav.get((v, t), np.nan)) for t in g["tokens"]))  # fmt: skip
        out.append((g_of[v], v, trend))
    return tuple(t for *_, t in sorted(out, key=lambda x: x[:2])), ""


def law_report(data, per_run, runs, *, baseline=None, savings=None, forecast: Forecast | None = None,
               settings: LawSettings | None = None) -> LawReport:  # fmt: skip
    """Fit the laws on `data` (analysis.report.law_data) less the forecast's held-out runs, solve the optima;
    compare each variant with the baseline on per_run (analysis.derive.run_finals) and savings.csv's rows."""
    settings = settings or LawSettings()
    held = tuple(sorted({r.run_key for r in forecast.rows} & set(data["run_key"]))) if forecast else ()
    fit_data = data[~data["run_key"].isin(held)].dropna(subset=["granularity"])
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
    return LawReport(fg, by_g, optima, gaps, held, largest, settings, note)


def _e(x: float) -> str:
    m, e = f"{x:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def _optimum_sentence(rep: LawReport) -> str:
    parts = []
    for o in rep.optima:
        at, opt = o.optimum.flops, o.optimum
        where = "largest run" if at == rep.largest_flops else "within runs"
        where = where if at <= rep.largest_flops else "extrapolation"
        edge = ", the edge of the G searched" if opt.granularity == G_SEARCH[-1] else ""
        parts.append(f"at {_e(at)} FLOPs ({where}) G = {opt.granularity} [{o.g_lo}-{o.g_hi}{edge}], "
                     f"N = {_e(opt.params)}, D = {_e(opt.tokens)}")  # fmt: skip
    pub = ", ".join(f"{o.published.granularity} at {_e(o.published.flops)}" for o in rep.optima)
    top, refits = max(o.granularity for o in rep.by_granularity), len(rep.finegrained.fit.bootstrap_thetas)
    return (f"**Compute-optimal G** from the fine-grained law; budgets beyond the largest run's "
            f"{_e(rep.largest_flops)} FLOPs are extrapolations, and so is any G above {top:g}, the largest "
            f"trained; in brackets the optimal G's range over {refits} bootstrap refits: " + "; ".join(parts)
            + f". Solved under the {rep.optima[0].optimum.convention}, G from 1 to {G_SEARCH[-1]}. "
            "Krajewski et al. 2024's law (their Table 1 coefficients under their compute model, E = 64, "
            f"which reproduces their Table 2) gives G = {pub} FLOPs.")  # fmt: skip


def _gap_sentence(gap: GapTrend) -> str:
    lab, base = gap.label, gap.base_label
    cells = [f"{d:+.3g}" + (f" [{lo:+.3g}, {hi:+.3g}]" if math.isfinite(lo) else "") + f" at {_e(t)} tokens"
             for t, d, (lo, hi) in zip(gap.tokens, gap.diff, gap.ci, strict=True)]  # fmt: skip
    pairs = "-".join(str(n) for n in sorted(set(gap.n_pairs)))
    text = (f"**{lab} vs {base} by token budget** (smoothed final val loss, {lab} - {base}, mean over "
            f"{pairs} (model, seed) pairs, {GAP_CI:.0%} t interval): " + ", ".join(cells))  # fmt: skip
    if any(map(math.isfinite, gap.savings_steps)):
        shown = (f"{s:.0%}" if math.isfinite(s) else "n/a" for s in gap.savings_steps)
        text += "; step savings (savings.csv, mean over models) " + ", ".join(shown)
    if len(gap.tokens) < 2:
        return text + ". One token budget only: no trend over tokens."
    d, s = np.array(gap.diff), gap.slope
    if abs(s) <= 1e-9 * np.abs(d).max():  # a flat gap (an exact law without a D x G term) has no direction
        return f"{text}. The difference is the same at every budget."
    ahead = d.mean() < 0  # an advantage (on average over budgets) grows when the difference falls
    trend = (f"the {lab} {'advantage' if ahead else 'deficit'} {'grows' if (s < 0) == ahead else 'shrinks'} "
             f"with tokens (the difference changes by {s:+.3g} per doubling of tokens)")  # fmt: skip
    ends = f"{_e(gap.tokens[0])} and {_e(gap.tokens[-1])} tokens"
    if gap.resolvable:
        return f"{text}. {trend[0].upper()}{trend[1:]}, resolvably: the intervals at {ends} do not overlap."
    why = f"the intervals at {ends} overlap" if math.isfinite(gap.ci[0][0]) else "one pair per budget"
    return f"{text}. The difference does not change resolvably with tokens ({why}); point estimates: {trend}."


def _exponents(o: LawOutcome) -> str:
    f = o.fit
    iv = {k: f" [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in f.intervals.items()}
    return ", ".join(f"{k} = {f[k]:.3g}{iv.get(k, '')}" for k in EXPONENTS if k in f.coefficients)


def _exponent_sentence(rep: LawReport) -> str:
    fg = rep.finegrained
    if fg.fit is not None:
        pub = ", ".join(f"{k} {PUBLISHED[k]:g}" for k in EXPONENTS)
        text = (f"fine-grained law on {fg.n_points} runs: {_exponents(fg)} (Krajewski et al. 2024: {pub}), "
                f"residual RMSE {fg.rmse:.3g} (loss)")  # fmt: skip
    else:
        text = f"fine-grained law not fitted ({fg.reason})"
    gs = rep.by_granularity
    per_g = [f"{o.label}: {_exponents(o)}, RMSE {o.rmse:.3g}" for o in gs if o.fit]
    for why in dict.fromkeys(o.reason for o in gs if o.fit is None):  # one entry per reason
        per_g.append(", ".join(o.label for o in gs if o.reason == why) + f": not fitted ({why})")
    text += ". Chinchilla per G: " + "; ".join(per_g) if per_g else ""
    flags = [f"{o.law} {o.label}: {f}" for o in (fg, *rep.by_granularity) for f in o.flags]
    return text + (". Flags: " + "; ".join(flags) if flags else "") + "."


def answers_section(rep: LawReport) -> list[str]:
    """report.md's "## Answers": plain, hedged sentences, each only where its inputs exist."""
    s = rep.settings
    held = f" (the forecast's {len(rep.held_out)} held-out runs left out)" if rep.held_out else ""
    intro = (f"What the fitted laws imply, not measurements: laws fitted on {rep.finegrained.n_points} runs"
             f"{held}; {s.ci:.0%} intervals over {s.bootstrap} bootstrap refits on {s.bootstrap_frac:.0%} "
             "subsamples; comparisons by token budget use every run.")  # fmt: skip
    lines = ["## Answers", "", intro, ""]
    missing = []
    if rep.optima:
        lines.append("- " + _optimum_sentence(rep))
    else:
        missing.append(f"the compute-optimal G (no fine-grained law: {rep.finegrained.reason})")
    lines += ["- " + _gap_sentence(g) for g in rep.gaps]
    if not rep.gaps:
        missing.append(f"each G against the baseline by token budget ({rep.gap_note})")
    laws = (rep.finegrained, *rep.by_granularity)
    if any(o.fit is not None for o in laws):
        lines.append(f"- **Fitted exponents** ({s.ci:.0%} intervals): {_exponent_sentence(rep)}")
    else:
        missing.append(f"the exponents (no law fitted: {'; '.join(dict.fromkeys(o.reason for o in laws))})")
    if missing:
        lines.append("- Not answered: " + "; ".join(missing) + ".")
    return lines + [""]


def law_fits_table(rep: LawReport) -> pd.DataFrame:
    """law_fits.csv: a row per coefficient of each fit (value, interval, the fit's loss RMSE, runs, the
    flags naming that coefficient or the whole fit); a row with the reason per refused fit."""
    rows = []
    for o in (rep.finegrained, *rep.by_granularity):
        head = {"law": o.law, "granularity": "all" if o.granularity is None else f"{o.granularity:g}"}
        if o.fit is None:
            nans = dict.fromkeys(("value", "lo", "hi", "rmse"), math.nan)
            rows.append({**head, "coefficient": "", **nans, "n_points": o.n_points, "flag": "",
                         "reason": o.reason})  # fmt: skip
            continue
        general = [f for f in o.flags if f.split(" ", 1)[0] not in o.fit.coefficients]
        for k, v in o.fit.coefficients.items():
            lo, hi = o.fit.intervals.get(k, (math.nan, math.nan))
            flag = "; ".join([f for f in o.flags if f.split(" ", 1)[0] == k] + general)
            rows.append({**head, "coefficient": k, "value": v, "lo": lo, "hi": hi, "rmse": o.rmse,
                         "n_points": o.n_points, "flag": flag, "reason": ""})  # fmt: skip
    return pd.DataFrame(rows)


def laws_json(rep: LawReport) -> dict:
    """laws.json's entries: finegrained with intervals, chinchilla_by_granularity, fit_set."""

    def entry(o: LawOutcome) -> dict:
        if o.fit is None:
            return {"error": o.reason, "n_points": o.n_points}
        f = o.fit
        return {"coefficients": f.coefficients, "intervals": {k: list(v) for k, v in f.intervals.items()},
                "objective": f.objective, "n_points": f.n_points, "rmse": o.rmse, "rmse_log": f.rmse_log,
                "n_bootstrap": len(f.bootstrap_thetas), "flags": list(o.flags)}  # fmt: skip

    return {"finegrained": entry(rep.finegrained),
            "chinchilla_by_granularity": {o.label: entry(o) for o in rep.by_granularity},
            "fit_set": {"n_runs": rep.finegrained.n_points, "held_out": list(rep.held_out)}}  # fmt: skip


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
