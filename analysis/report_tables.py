"""The tables the report computes from the curves: final losses per variant, one scaling-law point per
run, loss-curve fits per run, and the plain-text summary `python -m analysis.report` prints.
"""

from __future__ import annotations

import pandas as pd

from analysis.checks import ROUTED_SCALE, per_variant
from analysis.curves import degenerate_reason, fit_loss_curve
from analysis.derive import LR, Smoothing, final_losses
from analysis.laws import FitError, LawFit
from analysis.report_md import FINAL_COLUMNS, final_labels


def final_table(curve: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, tokens, variant): seeds, mean final raw and smoothed val loss over seeds, the smoothed
    one's std (columns `report_md.FINAL_COLUMNS`), and the variant's `optim.lr` and
    `moe.routed_scale_used` values as text ("" where not logged)."""
    f = final_losses(curve).merge(
        runs[["run_key", "model", "tokens", "variant", "seed"]].rename(columns={"tokens": "budget"}),
        on="run_key",
    )
    raw, smoothed, std = FINAL_COLUMNS
    out = (
        f.groupby(["model", "budget", "variant"], dropna=False)
        .agg(
            seeds=("final_smooth", "count"),
            **{raw: ("final", "mean"), smoothed: ("final_smooth", "mean"), std: ("final_smooth", "std")},
        )
        .reset_index()
        .rename(columns={"budget": "tokens"})
    )
    for name, col in ((LR, "lr"), (ROUTED_SCALE, "routed_scale")):
        vals = per_variant(runs, name).rename(columns={name: col})
        out = out.merge(vals, on=["model", "tokens", "variant"], how="left")
    return out


def law_data(curve: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One scaling-law point per run: non-embedding params, tokens trained, final smoothed loss, G, and
    the run's key and training FLOPs (analysis.law_report leaves held-out runs out by key)."""
    f = final_losses(curve).merge(runs, on="run_key", suffixes=("", "_tag"))
    return pd.DataFrame(
        {
            "run_key": f["run_key"],
            "params": pd.to_numeric(f["acct.params_non_embedding"]).astype(float),
            "tokens": f["tokens"].astype(float),
            "loss": f["final_smooth"].astype(float),
            "granularity": pd.to_numeric(f["granularity"], errors="coerce").astype(float),
            "flops": pd.to_numeric(f["flops"], errors="coerce").astype(float),
        }
    )


def loss_curve_fits(curve: pd.DataFrame, runs: pd.DataFrame) -> tuple[dict[str, LawFit], pd.DataFrame]:
    """L(t) = E + A t^-alpha fitted to each run's smoothed val loss: the usable fits by run key (a degenerate
    one is listed, never drawn) and the table of every run's coefficients, error and degeneracy."""
    fits: dict[str, LawFit] = {}  # usable fits only: a degenerate one is listed, never drawn
    fit_rows = []
    for key, g in curve.groupby("run_key", sort=True):
        try:
            f = fit_loss_curve(g["step"], g["smooth"])
        except (ValueError, FitError) as e:
            fit_rows.append({"run_key": key, "error": str(e), "degenerate": ""})
            continue
        why = degenerate_reason(f)
        if not why:
            fits[key] = f
        fit_rows.append(
            {"run_key": key, **f.coefficients, "rmse_log": f.rmse_log, "error": "", "degenerate": why}
        )
    fit_table = pd.DataFrame(fit_rows).merge(runs[["run_key", "variant", "seed"]], on="run_key")
    return fits, fit_table


def summary_text(finals: pd.DataFrame, savings: pd.DataFrame, smoothing: Smoothing | None = None) -> str:
    """Plain-text summary: final losses (labelled as in report.md), with savings, t intervals, sign counts."""
    smoothing = smoothing or Smoothing()
    t = finals.copy()
    if not savings.empty:
        cols = [
            "model",
            "tokens",
            "variant",
            "status",
            "savings_steps",
            "ci_lo",
            "ci_hi",
            "n_positive",
            "n_not_reached",
            "savings_time",
        ]
        t = t.merge(savings[cols], on=["model", "tokens", "variant"], how="left")
    t = t.rename(columns=final_labels(smoothing))
    return t.to_string(index=False, float_format=lambda v: f"{v:.4g}")
