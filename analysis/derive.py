"""Derived quantities: smoothed curves, tokens and FLOPs per step, final losses per run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

SmoothMethod = Literal["loglinear", "ema", "median", "none"]
BATCH_TOKENS = "acct.batch_tokens"
FLOPS_PER_TOKEN = "acct.flops_per_token_train"


@dataclass(frozen=True)
class Smoothing:
    """How noisy curves are smoothed before they are compared."""

    method: SmoothMethod = "loglinear"
    """loglinear (trailing least-squares line in log-step, read at the newest point), ema (debiased
    exponential average), median (trailing rolling median) or none. EMA and median lag a falling curve
    by a fixed number of points, which biases step savings (a later point is compared with an earlier
    one); the trailing line has no lag on locally log-linear curves and still uses no future points."""
    ema: float = 0.6
    """EMA weight kept from the previous smoothed value, in [0, 1)."""
    window: int = 5
    """Trailing window of the rolling median, in logged points."""

    def __post_init__(self):
        if self.method not in ("loglinear", "ema", "median", "none"):
            raise ValueError(f"smoothing.method={self.method!r} must be one of loglinear, ema, median, none")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"smoothing.ema={self.ema} must be in [0, 1)")
        if self.window < 1:
            raise ValueError(f"smoothing.window={self.window} must be >= 1")

    def describe(self) -> str:
        """How, in a few words, for labels: "trailing log-linear fit over 5 evals"."""
        return {
            "loglinear": f"trailing log-linear fit over {self.window} evals",
            "ema": f"debiased EMA {self.ema:g}",
            "median": f"trailing median of {self.window} evals",
            "none": "none",
        }[self.method]


RAW_LABEL = "final val loss (raw)"
"""The last logged val/loss of a run: summary.json's final["val/loss"], MLflow's last val/loss."""


def smoothed_label(smoothing: Smoothing) -> str:
    """The label of the final smoothed val loss, which step savings and the paired differences use."""
    return f"final val loss (smoothed, {smoothing.describe()})"


def final_smoothed(steps, values, smoothing: Smoothing = Smoothing()) -> float:
    """The last point of the smoothed curve: a run's "final val loss (smoothed, ...)"."""
    if len(values) == 0:
        raise ValueError("no values to smooth: the run logged no val/loss")
    return float(smooth(values, smoothing, steps)[-1])


def smooth(values, smoothing: Smoothing = Smoothing(), steps=None) -> np.ndarray:
    """Smooth a curve using only past points (trailing), so the last value is not pulled by the future.

    `steps` (the x of each value) is needed by loglinear; default 1, 2, ...
    """
    v = np.asarray(values, dtype=np.float64)
    if smoothing.method == "none" or v.size == 0:
        return v.copy()
    if smoothing.method == "loglinear":
        x = np.log(np.arange(1, v.size + 1) if steps is None else np.asarray(steps, dtype=np.float64))
        return _trailing_line(x, v, smoothing.window)
    if smoothing.method == "median":
        return pd.Series(v).rolling(smoothing.window, min_periods=1).median().to_numpy()
    # Debiased EMA (as TensorBoard): divide by 1 - ema^n so early points are not pulled toward 0.
    out = np.empty_like(v)
    acc, norm = 0.0, 0.0
    for i, x in enumerate(v):
        acc = smoothing.ema * acc + (1 - smoothing.ema) * x
        norm = smoothing.ema * norm + (1 - smoothing.ema)
        out[i] = acc / norm
    return out


def _trailing_line(x, v, window):
    out = np.empty_like(v)
    for i in range(v.size):
        lo = max(0, i - window + 1)
        xs, ys = x[lo : i + 1], v[lo : i + 1]
        if xs.size < 2 or np.ptp(xs) == 0:  # no line through one point: its value
            out[i] = ys.mean()
            continue
        slope = np.polyfit(xs, ys, 1)[0]
        out[i] = ys.mean() + slope * (x[i] - xs.mean())
    return out


def per_step_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Tokens and FLOPs per optimiser step for each run, from the accounting params."""
    for col in (BATCH_TOKENS, FLOPS_PER_TOKEN):
        if col not in runs:
            raise ValueError(f"runs lack param {col!r}, needed for tokens and FLOPs per step")
    out = pd.DataFrame(
        {"run_key": runs["run_key"], "tokens_per_step": pd.to_numeric(runs[BATCH_TOKENS]).astype(float)}
    )
    out["flops_per_step"] = out["tokens_per_step"] * pd.to_numeric(runs[FLOPS_PER_TOKEN]).astype(float)
    return out


def curves(
    metrics: pd.DataFrame, runs: pd.DataFrame, metric: str = "val/loss", smoothing: Smoothing = Smoothing()
) -> pd.DataFrame:
    """One row per run x step of `metric`: raw value, smoothed value, tokens and FLOPs at that step."""
    m = metrics[metrics["metric"] == metric]
    if m.empty:
        raise ValueError(f"no {metric!r} values in the loaded metrics")
    parts = []
    for key, g in m.sort_values("step").groupby("run_key", sort=False):
        g = g.drop_duplicates("step", keep="last")
        parts.append(
            pd.DataFrame(
                {
                    "run_key": key,
                    "step": g["step"].to_numpy(),
                    "value": g["value"].to_numpy(),
                    "smooth": smooth(g["value"].to_numpy(), smoothing, g["step"].to_numpy()),
                }
            )
        )
    out = pd.concat(parts, ignore_index=True).merge(per_step_rates(runs), on="run_key", how="inner")
    out["tokens"] = out["step"] * out.pop("tokens_per_step")
    out["flops"] = out["step"] * out.pop("flops_per_step")
    return out


SPIKE_RISE = 0.5
"""Nats a run's val loss may rise above its lowest earlier value before the run counts as spiking: far
above eval noise (SE ~0.01) and the last evals' wobble, far below a real loss spike or divergence."""


def worst_rise(values) -> float:
    """The largest rise of a loss series above its lowest earlier value (0 for a series that never rises)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return 0.0
    return float(max(0.0, np.max(v[1:] - np.minimum.accumulate(v)[:-1])))


def spiking_runs(curve: pd.DataFrame, rise: float = SPIKE_RISE) -> dict[str, str]:
    """Runs of a `curves` table whose raw val loss rose more than `rise` above its lowest earlier value:
    {run key: why}. Such a run enters no law fit (analysis.law_report, studies.launch.holdout)."""
    out = {}
    for key, g in curve.sort_values("step").groupby("run_key"):
        if (r := worst_rise(g["value"])) > rise:
            out[str(key)] = f"val loss rose {r:.2f} above its earlier minimum (> {rise:g})"
    return out


def final_losses(curve: pd.DataFrame) -> pd.DataFrame:
    """Last raw and smoothed value (and its step) per run."""
    last = curve.sort_values("step").groupby("run_key", sort=False).tail(1)
    return (
        last[["run_key", "step", "value", "smooth", "tokens", "flops"]]
        .rename(columns={"value": "final", "smooth": "final_smooth"})
        .reset_index(drop=True)
    )


LR = "optim.lr"
"""The learning-rate param: runs of one variant at different values are points of an LR grid, not seeds."""


FINAL_EVAL = "val/loss_final"
"""The extra evaluation after a run's last step on many windows (train.final_eval_tokens), and its
window-level standard error `val/loss_final_se`."""


def run_finals(curve: pd.DataFrame, runs: pd.DataFrame, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """Final smoothed loss per run with what identifies it: run_key, model, tokens (the budget tag),
    variant, seed, lr (`optim.lr`, NaN where not logged) and final_smooth; with `metrics` (Study.metrics)
    also final_eval and final_eval_se, the run's FINAL_EVAL and its standard error (NaN where not logged)."""
    tags = runs[["run_key", "model", "tokens", "variant", "seed"]].copy()
    tags["lr"] = pd.to_numeric(runs[LR], errors="coerce") if LR in runs else np.nan
    f = final_losses(curve)[["run_key", "final_smooth"]]
    out = tags.merge(f, on="run_key", how="inner").reset_index(drop=True)
    for name, metric in (("final_eval", FINAL_EVAL), ("final_eval_se", f"{FINAL_EVAL}_se")):
        logged = pd.Series(dtype=float)
        if metrics is not None and not metrics.empty:
            m = metrics[metrics["metric"] == metric].sort_values("step")
            logged = m.groupby("run_key")["value"].last()
        out[name] = out["run_key"].map(logged).astype(float)
    return out
