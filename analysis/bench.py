"""Benchmark of the scaling-law fits: the full published grid and 1,000 bootstrap refits.

    python -m analysis.bench [--csv PATH] [--bootstrap 1000] [--scipy-starts 45]

Targets (issue 5): full-grid Chinchilla fit <= 10 s, 1,000 bootstrap refits <= 60 s on 2 cores.
The naive baseline (one scipy L-BFGS-B call per start, analytic gradient) is timed on a slice of the
grid and scaled to the full grid, so the ratio is measured in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from analysis.laws import BESIROGLU_2024, CHINCHILLA, CHINCHILLA_GRID, fit_chinchilla, law_from_preset
from analysis.load import load_chinchilla_svg
from analysis.lse import make_objective, starts_matrix

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "chinchilla_svg_extracted.csv"


def _data(csv: Path):
    if csv.exists():
        return load_chinchilla_svg(csv), str(csv)
    # Without the shared data: 240 points from the replication's law with 2% log-normal noise.
    rng = np.random.default_rng(0)
    import pandas as pd

    df = pd.DataFrame(
        {"params": 10 ** rng.uniform(7.5, 10.5, 240), "tokens": 10 ** rng.uniform(9, 11.5, 240)}
    )
    df["loss"] = law_from_preset("besiroglu2024").predict(df) * np.exp(rng.normal(0, 0.02, 240))
    return df, "synthetic (shared data absent)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench", description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--scipy-starts", type=int, default=45, help="grid slice timed with the naive loop")
    a = p.parse_args(argv)
    df, source = _data(a.csv)
    print(f"data: {source}, {len(df)} points; grid: {len(starts_matrix(CHINCHILLA, CHINCHILLA_GRID))} starts")

    t, c = time.perf_counter(), time.process_time()
    fit = fit_chinchilla(df)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(
        f"full-grid fit: {wall:.2f} s wall, {cpu:.2f} s CPU  "
        f"({fit.n_converged}/{fit.n_starts} converged, objective {fit.objective:.6g})"
    )
    print("  " + ", ".join(f"{k}={v:.4g}" for k, v in fit.coefficients.items()))
    print("  Besiroglu et al. 2024: " + ", ".join(f"{k}={v:.4g}" for k, v in BESIROGLU_2024.items()))

    if a.bootstrap:
        t = time.perf_counter()
        b = fit_chinchilla(df, bootstrap=a.bootstrap)
        bwall = time.perf_counter() - t - wall  # minus the full fit it starts from
        print(f"{a.bootstrap} bootstrap refits: ~{bwall:.2f} s wall (beyond the full fit)")
        print(
            "  80% intervals: "
            + ", ".join(f"{k}=[{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in b.intervals.items())
        )

    if a.scipy_starts:
        logx = np.log(df[["params", "tokens"]].to_numpy())
        fun = make_objective(
            CHINCHILLA,
            logx,
            np.log(df["loss"].to_numpy()),
            np.ones((1, len(df))),
            1e-3,
            np.zeros(1, dtype=np.int64),
        )

        def one(th):
            f, g = fun(th[None], np.zeros(1, dtype=np.int64))
            return f[0], g[0]

        x0 = starts_matrix(CHINCHILLA, CHINCHILLA_GRID)
        pick = np.linspace(0, len(x0) - 1, a.scipy_starts).astype(int)
        t = time.perf_counter()
        for i in pick:
            minimize(one, x0[i], jac=True, method="L-BFGS-B")
        naive = (time.perf_counter() - t) / len(pick) * len(x0)
        print(
            f"naive scipy loop (analytic gradient), scaled to the full grid: ~{naive:.0f} s "
            f"-> batched is {naive / wall:.0f}x faster"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
