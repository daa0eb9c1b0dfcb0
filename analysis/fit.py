"""CLI: fit a scaling law to a CSV and print its coefficients (the fits themselves live in analysis.laws).

    python -m analysis.fit FILE.csv [--law chinchilla|finegrained] [--json] [--bootstrap N]

The CSV has columns params, tokens, loss (and granularity for the fine-grained law). Bad input (a flag
out of range, an unreadable CSV, data that cannot identify the law) is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from analysis import cli
from analysis.laws import FitError, fit_chinchilla, fit_finegrained
from analysis.load import load_scaling_csv

FITTERS = {"chinchilla": fit_chinchilla, "finegrained": fit_finegrained}
PROG = "python -m analysis.fit"


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("csv", help="CSV with params,tokens,loss[,granularity]")
    p.add_argument("--law", choices=sorted(FITTERS), default="chinchilla")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument(
        "--bootstrap",
        type=cli.checked(int, lambda v: v >= 0, ">= 0"),
        default=0,
        help="bootstrap replicates for intervals (0: none)",
    )
    p.add_argument(
        "--ci",
        type=cli.checked(float, lambda v: 0 < v < 1, "in (0, 1)"),
        default=0.8,
        help="central interval mass (0.8: 10th-90th pct)",
    )
    p.add_argument(
        "--delta",
        type=cli.checked(float, lambda v: v > 0, "> 0"),
        default=1e-3,
        help="Huber delta on log loss",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        data = load_scaling_csv(a.csv)
        fit = FITTERS[a.law](data, bootstrap=a.bootstrap, ci=a.ci, delta=a.delta)
    except (ValueError, OSError, FitError) as e:
        return cli.fail(PROG, e)
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
