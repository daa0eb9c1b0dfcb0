"""The Hydra callback around every invocation of `python -m studies.run` (conf/config.yaml).

    on_run_start        a single run: validate the point (studies.sweep) before Hydra writes anything
    on_multirun_start   validate every point, print what each will do; nothing to start: say so and
                        stop (no parent run, no sweep folder); else claim a fresh sweep folder and open
                        the sweep's MLflow parent run
    on_multirun_end     the sweep's table, the MLflow hint, the analysis report, non-zero exit on failure

Hydra turns exceptions raised in callbacks into warnings and exits 0; a refused or failed sweep must
exit non-zero, so these print the reason and raise SystemExit, which Hydra does not catch.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from studies import lifecycle, runfiles, tracking
from studies.execute import complete_done_record
from studies.point import Point
from studies.sweep import jobs_of, validate_jobs, varying

PARENT_ENV = "MOE_PARENT_RUN_ID"  # inherited by submitit's local jobs and exported to SLURM jobs


def study_dir_of(config: DictConfig, cwd: Path | None = None) -> Path:
    return Path(cwd or os.getcwd()) / config.paths.root / config.study.name


def tracking_uri_of(config: DictConfig, cwd: Path | None = None) -> str:
    return config.tracking.uri or tracking.default_tracking_uri(study_dir_of(config, cwd))


def refuse(message: str, code: int = 1) -> None:
    print(message, file=sys.stderr if code else sys.stdout, flush=True)
    raise SystemExit(code)


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("variant", "model", "seed", "params", "active", "tokens", "final val loss (raw)", "status")
    rows = [header]
    for r in records:
        tags = r.get("tags") or {}
        val = r.get("val_loss")
        rows.append((
            str(r.get("variant", "?")), tags.get("model", "?"), tags.get("seed", "?"),
            f"{r['params_total']:,}" if r.get("params_total") else "-",
            f"{r['params_active']:,}" if r.get("params_active") else "-",
            f"{r['tokens']:,}" if r.get("tokens") else "-",
            f"{val:.4f}" if isinstance(val, float) else "-",
            r.get("status", "?"),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def skipped_record(point: Point) -> dict[str, Any]:
    """The table row of a DONE point a sweep skipped without launching it."""
    summary = runfiles.read_summary(point.run_dir) or {}
    acct = point.accounting()
    return {"variant": point.variant, "tags": point.tags(), "status": "DONE", "tokens": summary.get("tokens"),
            "params_total": int(acct["acct.params_total"]), "params_active": int(acct["acct.params_active"]),
            "val_loss": (summary.get("final") or {}).get("val/loss")}  # fmt: skip


class StudyCallback(Callback):
    """Validation before anything starts; parent MLflow run, table and report around a sweep."""

    def __init__(self, report: bool = True, validate: bool = True):
        self.report = report
        self.validate = validate
        self.parent_run_id: str | None = None

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if not self.validate:
            return
        try:
            (point,) = validate_jobs([(tuple(config.hydra.overrides.task), config)])
        except ValueError as exc:
            refuse(f"Run not started: {exc}")
        if config.launch.dry_run:
            row = lifecycle.plan_row("-", point.variant, point.run_key, point.run_dir, config.launch.retry_failed)
            refuse(lifecycle.format_plan([row]), code=0)

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        jobs = jobs_of(config)
        labels = varying([job for job, _ in jobs])
        points: list[Point] = []
        if self.validate:
            try:
                points = validate_jobs(jobs)
            except ValueError as exc:
                refuse(f"Sweep not started: {exc}")
            retry = bool(config.launch.retry_failed)
            rows = [lifecycle.plan_row(lab, p.variant, p.run_key, p.run_dir, retry)
                    for lab, p in zip(labels, points, strict=True)]  # fmt: skip
            print(lifecycle.format_plan(rows), flush=True)
            if config.launch.dry_run:
                refuse(f"Dry run: {len(points)} points validated; nothing launched.", code=0)
            actions = [lifecycle.lifecycle(p.run_dir, retry).action for p in points]
            if not any(a in ("start", "resume", "retry") for a in actions):
                self._nothing_to_start(config, points, actions)
            print(f"Sweep of {len(points)} points validated; launching.", flush=True)
        sweep_dir = Path(config.hydra.sweep.dir)
        try:  # two sweeps started in the same microsecond must not share one folder
            sweep_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            refuse(f"Sweep not started: its folder {sweep_dir} exists already (hydra.sweep.dir); "
                   "set another hydra.sweep.dir")  # fmt: skip
        self.parent_run_id = tracking.start_run(
            tracking_uri_of(config), config.study.name, study_dir_of(config) / "mlartifacts",
            run_name=f"sweep-{sweep_dir.name}",
            tags={"kind": "sweep", "study": config.study.name, "git_sha": tracking.git_sha(),
                  "sweep_dir": str(sweep_dir.resolve()), "points": str(len(jobs))},
        )  # fmt: skip
        os.environ[PARENT_ENV] = self.parent_run_id

    def _nothing_to_start(self, config: DictConfig, points: list[Point], actions: list[str]) -> None:
        """Every point is DONE or a FAILED one not retried: complete their records, report, stop."""
        records = []
        for point, action in zip(points, actions, strict=True):
            if action == "skip":
                complete_done_record(point)
                records.append(skipped_record(point))
            else:
                status = runfiles.read_status(point.run_dir) or {}
                records.append({"variant": point.variant, "tags": point.tags(), "status": "FAILED",
                                "error": f"FAILED earlier at step {status.get('step')}: {status.get('reason')}"})  # fmt: skip
        done = sum(r["status"] == "DONE" for r in records)
        print(f"\nStudy {config.study.name!r}: nothing to start, {done}/{len(points)} points done "
              f"(no sweep folder or MLflow parent run created)\n{format_table(records)}")  # fmt: skip
        if self.report and done:
            self._report(config, tracking_uri_of(config))
        failed = [r for r in records if r["status"] != "DONE"]
        if failed:
            reasons = "\n".join(f"  {r['variant']}: {r['error']}" for r in failed)
            refuse(f"{len(failed)} of {len(points)} sweep points failed earlier and were not retried "
                   f"(--retry-failed retries them):\n{reasons}")  # fmt: skip
        raise SystemExit(0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(PARENT_ENV, None)
        uri = tracking_uri_of(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        records = runfiles.read_job_records(sweep_dir)
        busy = [r for r in records if r.get("status") == "BUSY"]
        failed = [r for r in records if r.get("status") not in ("DONE", "BUSY")]
        table = format_table(records)
        print(f"\nStudy {config.study.name!r}, sweep {sweep_dir.name}: "
              f"{len(records) - len(failed) - len(busy)}/{len(records)} points done\n{table}")  # fmt: skip
        for r in busy:
            print(f"  {r.get('variant')}: {r.get('error')}")
        (sweep_dir / "summary.txt").write_text(table + "\n")
        if self.parent_run_id:
            from studies.mlflow_logger import MlflowLogger

            parent = MlflowLogger(uri, self.parent_run_id)
            parent.set_tags({"points_done": str(len(records) - len(failed) - len(busy)),
                             "points_failed": str(len(failed)), "points_busy": str(len(busy))})  # fmt: skip
            parent.log_artifacts([sweep_dir / "summary.txt"])
            tracking.end_run(uri, self.parent_run_id, ok=not failed)
        print(f"\nMLflow UI:  {tracking.ui_command(uri)}")
        if self.report:
            self._report(config, uri)
        if failed:
            reasons = "\n".join(
                f"  {r.get('variant', 'job ' + str(r.get('job')))}: {r.get('error')}" for r in failed
            )
            refuse(f"{len(failed)} of {len(records)} sweep points failed:\n{reasons}")

    def _report(self, config: DictConfig, uri: str) -> None:
        """The analysis is a guest here: its failure is printed, never fails the sweep."""
        try:
            from analysis.report import write_report

            path = write_report(
                study_dir_of(config), tracking_uri=uri, study=config.study.name,
                baseline=config.study.baseline, parent_run_id=self.parent_run_id,
                best_lr=config.study.get("best_lr"),
            )  # fmt: skip
            print(f"Report (the whole study {config.study.name!r}: every DONE point of it, not only this sweep's): {path}")
            from analysis.findings import read_findings

            print("\n".join(read_findings(path)))
        except Exception:  # noqa: BLE001 - any analysis error must not fail a finished sweep
            print("analysis report failed (the sweep itself is recorded):\n" + traceback.format_exc())
