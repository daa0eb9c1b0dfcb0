"""Downstream accuracy with lm-evaluation-harness, on one exported model or every DONE point of a study.

    python -m studies.eval outputs/<study> --tasks hellaswag,arc_easy [--include-path DIR] [--limit N]
    python -m studies.eval path/to/exported_model --tasks piqa

A study: each DONE point is exported (studies.export) to `<run dir>/hf/` unless it is there already,
evaluated with lm-eval's `hf` model on CPU or GPU, and its accuracies are logged to the point's MLflow
run as `downstream/<task>/acc` (and `acc_norm` where the task has it) plus `downstream/avg_acc` (mean
acc over the tasks), written to `<run dir>/downstream.json`, and summarised in
`<study>/report/downstream.md`: one row per point and the G=1 vs G=8 comparison of average accuracy
(as arXiv 2506.02890 reports). lm-eval caches model answers in `<study>/lm_eval_cache/` (its
`use_cache` sqlite store), so a second call re-scores without running the models again; data sets come
through lm-eval's own loading (`datasets`: set HF_DATASETS_OFFLINE=1 on a machine without network).
Needs the `hf` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from records import runfiles
from studies.export import export_run, read_finished_run
from studies.track import tracking

METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class PointScores:
    run_key: str
    variant: str
    granularity: str
    scores: dict[str, float]
    """downstream/<task>/<metric> and downstream/avg_acc."""


def evaluate_model(
    model_dir: Path,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    cache: Path | None = None,
    cache_key: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, float]:
    """lm-eval's scores of a transformers model directory: {downstream/<task>/<metric>, downstream/avg_acc}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"--tasks: lm-eval knows no task {unknown} (see `lm_eval ls tasks`, or --include-path)"
        )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=tasks,
        task_manager=manager,
        device=device,
        batch_size=batch_size,
        limit=limit,
        # one answer store per model: a store shared by two models answers the second from the first
        use_cache=str(cache / (cache_key or Path(model_dir).name)) if cache is not None else None,
        log_samples=False,
    )
    scores: dict[str, float] = {}
    for task in tasks:
        row = results["results"][task]
        for metric in METRICS:
            if f"{metric},none" in row:
                scores[f"downstream/{task}/{metric}"] = float(row[f"{metric},none"])
    accs = [scores[f"downstream/{t}/acc"] for t in tasks if f"downstream/{t}/acc" in scores]
    if accs:
        scores["downstream/avg_acc"] = sum(accs) / len(accs)
    return scores


def _log_to_mlflow(study_dir: Path, run_dir: Path, uri: str | None, scores: dict[str, float]) -> str | None:
    """Log `scores` to the point's MLflow run (summary.json's mlflow_run_id); returns the run id."""
    summary = runfiles.read_summary(run_dir) or {}
    run_id = summary.get("mlflow_run_id") or runfiles.read_run_id(run_dir)
    if not run_id:
        return None
    client = tracking.open_client(uri or tracking.default_tracking_uri(study_dir))
    for key, value in scores.items():
        client.log_metric(run_id, key, value, step=int(summary.get("steps", 0) or 0))
    return run_id


def evaluate_study(
    study_dir: Path,
    tasks: list[str],
    *,
    allow_earlier_checkpoint: bool = False,
    **kw,
) -> list[PointScores]:
    """Export (if needed) and evaluate every DONE point of `study_dir`; log and report the scores."""
    study_dir = Path(study_dir)
    done = [
        d for d in runfiles.run_dirs(study_dir) if (runfiles.read_status(d) or {}).get("status") == "DONE"
    ]
    if not done:
        raise ValueError(f"{study_dir} has no DONE point under runs/ (nothing to evaluate)")
    out = []
    for run_dir in done:
        fin = read_finished_run(run_dir)
        model_dir = run_dir / "hf"
        if not (model_dir / "export.json").is_file():
            export_run(run_dir, model_dir, overwrite=True, allow_earlier_checkpoint=allow_earlier_checkpoint)
        scores = evaluate_model(
            model_dir, tasks, cache=study_dir / "lm_eval_cache", cache_key=run_dir.name, **kw
        )
        runfiles.write_json(run_dir / "downstream.json", {"tasks": tasks, "scores": scores})
        _log_to_mlflow(study_dir, run_dir, fin.run.tracking.uri, scores)
        m = fin.model.moe
        variant = fin.summary.get("variant") or run_dir.name
        out.append(PointScores(run_dir.name, variant, str(m.granularity) if m else "dense", scores))
    write_report(study_dir, tasks, out)
    return out


def write_report(study_dir: Path, tasks: list[str], points: list[PointScores]) -> Path:
    """<study>/report/downstream.md: accuracies per point and mean average accuracy per granularity."""
    cols = [f"downstream/{t}/acc" for t in tasks]
    lines = [
        "# Downstream accuracy (lm-evaluation-harness)",
        "",
        "| run | variant | G | " + " | ".join(tasks) + " | avg acc |",
        "|---|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for p in sorted(points, key=lambda p: (p.granularity, p.variant, p.run_key)):
        cells = [f"{p.scores[c]:.4f}" if c in p.scores else "-" for c in cols]
        avg = p.scores.get("downstream/avg_acc")
        cells.append(f"{avg:.4f}" if avg is not None else "-")
        lines.append(f"| {p.run_key} | {p.variant} | {p.granularity} | " + " | ".join(cells) + " |")
    by_g: dict[str, list[float]] = {}
    for p in points:
        if "downstream/avg_acc" in p.scores:
            by_g.setdefault(p.granularity, []).append(p.scores["downstream/avg_acc"])
    lines += ["", "| G | points | mean avg acc |", "|---|---|---|"]
    for g, accs in sorted(
        by_g.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)
    ):
        lines.append(f"| {g} | {len(accs)} | {sum(accs) / len(accs):.4f} |")
    if "1" in by_g and "8" in by_g:
        g1, g8 = (sum(by_g[g]) / len(by_g[g]) for g in ("1", "8"))
        lines += ["", f"G=8 vs G=1 average accuracy: {g8:.4f} vs {g1:.4f} ({g8 - g1:+.4f})"]
    path = study_dir / "report" / "downstream.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    report = path.parent / "report.md"
    if report.exists():  # the study's report shows the accuracies too (analysis regenerates it the same way)
        from analysis.report_md import with_downstream

        report.write_text(with_downstream(report.read_text(), path.read_text()))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="a study dir (outputs/<study>) or an exported model dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", type=Path, help="folder of extra lm-eval task YAML files")
    parser.add_argument("--limit", type=int, help="documents per task (quick checks)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--allow-earlier-checkpoint", action="store_true", help="see studies.export")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    kw = {
        "include_path": args.include_path,
        "limit": args.limit,
        "device": args.device,
        "batch_size": args.batch_size,
    }
    try:
        if (args.target / "config.json").is_file():
            scores = evaluate_model(args.target, tasks, cache=args.target.parent / "lm_eval_cache", **kw)
            print(json.dumps(scores, indent=2))
        elif (args.target / "runs").is_dir():
            for p in evaluate_study(
                args.target, tasks, allow_earlier_checkpoint=args.allow_earlier_checkpoint, **kw
            ):
                print(f"{p.run_key} {p.variant}: avg acc {p.scores.get('downstream/avg_acc')}")
            print(f"report: {args.target / 'report' / 'downstream.md'}")
        else:
            raise ValueError(f"{args.target} is neither an exported model (config.json) nor a study (runs/)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
