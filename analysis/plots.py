"""Figures. Every function draws on a given axis from data and fit results; none of them fits."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.curves import is_degenerate  # noqa: E402
from analysis.laws import LawFit  # noqa: E402

X_LABELS = {"step": "optimiser step", "tokens": "training tokens", "flops": "training FLOPs"}


def _colors(labels):
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(sorted(labels))}


def plot_loss_curves(
    ax,
    curve: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    x: str = "step",
    fits: dict[str, LawFit] | None = None,
    title: str = "",
):
    """Smoothed validation loss per run vs step/tokens/FLOPs, coloured by variant; fitted curves dashed
    (a degenerate fit, analysis.curves.is_degenerate, is not drawn: it says nothing about the curve)."""
    if x not in X_LABELS:
        raise ValueError(f"x={x!r} must be one of {sorted(X_LABELS)}")
    variant = runs.set_index("run_key")["variant"]
    colors = _colors(variant.unique())
    seen = set()
    for key, g in curve.groupby("run_key", sort=True):
        v = variant.get(key)
        ax.plot(g[x], g["smooth"], color=colors.get(v), lw=1.2, label=None if v in seen else v)
        seen.add(v)
        if fits and key in fits and not is_degenerate(fits[key]):
            steps = np.geomspace(max(g["step"].min(), 1), g["step"].max(), 100)
            scale = (g[x] / g["step"]).iloc[-1]  # tokens or FLOPs per step (1 for steps)
            ax.plot(steps * scale, fits[key].predict({"step": steps}), color=colors.get(v), ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("validation loss (smoothed)")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_savings(ax, savings: pd.DataFrame, *, column: str = "savings_steps", title: str = ""):
    """Savings vs token budget per variant, with t intervals over seeds; hollow markers: some seed
    extrapolated. Variants whose savings are not a number (not reached, not measured) are left out."""
    savings = savings[np.isfinite(savings[column].to_numpy(dtype=float))]
    if savings.empty:
        # Every variant lacked a usable curve (e.g. too few evaluations): say so instead of a broken log axis.
        ax.text(0.5, 0.5, f"no finite {column}", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    colors = _colors(savings["variant"].unique())
    for v, g in savings.sort_values("tokens").groupby("variant", sort=True):
        y = g[column].to_numpy(dtype=float)
        lo = np.where(np.isfinite(g["ci_lo"]), y - g["ci_lo"], 0.0)
        hi = np.where(np.isfinite(g["ci_hi"]), g["ci_hi"] - y, 0.0)
        ax.errorbar(
            g["tokens"],
            y,
            yerr=[np.maximum(lo, 0), np.maximum(hi, 0)],
            color=colors[v],
            marker="o",
            capsize=3,
            label=v,
            mfc="none" if g["extrapolated"].any() else colors[v],
        )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("token budget")
    ax.set_ylabel(column.replace("_", " ") + " vs baseline")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_router(ax, metrics: pd.DataFrame, runs: pd.DataFrame, *, stat: str = "top1_mass", title: str = ""):
    """A router statistic (averaged over layers) over training, per run, coloured by variant."""
    key = f"router/{stat}"
    m = metrics[metrics["metric"] == key]
    if m.empty:
        ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        return
    variant = runs.set_index("run_key")["variant"]
    colors = _colors(variant.unique())
    seen = set()
    for k, g in m.sort_values("step").groupby("run_key", sort=True):
        v = variant.get(k)
        ax.plot(g["step"], g["value"], color=colors.get(v), lw=1.0, label=None if v in seen else v)
        seen.add(v)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_law(ax, data: pd.DataFrame, fit: LawFit, *, title: str = ""):
    """Loss vs tokens for each model size: data points and the law's prediction."""
    colors = _colors(data["params"].unique())
    for n, g in data.groupby("params", sort=True):
        g = g.sort_values("tokens")
        ax.scatter(g["tokens"], g["loss"], color=colors[n], s=12)
        grid = {"params": np.full(50, n), "tokens": np.geomspace(g["tokens"].min(), g["tokens"].max(), 50)}
        if "granularity" in fit.spec.covariates:
            for G in sorted(g["granularity"].unique()):
                grid["granularity"] = np.full(50, G)
                ax.plot(grid["tokens"], fit.predict(grid), color=colors[n], lw=0.8)
        else:
            ax.plot(grid["tokens"], fit.predict(grid), color=colors[n], lw=0.8, label=f"N={n:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    coefs = ", ".join(f"{k}={v:.3g}" for k, v in fit.coefficients.items())
    ax.set_title(title or f"{fit.law}: {coefs}", fontsize=8)


def plot_law_by_granularity(axes, data: pd.DataFrame, fit: LawFit | None):
    """Observed final loss vs tokens, one axis per G (increasing), one colour per model size; lines: the
    fine-grained law's prediction per size (dashed for a size only held-out runs have; none without a
    fit); held-out runs as hollow diamonds."""
    gs = sorted(data["granularity"].unique())
    if len(axes) != len(gs):
        raise ValueError(f"plot_law_by_granularity: {len(axes)} axes for {len(gs)} granularities")
    colors = _colors(data["params"].unique())
    tokens = np.geomspace(data["tokens"].min() / 1.5, data["tokens"].max() * 1.5, 50)
    for ax, G in zip(axes, gs, strict=True):
        for n, g in data[data["granularity"] == G].groupby("params", sort=True):
            held = g["held_out"].astype(bool)
            if (~held).any():
                ax.scatter(
                    g.loc[~held, "tokens"], g.loc[~held, "loss"], color=colors[n], s=14, label=f"N={n:.3g}"
                )
            if held.any():
                ax.scatter(
                    g.loc[held, "tokens"],
                    g.loc[held, "loss"],
                    marker="D",
                    s=30,
                    facecolors="none",
                    edgecolors=colors[n],
                    label=f"N={n:.3g} held out",
                )
            if fit is not None:
                grid = {"params": np.full(50, n), "tokens": tokens, "granularity": np.full(50, G)}
                ax.plot(tokens, fit.predict(grid), color=colors[n], lw=0.9, ls="--" if held.all() else "-")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(f"G={G:g}" + ("" if fit is not None else " (no fine-grained fit)"), fontsize=9)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("final val loss (smoothed)")


def plot_forecast(ax, table: pd.DataFrame, *, title: str = "") -> None:
    """Predicted loss with its interval against the observed loss, one colour per G; the diagonal is a
    perfect forecast. Points not finished have no observed loss and are left out (the title counts them).
    table: analysis.forecast_compare.compare's."""
    done = table[table["status"] == "compared"]
    missing = len(table) - len(done)
    title = title or "forecast vs observed final loss" + (f" ({missing} not finished)" if missing else "")
    if done.empty:
        ax.text(0.5, 0.5, "no held-out run has finished", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    colors = _colors(done["granularity"].unique())
    for G, g in done.groupby("granularity", sort=True):
        yerr = [g["predicted"] - g["lo"], g["hi"] - g["predicted"]]
        ax.errorbar(
            g["observed"],
            g["predicted"],
            yerr=yerr,
            color=colors[G],
            marker="o",
            ls="none",
            capsize=3,
            label=f"G={G:g}",
        )
    ends = [min(done["observed"].min(), done["lo"].min()), max(done["observed"].max(), done["hi"].max())]
    ax.plot(ends, ends, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("observed final loss")
    ax.set_ylabel("forecast (interval)")
    ax.set_title(title)
    ax.legend(fontsize=7)


def save(fig, path) -> None:
    """Write a PNG and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
