"""A forecast on record against the held-out runs that have since finished (analysis/forecast.py makes it).

Here: the observed loss per run, the comparison table and its summary sentences, and what the report
writes from them (forecast_vs_observed.csv, forecast.png and report.md's forecast section).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import plots
from analysis.forecast import (
    FORECAST_FILE,
    TARGET_COLUMNS,
    Forecast,
    need_columns,
    read_forecast,
    repeated_keys,
)
from analysis.report_md import forecast_section

COMPARE_COLUMNS = (
    *TARGET_COLUMNS,
    "predicted",
    "lo",
    "hi",
    "observed",
    "abs_err",
    "rel_err",
    "inside",
    "status",
)
CLOSE_REL_ERR = 0.01
"""The summary counts held-out points whose |relative error| is at most this."""


def observed_losses(per_run: pd.DataFrame) -> pd.DataFrame:
    """run_key, loss per finished run from analysis.derive.run_finals: the many-window final evaluation
    (final_eval) where logged, else the final smoothed val loss."""
    loss = per_run["final_smooth"].astype(float)
    if "final_eval" in per_run:
        loss = per_run["final_eval"].astype(float).fillna(loss)
    return pd.DataFrame({"run_key": per_run["run_key"], "loss": loss})


def compare(forecast: Forecast, observed: pd.DataFrame) -> pd.DataFrame:
    """One row per forecast row with its observed loss (NaN when the run has not finished), abs_err,
    rel_err = (predicted - observed) / observed, inside (NA when not finished) and status."""
    need_columns(observed, ("run_key", "loss"), "observed")
    if observed["run_key"].duplicated().any():
        raise ValueError(f"observed repeats run keys: {repeated_keys(observed['run_key'])}")
    loss = observed.set_index("run_key")["loss"].astype(float)
    t = pd.DataFrame([asdict(r) for r in forecast.rows])
    t["observed"] = t["run_key"].map(loss).astype(float)
    done = t["observed"].notna().to_numpy()
    bad = t[done & ~(np.isfinite(t["observed"]) & (t["observed"] > 0))]
    if len(bad):
        got = dict(zip(bad["run_key"], bad["observed"], strict=True))
        raise ValueError(f"observed loss must be finite and > 0 (NaN: not finished); got {got}")
    t["abs_err"] = (t["predicted"] - t["observed"]).abs()
    t["rel_err"] = (t["predicted"] - t["observed"]) / t["observed"]
    inside = (t["lo"] <= t["observed"]) & (t["observed"] <= t["hi"])
    t["inside"] = pd.array(np.where(done, inside, pd.NA), dtype="boolean")
    t["status"] = np.where(done, "compared", "not finished")
    return t[list(COMPARE_COLUMNS)]


def forecast_summary(table: pd.DataFrame) -> list[str]:
    """Plain sentences on a `compare` table: how many finished, within 1%, inside their interval, the
    largest error; and which held-out points never finished (they are never compared)."""
    done = table[table["status"] == "compared"]
    missing = table[table["status"] != "compared"]
    n, k = len(table), len(done)
    if k == 0:
        lines = [f"None of the {n} held-out points has finished: nothing to compare yet."]
    else:
        err = done["rel_err"].abs()
        worst = done.loc[err.idxmax()]
        lines = [
            f"{k} of {n} held-out points finished and are compared with their forecast.",
            f"{int((err <= CLOSE_REL_ERR).sum())} of {k} are within {CLOSE_REL_ERR:.0%} relative error.",
            f"{int(done['inside'].sum())} of {k} are inside their forecast interval.",
            f"The largest |relative error| is {err.max():.2%} ({worst['run_key']}, model {worst['model']}: "
            f"predicted {worst['predicted']:.4g}, observed {worst['observed']:.4g}).",
        ]
    if len(missing):
        lines.append(f"{len(missing)} held-out points never finished: {', '.join(missing['run_key'])}.")
    return lines


def write_forecast_comparison(out: Path, per_run: pd.DataFrame) -> tuple[list[str], list[str]]:
    """With out/forecast.json (written by the sweep before the held-out runs trained): compare it with
    the finished runs, write forecast_vs_observed.csv and forecast.png; return the section and figure."""
    path = out / FORECAST_FILE
    if not path.exists():
        return [], []
    forecast = read_forecast(path)
    table = compare(forecast, observed_losses(per_run))
    table.to_csv(out / "forecast_vs_observed.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    plots.plot_forecast(ax, table)
    plots.save(fig, out / "forecast.png")
    return forecast_section(forecast, table, forecast_summary(table)), ["forecast.png"]
