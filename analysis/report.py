"""Study report: load -> derive -> fit -> figures + report.md in <study dir>/report/.

    python -m analysis.report --study-dir DIR [--tracking-uri URI --study NAME] [--baseline VARIANT]
        [--best-lr | --no-best-lr]
    python -m analysis.report --from-curves REPORT_DIR --study-dir OUT   (recompute from curves.csv, runs.csv)

`studies.run` calls `write_report` at the end of a sweep (see studies/launch/finish.py).

Here: `write_report` (the pipeline, and the files it writes) and the CLI. The tables it computes:
analysis/report_tables.py; its figures: analysis/report_figures.py; the forecast against the finished runs:
analysis/forecast_compare.py; report.md's sections: analysis/report_md.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from analysis import cli
from analysis.checks import comparability_checks
from analysis.curves_io import load_curves, write_curves
from analysis.derive import FINAL_EVAL, LR, Smoothing, curves, run_finals, spiking_runs
from analysis.findings import FINDINGS_FILE, finding_sentences, read_findings
from analysis.forecast import FORECAST_FILE, read_forecast
from analysis.forecast_compare import write_forecast_comparison
from analysis.law_answers import answers_section
from analysis.law_report import LawSettings, law_report, laws_json, write_law_outputs
from analysis.laws import FitError, fit_chinchilla
from analysis.load import Study, check_tracking_server, load_study
from analysis.paired import paired_differences
from analysis.report_figures import write_figures
from analysis.report_md import fairness_sections, render, with_downstream
from analysis.report_tables import final_table, law_data, loss_curve_fits, summary_text
from analysis.savings import pick_baselines, savings_tables
from analysis.tuning import best_lr_runs, lr_tuning, use_best_lr, write_lr_pick
from records import runfiles

log = logging.getLogger(__name__)
PROG = "python -m analysis.report"
SAVINGS_CI = 0.9
"""Central mass of the Student t interval over seeds of the savings (steps and training time)."""
# Router stats normalised so a uniform router reads the same at every G (docs/outputs.md); per block for
# the first/last MoE layer plot (names of blocks a model lacks are simply absent).
ROUTER_STATS = ("top1_share_norm", "entropy_norm", "imbalance")
# Histories the report reads; per-layer router stats stay in MLflow (one query per run x key).
REPORT_METRICS = (
    "val/loss",
    "train/loss",
    "tokens",
    "flops",
    FINAL_EVAL,
    f"{FINAL_EVAL}_se",
    "time/train_s",
    *(f"router/{stat}" for stat in ROUTER_STATS),
    *(f"router/layer{i}/top1_share_norm" for i in range(128)),
)


def _try_law(fitter, data, needs: dict[str, int]):
    for col, k in needs.items():
        if data[col].nunique() < k:
            return None, f"needs >= {k} distinct {col} values, have {data[col].nunique()}"
    try:
        return fitter(data), ""
    except (ValueError, FitError) as e:
        return None, str(e)


def write_report(
    study_dir: Path,
    *,
    tracking_uri: str | None = None,
    study: str | None = None,
    baseline: str | None = None,
    parent_run_id: str | None = None,
    smoothing: Smoothing | None = None,
    n_boot: int = 1000,
    best_lr: bool | None = None,
    from_curves: Path | None = None,
    law_settings: LawSettings | None = None,
) -> Path:
    """Load the study, write study_dir/report/report.md and PNGs, log them on parent_run_id, print a table.

    n_boot: no longer used (savings intervals are Student t over seeds, issue 23); kept so that existing
    calls and `--n-boot` still run.
    best_lr: compare each variant at its own best `optim.lr` (savings, final and paired tables use only
    those runs). None = on when some variant has several LRs; True refuses a variant with one LR; False
    refuses a variant with several (runs at different LRs are not seeds). See analysis/tuning.py.
    from_curves: read the study from a report folder's curves.csv and runs.csv (analysis/curves_io.py).
    law_settings: how the answers' laws are fitted (analysis/law_report.py; bootstrap 100 by default).
    """
    study_dir = Path(study_dir)
    smoothing = smoothing or Smoothing()
    s: Study = (
        load_curves(from_curves)
        if from_curves is not None
        else load_study(study_dir, tracking_uri=tracking_uri, study=study, metrics=REPORT_METRICS)
    )
    if s.runs.empty:
        raise ValueError(
            f"study {s.name!r} at {s.source} has no finished point runs ({len(s.excluded)} excluded)"
        )
    if baseline is not None:
        pick_baselines(s.runs, baseline)  # an unknown --baseline fails before any fitting
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    curve = curves(s.metrics, s.runs, "val/loss", smoothing)
    per_run = run_finals(curve, s.runs, s.metrics)
    forecast, forecast_figs = write_forecast_comparison(out, per_run)  # every finished run, whatever its LR
    tuning = lr_tuning(per_run)
    at_best = use_best_lr(tuning, best_lr)  # refuses a mode that would mislead, before any fitting
    runs = best_lr_runs(s.runs, tuning) if at_best else s.runs
    per_run = per_run[per_run["run_key"].isin(runs["run_key"])]
    curve = curve[curve["run_key"].isin(runs["run_key"])]
    checks = comparability_checks(s.runs)
    finals = final_table(curve, runs)

    fits, fit_table = loss_curve_fits(curve, runs)

    try:
        tables = savings_tables(curve, runs, metrics=s.metrics, baseline=baseline, ci=SAVINGS_CI)
        savings, per_seed = tables.summary, tables.per_seed
        paired = paired_differences(per_run, pick_baselines(runs, baseline))
        paired_eval = paired_differences(per_run, pick_baselines(runs, baseline), column="final_eval")
        savings_note = ""
    except ValueError as e:
        if baseline is not None:
            raise
        savings, per_seed, paired, savings_note = pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), str(e)
        paired_eval = pd.DataFrame()

    data, flagged = law_data(curve, runs), spiking_runs(curve)  # a spiking run enters no fit
    laws = {
        "chinchilla": _try_law(
            fit_chinchilla, data[~data["run_key"].isin(flagged)], {"params": 2, "tokens": 2}
        )
    }
    fc = read_forecast(out / FORECAST_FILE) if (out / FORECAST_FILE).exists() else None
    lr = law_report(
        data,
        per_run,
        runs,
        baseline=baseline,
        savings=savings,
        forecast=fc,
        settings=law_settings,
        flagged=flagged,
    )
    laws["finegrained"] = (lr.finegrained.fit, lr.finegrained.reason)  # one fit: on the runs not held out

    findings = finding_sentences(
        savings, runs, checks=checks, tuning=tuning, at_best=at_best, ci=SAVINGS_CI, smoothing=smoothing
    )
    figures = write_figures(out, curve, s, fits, savings, data, laws) + forecast_figs
    figures += write_law_outputs(out, lr, data)
    fair = fairness_sections(checks, tuning, at_best, smoothing)
    sav = (savings, per_seed, savings_note)
    text = render(
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
        final_eval=(per_run, paired_eval),
        forecast=forecast,
        answers=answers_section(lr),
    )
    downstream = out / "downstream.md"  # written by `python -m studies.eval` (lm-evaluation-harness)
    if downstream.exists():
        text = with_downstream(text, downstream.read_text())
    report = out / "report.md"
    report.write_text(text)
    (out / FINDINGS_FILE).write_text("".join(f + "\n" for f in findings))
    finals.to_csv(out / "final_losses.csv", index=False)
    tuning.grid.to_csv(out / "lr_grid.csv", index=False)
    write_lr_pick(tuning, out)  # report/lr_pick.json: each variant's LR, or why none was picked
    if not savings.empty:
        savings.to_csv(out / "savings.csv", index=False)
    if not per_seed.empty:
        per_seed.to_csv(out / "savings_per_seed.csv", index=False)
    if not paired.empty:
        paired.to_csv(out / "paired.csv", index=False)
    if not paired_eval.empty and paired_eval["n_pairs"].any():
        paired_eval.to_csv(out / "paired_final_eval.csv", index=False)
    (out / "laws.json").write_text(
        json.dumps(
            {
                k: (
                    {"coefficients": f.coefficients, "objective": f.objective, "n_points": f.n_points}
                    if f
                    else {"error": err}
                )
                for k, (f, err) in laws.items()
            }
            | laws_json(lr),
            indent=2,
        )
    )
    write_curves(s, out, metrics=REPORT_METRICS)  # the raw curves behind every number above
    print(summary_text(finals, savings, smoothing))
    if parent_run_id:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"
        MlflowClient(uri).log_artifacts(parent_run_id, str(out), artifact_path="report")
    return report


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input (a flag, a run file) is one line on stderr and exit code 2 (analysis.cli)."""
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--study-dir", type=Path, required=True, help="study directory (report/ goes here)")
    p.add_argument(
        "--from-curves",
        type=Path,
        help="read curves.csv and runs.csv from this report folder "
        "instead of MLflow or run folders (report/ still goes under --study-dir)",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI; default: read study-dir/runs/*")
    p.add_argument("--study", help="study (experiment) name; default: the study directory's name")
    p.add_argument("--baseline", help="variant to measure savings against; default: granularity 1")
    p.add_argument("--parent-run-id", help="log the report as artifacts on this MLflow run")
    p.add_argument("--smoothing", choices=("loglinear", "ema", "median", "none"), default="loglinear")
    p.add_argument(
        "--window",
        type=cli.checked(int, lambda v: v >= 1, ">= 1"),
        default=5,
        help="smoothing window in logged points",
    )
    p.add_argument(
        "--n-boot",
        type=cli.checked(int, lambda v: v >= 0, ">= 0"),
        default=1000,
        help="ignored: savings intervals are Student t over seeds (kept for old commands)",
    )
    p.add_argument(
        "--best-lr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"compare each variant at its own best {LR} (default: when some variant has several LRs)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if a.from_curves is not None:
        if a.tracking_uri:
            return cli.fail(PROG, "--from-curves and --tracking-uri are exclusive: the curves are the study")
        if not a.from_curves.is_dir():
            return cli.fail(PROG, f"--from-curves {a.from_curves}: no such directory")
    elif a.tracking_uri:
        try:
            check_tracking_server(a.tracking_uri)
        except ValueError as e:
            return cli.fail(PROG, f"--tracking-uri {a.tracking_uri}: {e}")
    elif not a.study_dir.is_dir():
        return cli.fail(PROG, f"--study-dir {a.study_dir}: no such directory")
    elif not runfiles.run_dirs(a.study_dir):
        return cli.fail(
            PROG,
            f"--study-dir {a.study_dir}: no run folders in {runfiles.runs_dir(a.study_dir)} "
            "(not a study directory, or no point has started)",
        )
    try:
        path = write_report(
            a.study_dir,
            tracking_uri=a.tracking_uri,
            study=a.study,
            baseline=a.baseline,
            parent_run_id=a.parent_run_id,
            smoothing=Smoothing(method=a.smoothing, window=a.window),
            n_boot=a.n_boot,
            best_lr=a.best_lr,
            from_curves=a.from_curves,
        )
    except (ValueError, FitError) as e:  # RunFileError is a ValueError naming the file
        return cli.fail(PROG, e)
    print(f"report: {path}")
    print("\n".join(read_findings(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
