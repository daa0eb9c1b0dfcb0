"""The report's figures from its curves, savings and fits: loss curves, step savings, router statistics
and one figure per fitted law (the forecast's and the answers' figures: analysis/forecast_compare.py,
analysis/law_report.py).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from analysis import plots


def write_figures(out, curve, s, fits, savings, data, laws) -> list[str]:
    """Write loss_curves.png, savings.png (with savings), router.png and law_<name>.png (per usable law)
    into out; return their names in that order."""
    names = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, x in zip(axes, ("step", "tokens", "flops"), strict=True):
        plots.plot_loss_curves(ax, curve, s.runs, x=x, fits=fits, title=f"{s.name}: val loss vs {x}")
    plots.save(fig, out / "loss_curves.png")
    names.append("loss_curves.png")
    if not savings.empty:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        plots.plot_savings(ax, savings, title="step savings vs baseline")
        plots.save(fig, out / "savings.png")
        names.append("savings.png")
    layers = sorted(
        {int(m.split("/")[1][5:]) for m in s.metrics["metric"].unique() if m.startswith("router/layer")}
    )
    ends = [layers[0], layers[-1]] if len(layers) > 1 else layers
    fig, axes = plt.subplots(1, 2 + len(ends), figsize=(5.5 * (2 + len(ends)), 4.2))
    for ax, i in zip(axes, ends, strict=False):
        plots.plot_router(
            ax,
            s.metrics,
            s.runs,
            stat=f"layer{i}/top1_share_norm",
            title=f"block {i}: top-1 share (0 even over k*G, 1 one expert)",
        )
    plots.plot_router(axes[-2], s.metrics, s.runs, stat="entropy_norm", title="routing entropy / ln(E*G)")
    plots.plot_router(axes[-1], s.metrics, s.runs, stat="imbalance", title="load imbalance before dropping")
    plots.save(fig, out / "router.png")
    names.append("router.png")
    for name, (fit, _) in laws.items():
        if fit is not None:
            fig, ax = plt.subplots(figsize=(6, 4.2))
            plots.plot_law(ax, data if name == "chinchilla" else data.dropna(subset=["granularity"]), fit)
            plots.save(fig, out / f"law_{name}.png")
            names.append(f"law_{name}.png")
    return names
