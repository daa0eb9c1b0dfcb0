"""Fit a scaling law to a CSV and print its coefficients.

    python -m analysis.fit FILE.csv [--law chinchilla|finegrained] [--json] [--bootstrap N]

The CSV has columns params, tokens, loss (and granularity for the fine-grained law).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from analysis.laws import fit_chinchilla, fit_finegrained
from analysis.load import load_scaling_csv

FITTERS = {"chinchilla": fit_chinchilla, "finegrained": fit_finegrained}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.fit", description=__doc__.splitlines()[0])
    p.add_argument("csv", help="CSV with params,tokens,loss[,granularity]")
    p.add_argument("--law", choices=sorted(FITTERS), default="chinchilla")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for intervals")
    p.add_argument("--ci", type=float, default=0.8, help="central interval mass (0.8: 10th-90th pct)")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log loss")
    a = p.parse_args(argv)
    try:
        data = load_scaling_csv(a.csv)
        fit = FITTERS[a.law](data, bootstrap=a.bootstrap, ci=a.ci, delta=a.delta)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(dataclasses.asdict(fit), indent=2))
        return 0
    print(
        f"{fit.law} law on {fit.n_points} points ({fit.n_converged}/{fit.n_starts} starts converged), "
        f"objective {fit.objective:.6g}, rmse(log) {fit.rmse_log:.4g}"
    )
    for k, v in fit.coefficients.items():
        ci = fit.intervals.get(k)
        print(f"  {k:>6} = {v:.6g}" + (f"   [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
