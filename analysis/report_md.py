"""report.md, section by section, from the tables and fits `analysis.report.write_report` computed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.checks import Check
from analysis.derive import FLOPS_PER_TOKEN, LR, RAW_LABEL, Smoothing, smoothed_label
from analysis.tuning import LrTuning

FLOP_CONVENTION = (
    "moe.model.accounting: router counted as a matmul, 6 FLOPs per router parameter per token; "
    "analysis.compute_optimal's planning defaults to the paper's 14"
)
FINAL_COLUMNS = ("final_val_loss_raw", "final_val_loss_smoothed", "final_val_loss_smoothed_std")
"""final_losses.csv's names of the final losses; `final_labels` gives what the report prints."""


def final_labels(smoothing: Smoothing) -> dict[str, str]:
    """final_losses.csv column -> the label the report and the printed summary show."""
    raw, smoothed, std = FINAL_COLUMNS
    return {raw: RAW_LABEL, smoothed: smoothed_label(smoothing), std: "std over seeds (smoothed)"}


def md_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    return "\n".join(
        [head, sep] + ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    )


def fairness_sections(
    checks: list[Check], tuning: LrTuning, at_best: bool, smoothing: Smoothing
) -> list[str]:
    """Comparability checks, then the LR grid when the comparison is at each variant's best LR."""
    lines = ["## Comparability checks", ""]
    for c in checks:
        params = ", ".join(f"`{p}`" for p in c.params)
        lines += [f"- **{c.name}** ({params}): {c.summary}"]
        if not c.offenders.empty:
            lines += ["", md_table(c.offenders), ""]
    lines += [""]
    if not at_best:
        lr = tuning.best["lr"].dropna()
        where = (
            f"`{LR}` = {', '.join(sorted({format(v, 'g') for v in lr}))}" if len(lr) else f"`{LR}` not logged"
        )
        return lines + [f"Learning rate: one per variant ({where}); no best-LR selection.", ""]
    grid = tuning.grid.assign(chosen=np.where(tuning.grid["best"], "best", "")).drop(columns="best")
    best = tuning.best[["model", "tokens", "variant", "lr", "n_lrs", "note"]]
    lines += [
        f"## Learning-rate grid (`{LR}`)",
        "",
        "Savings, final losses and paired differences below use each variant at its own best LR "
        f"(lowest mean {smoothed_label(smoothing)} over seeds, val_loss); runs at other LRs are left out of "
        "them. "
        "A best LR at the edge of its grid is not picked (note 'no pick: ...'): a better one may lie "
        "outside; that variant is compared at it, untuned, and the findings say so.",
        "",
        md_table(grid),
        "",
        md_table(best),
        "",
    ]
    return lines


def paired_section(paired: pd.DataFrame, note: str, smoothing: Smoothing) -> list[str]:
    lines = [f"## Paired differences by seed (variant - baseline {smoothed_label(smoothing)})", ""]
    if paired.empty:
        return lines + [f"Not measured: {note}", ""]
    t = paired.copy()
    for c in ("ci_lo", "ci_hi", "sd_diff"):
        t[c] = [format(v, ".4g") if np.isfinite(v) else "n/a" for v in t[c]]
    return lines + [
        "Only seeds both arms ran are paired; negative favours the variant; interval: 95% Student t over "
        "the paired differences (n/a with fewer than 2 pairs); sd_diff = their standard deviation over "
        "seeds; diffs = each seed's difference, in the order of `seeds` (one chaotic seed shows here); "
        "favour_variant = pairs where the variant's loss is lower (the sign count).",
        "",
        md_table(t),
        "",
    ]


def final_eval_section(per_run: pd.DataFrame, paired_eval: pd.DataFrame) -> list[str]:
    """The many-window final evaluation (val/loss_final): per variant, then paired by seed; nothing when
    no run logged it (older stores, train.final_eval_tokens=null)."""
    runs = per_run.dropna(subset=["final_eval"])
    if runs.empty:
        return []
    table = (
        runs.groupby(["model", "tokens", "variant"], dropna=False)
        .agg(
            seeds=("final_eval", "count"),
            final_eval=("final_eval", "mean"),
            std_over_seeds=("final_eval", "std"),
            single_run_se=("final_eval_se", "mean"),
        )
        .reset_index()
    )
    lines = [
        "## Final evaluation on many windows (`val/loss_final`)",
        "",
        "One more evaluation after the last step on train.final_eval_tokens spread over the val split: "
        "single_run_se is a run's standard error with its windows as samples (mean over the seeds), "
        "std_over_seeds the spread of the runs themselves.",
        "",
        md_table(table),
        "",
    ]
    if paired_eval.empty or not paired_eval["n_pairs"].any():
        return lines
    t = paired_eval.copy()
    for c in ("ci_lo", "ci_hi", "sd_diff"):
        t[c] = [format(v, ".4g") if np.isfinite(v) else "n/a" for v in t[c]]
    return lines + ["Paired by seed (variant - baseline `val/loss_final`; as above):", "", md_table(t), ""]


def render(
    s,
    findings,
    fair,
    finals,
    sav,
    paired,
    fit_table,
    laws,
    figures,
    smoothing,
    final_eval=(),
    forecast=(),
    answers=(),
) -> str:
    """The whole report.md: answers and findings first, then loading notes, exclusions, checks, tables, fits,
    figures. sav: (savings summary, savings per seed, why they were not measured); final_eval: (run_finals
    rows, paired differences of their final_eval) or empty; forecast: `forecast_section`'s lines or empty;
    answers: analysis.law_answers' `answers_section` lines, or empty."""
    savings, per_seed, savings_note = sav
    lines = [
        f"# Study report: {s.name}",
        "",
        f"Source: `{s.source}`. Finished point runs: {len(s.runs)}; "
        f"excluded: {len(s.excluded)}. Smoothing: {smoothing.describe()} ({smoothing}).",
        "",
        *answers,
        "## Findings",
        "",
    ]
    lines += [f"- {f}" for f in findings] or [f"No comparison measured: {savings_note}"]
    lines += [""]
    if s.notes:
        lines += ["## Loading notes", ""] + [f"- {n}" for n in s.notes] + [""]
    if not s.excluded.empty:
        lines += ["## Excluded runs (unfinished or failed)", "", md_table(s.excluded), ""]
    lines += fair
    lines += [
        "## Final validation loss (mean over seeds)",
        "",
        f"{RAW_LABEL}: the last logged val/loss (summary.json's final, MLflow's last value); "
        f"{smoothed_label(smoothing)}: the smoothed curve's last value, which the step savings, the "
        "paired differences and the law fits use.",
        "",
        md_table(finals.rename(columns=final_labels(smoothing))),
        "",
    ]
    lines += savings_sections(savings, per_seed, savings_note, smoothing)
    lines += paired_section(paired, savings_note, smoothing)
    lines += final_eval_section(*final_eval) if final_eval else []
    lines += fits_section(fit_table)
    lines += ["## Scaling-law fits", ""]
    for name, (fit, err) in laws.items():
        if fit is None:
            lines += [f"- {name}: not fitted ({err})"]
        else:
            coefs = ", ".join(f"{k} = {v:.4g}" for k, v in fit.coefficients.items())
            lines += [
                f"- {name}: {coefs} (objective {fit.objective:.3g}, rmse(log) {fit.rmse_log:.3g}, "
                f"{fit.n_points} points)"
            ]
    lines += [""] + list(forecast)
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def forecast_section(forecast, table: pd.DataFrame, summary: list[str]) -> list[str]:
    """The forecast on record (analysis.forecast.Forecast) against the held-out runs' final losses:
    `table` is analysis.forecast_compare.compare's, `summary` its forecast_summary sentences."""
    ivs = forecast.intervals
    coefs = ", ".join(
        f"{k} = {v:.4g}" + (f" [{ivs[k][0]:.4g}, {ivs[k][1]:.4g}]" if k in ivs else "")
        for k, v in forecast.coefficients.items()
    )
    lines = [
        "## Forecast (written before the held-out runs trained)",
        "",
        f"Written {forecast.written_at} by fitting the {forecast.law} law on {len(forecast.fit_run_keys)} "
        f"finished runs (rmse(log) {forecast.rmse_log:.3g}): {coefs}. Intervals: {forecast.ci:.0%} percentile "
        f"intervals over {forecast.n_bootstrap} bootstrap refits. observed = the run's `val/loss_final` where "
        "logged, else its final val loss (smoothed); rel_err = (predicted - observed) / observed.",
        "",
    ]
    lines += [f"- Flag: {f}" for f in forecast.flags] or ["Flags: none."]
    shown = table.assign(inside=table["inside"].map({True: "yes", False: "no"}).fillna(""))  # not <NA>
    lines += ["", md_table(shown), ""] + [f"- {s}" for s in summary] + [""]
    return lines


SAVINGS_COLUMNS = (
    "model",
    "tokens",
    "variant",
    "baseline",
    "status",
    "n_seeds",
    "savings_steps",
    "ci_lo",
    "ci_hi",
    "savings_steps_sd",
    "n_positive",
    "n_extrapolated",
    "n_not_reached",
    "savings_bound",
    "savings_tokens",
    "savings_flops",
    "savings_time",
    "savings_time_ci_lo",
    "savings_time_ci_hi",
    "tokens_per_s_ratio",
    "target_loss",
    "unpaired",
    "note",
)
PER_SEED_COLUMNS = (
    "variant",
    "baseline",
    "tokens",
    "seed",
    "target_loss",
    "steps_baseline",
    "steps_variant",
    "reach",
    "savings_steps",
    "savings_bound",
    "savings_flops",
    "savings_time",
    "tokens_per_s_ratio",
    "note",
    "time_note",
)


def savings_sections(savings, per_seed, note: str, smoothing: Smoothing) -> list[str]:
    """The savings per variant (mean, t interval, sign count) and each seed's."""
    lines = [f"## Savings to reach the baseline's {smoothed_label(smoothing)}", ""]
    if savings.empty:
        return lines + [f"Not measured: {note}", ""]
    return lines + [
        f"Per seed both arms ran: target_loss = the baseline's {smoothed_label(smoothing)}; steps_variant = "
        "where the variant's smoothed curve reaches it (interpolated in log-step); savings = 1 - "
        "steps_variant / steps_baseline, in steps, tokens, FLOPs and training time (`time/train_s`, training "
        "only, interpolated at those steps); tokens_per_s_ratio = variant / baseline at their last steps. "
        "Per variant: the mean over seeds, a Student t interval over seeds (ci_lo, ci_hi; empty with one "
        "seed), savings_steps_sd, n_positive = seeds with savings > 0 (the sign count). reach: observed; "
        "extrapolated (the variant's non-degenerate L(t) fit crosses beyond its last step); not reached "
        "(no usable fit, or one crossing before the last step: savings unknown, at most savings_bound). "
        "The mean is over the seeds with a number when they are more than half of the seeds, else the "
        f"status is not reached. FLOPs are the runs' {FLOPS_PER_TOKEN} ({FLOP_CONVENTION}).",
        "",
        md_table(savings[[c for c in SAVINGS_COLUMNS if c in savings]]),
        "",
        "### Savings per seed",
        "",
        md_table(per_seed[[c for c in PER_SEED_COLUMNS if c in per_seed]]),
        "",
    ]


def fits_section(fit_table: pd.DataFrame) -> list[str]:
    """The L(t) coefficients per run, and which fits are degenerate (not used for savings, not drawn)."""
    lines = ["## Loss-curve fits L(t) = E + A t^-alpha", "", md_table(fit_table), ""]
    bad = fit_table[fit_table["degenerate"].fillna("").astype(bool)] if "degenerate" in fit_table else []
    if len(bad):
        lines += [
            f"Degenerate fits ({len(bad)} of {len(fit_table)}), not used for savings and not drawn: "
            + "; ".join(f"{r.run_key} ({r.variant}, seed {r.seed}): {r.degenerate}" for r in bad.itertuples())
            + ".",
            "",
        ]
    return lines


DOWNSTREAM = "## Downstream accuracy"


def with_downstream(report: str, downstream: str) -> str:
    """report.md with its downstream section (studies.eval's downstream.md, first heading dropped)
    replaced or appended: written by the report and by the evaluation, whichever runs last."""
    head = report.split(f"\n{DOWNSTREAM}\n", 1)[0].rstrip("\n")
    body = downstream.split("\n", 1)[-1].lstrip()
    return f"{head}\n\n{DOWNSTREAM}\n\n{body}"
