"""report.md's "## Answers": the sentences a reader wants first, from analysis.law_report's LawReport —
the compute-optimal G (an extrapolation, beside Krajewski et al. 2024), each variant against the baseline
per token budget, the fitted exponents. Plain and hedged; each only where its inputs exist."""

from __future__ import annotations

import math

import numpy as np

from analysis.law_report import EXPONENTS, G_SEARCH, GAP_CI, PUBLISHED, GapTrend, LawOutcome, LawReport


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
        parts.append(
            f"at {_e(at)} FLOPs ({where}) G = {opt.granularity} [{o.g_lo}-{o.g_hi}{edge}], "
            f"N = {_e(opt.params)}, D = {_e(opt.tokens)}"
        )
    pub = ", ".join(f"{o.published.granularity} at {_e(o.published.flops)}" for o in rep.optima)
    top, refits = max(o.granularity for o in rep.by_granularity), len(rep.finegrained.fit.bootstrap_thetas)
    return (
        f"**Compute-optimal G** from the fine-grained law; budgets beyond the largest run's "
        f"{_e(rep.largest_flops)} FLOPs are extrapolations, and so is any G above {top:g}, the largest "
        f"trained; in brackets the optimal G's range over {refits} bootstrap refits: "
        + "; ".join(parts)
        + f". Solved under the {rep.optima[0].optimum.convention}, G from 1 to {G_SEARCH[-1]}. "
        "Krajewski et al. 2024's law (their Table 1 coefficients under their compute model, E = 64, "
        f"which reproduces their Table 2) gives G = {pub} FLOPs."
    )


def _gap_sentence(gap: GapTrend) -> str:
    lab, base = gap.label, gap.base_label
    cells = [
        f"{d:+.3g}" + (f" [{lo:+.3g}, {hi:+.3g}]" if math.isfinite(lo) else "") + f" at {_e(t)} tokens"
        for t, d, (lo, hi) in zip(gap.tokens, gap.diff, gap.ci, strict=True)
    ]
    pairs = "-".join(str(n) for n in sorted(set(gap.n_pairs)))
    text = (
        f"**{lab} vs {base} by token budget** (smoothed final val loss, {lab} - {base}, mean over "
        f"{pairs} (model, seed) pairs, {GAP_CI:.0%} t interval): " + ", ".join(cells)
    )
    if any(map(math.isfinite, gap.savings_steps)):
        shown = (f"{s:.0%}" if math.isfinite(s) else "n/a" for s in gap.savings_steps)
        text += "; step savings (savings.csv, mean over models) " + ", ".join(shown)
    if len(gap.tokens) < 2:
        return text + ". One token budget only: no trend over tokens."
    d, s = np.array(gap.diff), gap.slope
    if abs(s) <= 1e-9 * np.abs(d).max():  # a flat gap (an exact law without a D x G term) has no direction
        return f"{text}. The difference is the same at every budget."
    ahead = d.mean() < 0  # an advantage (on average over budgets) grows when the difference falls
    trend = (
        f"the {lab} {'advantage' if ahead else 'deficit'} {'grows' if (s < 0) == ahead else 'shrinks'} "
        f"with tokens (the difference changes by {s:+.3g} per doubling of tokens)"
    )
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
        text = (
            f"fine-grained law on {fg.n_points} runs: {_exponents(fg)} (Krajewski et al. 2024: {pub}), "
            f"residual RMSE {fg.rmse:.3g} (loss)"
        )
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
    if rep.flagged:
        held += " (left out as flagged: " + "; ".join(f"{k}: {why}" for k, why in rep.flagged) + ")"
    intro = (
        f"What the fitted laws imply, not measurements: laws fitted on {rep.finegrained.n_points} runs"
        f"{held}; {s.ci:.0%} intervals over {s.bootstrap} bootstrap refits on {s.bootstrap_frac:.0%} "
        "subsamples; comparisons by token budget use every run."
    )
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
