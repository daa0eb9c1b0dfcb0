"""The Hydra callback around every invocation of `python -m studies.run` (conf/config.yaml).

    on_run_start        a single run: validate the point (studies.launch.sweep) before Hydra writes anything
    on_multirun_start   validate every point, print what each will do; nothing to start: say so and
                        stop (no parent run, no sweep folder); else claim a fresh sweep folder and open
                        the sweep's MLflow parent run
    on_multirun_start   (also) copy the code the jobs import (studies.launch.snapshot) and write sweep.json
                        (parent run id, tracking URI, report settings) for studies.launch.finish
    on_multirun_end     studies.launch.finish.finish_sweep: the sweep's table, the parent run, the report;
                        non-zero exit on failure. Detached (launch.detach): say where to follow the
                        jobs and how the end of the sweep runs, exit 0

Hydra turns exceptions raised in callbacks into warnings and exits 0; a refused or failed sweep must
exit non-zero, so these print the reason and raise SystemExit, which Hydra does not catch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from records import runfiles
from records.code_record import git_sha
from records.sweep_record import SWEEP_RECORD, update_sweep_record
from studies.job import lifecycle
from studies.job.config import study_dir_of
from studies.job.execute import complete_done_record
from studies.job.point import Point
from studies.launch import branches, holdout, snapshot
from studies.launch.finish import failure_message, finish_sweep, format_table, write_study_report
from studies.launch.stale import close_stale_parents, launcher_identity
from studies.launch.sweep import jobs_of, validate_jobs, varying
from studies.track import tracking

PARENT_ENV = "MOE_PARENT_RUN_ID"  # inherited by submitit's local jobs and exported to SLURM jobs
PARENT_URI_ENV = "MOE_PARENT_TRACKING_URI"  # where that parent run lives


def end_open_parent_killed() -> None:
    """End this process's open sweep parent run KILLED (a Ctrl-C that ended the sweep early)."""
    run_id, uri = os.environ.get(PARENT_ENV), os.environ.get(PARENT_URI_ENV)
    if run_id and uri:
        tracking.end_run(uri, run_id, ok=False, killed=True)


def study_dir(config: DictConfig, cwd: Path | None = None) -> Path:
    return study_dir_of(config.paths.root, config.study.name, cwd)


def tracking_uri(config: DictConfig, cwd: Path | None = None) -> str:
    return tracking.tracking_uri_of(config.tracking.uri, study_dir(config, cwd))


def refuse(message: str, code: int = 1) -> None:
    print(message, file=sys.stderr if code else sys.stdout, flush=True)
    raise SystemExit(code)


def detach_refusal(config: DictConfig, points: int) -> None:
    """launch.detach=true where the jobs could not run on without this process: refused before anything."""
    target = str(config.hydra.launcher.get("_target_", ""))
    if not target.startswith("hydra_plugins.moe_scaling."):
        refuse(
            f"Sweep not started: launch.detach=true (--detach) needs a submitit launcher (infra=local or "
            f"infra=slurm); infra={config.infra.name} runs the points inside this process"
        )
    batch = config.hydra.sweeper.get("max_batch_size")
    if target.endswith(".LocalLauncher") and batch is not None and points > int(batch):
        # Hydra launches local batches one after another; detached, nothing would wait between them
        refuse(
            f"Sweep not started: launch.detach=true with infra=local starts every point at once, but the "
            f"sweep has {points} points and hydra.sweeper.max_batch_size={batch} (the jobs this machine "
            f"runs at once): run it without --detach, or set hydra.sweeper.max_batch_size={points}"
        )


def skipped_record(point: Point) -> dict[str, Any]:
    """The table row of a DONE point a sweep skipped without launching it."""
    summary = runfiles.read_summary(point.run_dir) or {}
    acct = point.accounting()
    return {
        "variant": point.variant,
        "tags": point.tags(),
        "status": "DONE",
        "tokens": summary.get("tokens"),
        "params_total": int(acct["acct.params_total"]),
        "params_active": int(acct["acct.params_active"]),
        "val_loss": (summary.get("final") or {}).get("val/loss"),
        "run_dir": str(point.run_dir),
    }


class StudyCallback(Callback):
    """Validation before anything starts; parent MLflow run, table and report around a sweep."""

    def __init__(self, report: bool = True, validate: bool = True):
        self.report = report
        self.validate = validate
        self.parent_run_id: str | None = None
        self._env_before: dict[str, str | None] = {}  # plain data: Hydra pickles callbacks into jobs

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if config.launch.detach:
            refuse(
                "Run not started: launch.detach=true (--detach) needs a sweep (-m): a single run "
                "trains inside this process"
            )
        if not self.validate:
            return
        try:
            (point,) = validate_jobs([(tuple(config.hydra.overrides.task), config)])
        except ValueError as exc:
            refuse(f"Run not started: {exc}")
        if config.launch.dry_run:
            row = lifecycle.plan_row(
                "-", point.variant, point.run_key, point.run_dir, config.launch.retry_failed
            )
            refuse(
                "\n".join(
                    filter(
                        None,
                        [
                            lifecycle.format_plan([row], branches.roles([point])),
                            branches.tokens_line([point]),
                        ],
                    )
                ),
                code=0,
            )
        branches.register([point])

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        try:
            self._start(config)
        except Exception as exc:  # noqa: BLE001 - Hydra would make it a warning, launch, and exit 0
            if self.parent_run_id:  # created before the error: not left RUNNING
                tracking.end_run(tracking_uri(config), self.parent_run_id, ok=False)
            refuse(f"Sweep not started: {type(exc).__name__}: {exc}")

    def _start(self, config: DictConfig) -> None:
        jobs = jobs_of(config)
        if config.launch.detach:
            detach_refusal(config, len(jobs))
        labels = varying([job for job, _ in jobs])
        points: list[Point] = []
        if self.validate:
            try:
                points = validate_jobs(jobs)
            except ValueError as exc:
                refuse(f"Sweep not started: {exc}")
            retry = bool(config.launch.retry_failed)
            rows = [
                lifecycle.plan_row(lab, p.variant, p.run_key, p.run_dir, retry)
                for lab, p in zip(labels, points, strict=True)
            ]
            print(lifecycle.format_plan(rows, branches.roles(points)), flush=True)
            if branches.tokens_line(points):
                print(branches.tokens_line(points), flush=True)
            if held := sum(holdout.is_held_out(cfg) for _, cfg in jobs):
                print(
                    f"held out of the law fit: {held} points (study.holdout={list(config.study.holdout)}), "
                    "last, after their forecast is written",
                    flush=True,
                )
            if config.launch.dry_run:
                refuse(f"Dry run: {len(points)} points validated; nothing launched.", code=0)
            for line in close_stale_parents(tracking_uri(config), config.study.name):
                print(line, flush=True)
            actions = [lifecycle.lifecycle(p.run_dir, retry).action for p in points]
            if not any(a in ("start", "resume", "retry") for a in actions):
                self._nothing_to_start(config, points, actions)
            print(f"Sweep of {len(points)} points validated; launching.", flush=True)
            branches.register(points)  # before any job: each parent keeps its branches' checkpoints
        sweep_dir = Path(config.hydra.sweep.dir)
        try:  # two sweeps started in the same microsecond must not share one folder
            sweep_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            refuse(
                f"Sweep not started: its folder {sweep_dir} exists already (hydra.sweep.dir); "
                "set another hydra.sweep.dir"
            )
        code = snapshot.take_snapshot(sweep_dir)
        self._env_before = snapshot.point_jobs_at(code.dir)
        uri = tracking_uri(config)
        self.parent_run_id = tracking.start_run(
            uri,
            config.study.name,
            study_dir(config) / "mlartifacts",
            run_name=f"sweep-{sweep_dir.name}",
            tags={
                "kind": "sweep",
                "study": config.study.name,
                "git_sha": code.git_sha or git_sha(),
                "sweep_dir": str(sweep_dir.resolve()),
                "points": str(len(jobs)),
                **code.tags(),
            },
        )
        os.environ[PARENT_ENV], os.environ[PARENT_URI_ENV] = self.parent_run_id, uri
        update_sweep_record(
            sweep_dir,
            study=config.study.name,
            study_dir=str(study_dir(config).resolve()),
            sweep_dir=str(sweep_dir.resolve()),
            tracking_uri=uri,
            parent_run_id=self.parent_run_id,
            report=self.report,
            baseline=config.study.baseline,
            best_lr=config.study.get("best_lr"),
            points=len(jobs),
            detach=bool(config.launch.detach),
            launcher=launcher_identity(),
            infra=config.infra.name,
            code={"dir": str(code.dir), "git_sha": code.git_sha, "dirty": code.dirty},
        )

    def _nothing_to_start(self, config: DictConfig, points: list[Point], actions: list[str]) -> None:
        """Every point is DONE or a FAILED one not retried: complete their records, report, stop."""
        records = []
        for point, action in zip(points, actions, strict=True):
            if action == "skip":
                complete_done_record(point)
                records.append(skipped_record(point))
            else:
                status = runfiles.read_status(point.run_dir) or {}
                records.append(
                    {
                        "variant": point.variant,
                        "tags": point.tags(),
                        "status": "FAILED",
                        "error": f"FAILED earlier at step {status.get('step')}: {status.get('reason')}",
                    }
                )
        done = sum(r["status"] == "DONE" for r in records)
        print(
            f"\nStudy {config.study.name!r}: nothing to start, {done}/{len(points)} points done "
            f"(no sweep folder or MLflow parent run created)\n{format_table(records)}"
        )
        if self.report and done:
            write_study_report(
                study_dir(config),
                tracking_uri(config),
                config.study.name,
                config.study.baseline,
                config.study.get("best_lr"),
                None,
            )
        failed = [r for r in records if r["status"] != "DONE"]
        if failed:
            reasons = "\n".join(f"  {r['variant']}: {r['error']}" for r in failed)
            refuse(
                f"{len(failed)} of {len(points)} sweep points failed earlier and were not retried "
                f"(--retry-failed retries them):\n{reasons}"
            )
        raise SystemExit(0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._end(config)
        except Exception as exc:  # noqa: BLE001 - Hydra would make it a warning and exit 0
            refuse(
                f"The sweep's jobs ended but finishing it failed: {type(exc).__name__}: {exc}; fix that and "
                f"run  python -m studies.launch.finish {Path(config.hydra.sweep.dir).resolve()}"
            )

    def _end(self, config: DictConfig) -> None:
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(PARENT_URI_ENV, None)
        snapshot.restore_env(self._env_before)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if config.launch.detach:
            print(
                f"\nDetached: the sweep's jobs run on (ids and logs above). Follow them with\n"
                f"  python -m studies.status {sweep_dir}"
            )
            finisher = (runfiles.read_json(sweep_dir / SWEEP_RECORD) or {}).get("finish_job")
            if finisher:
                print(
                    f"The end of the sweep (table, MLflow parent run, report) runs as SLURM job "
                    f"{finisher['job_id']} once they have ended ({finisher['dependency']}); log {finisher['log']}"
                )
            else:
                print(
                    f"Once they have ended, finish the sweep (table, MLflow parent run, report) with\n"
                    f"  python -m studies.launch.finish {sweep_dir}"
                )
            return
        result = finish_sweep(sweep_dir, report=self.report, even_if_running=True)
        if result.failed:
            refuse(failure_message(result))
        if why := (runfiles.read_json(sweep_dir / SWEEP_RECORD) or {}).get("held_out_not_started"):
            refuse(
                f"Held-out points not started: {why}. Re-run the same command once that is fixed "
                "(finished points are skipped)."
            )
