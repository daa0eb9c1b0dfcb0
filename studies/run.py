"""`python -m studies.run [-m] axis=value,... [--dry-run] [--retry-failed]`: the thin Hydra shell around
`studies.point.run_point`.

Re-running a command is safe (docs/lifecycle.md): DONE points are skipped, partial ones resume from their
checkpoint, FAILED ones are retried only with --retry-failed (exported to the jobs as MOE_RETRY_FAILED=1).
--dry-run prints what each point would do (start / resume from step N / skip / not retried) and launches
nothing. Both flags are taken off the command line before Hydra parses it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moe.train import TrainingInterrupted
from studies.callbacks import PARENT_ENV, write_job_record
from studies.config import load_run_config, register_configs
from studies.point import RETRY_ENV, planned_point, run_point

register_configs()

DRY_RUN, RETRY_FAILED = "--dry-run", "--retry-failed"


def fails_its_job(hc) -> bool:
    """Under the project's submitit launchers a failed point fails its own job (studies.launcher);
    Hydra's in-process basic launcher would end the whole sweep, so there the failure is a record."""
    return str(hc.launcher.get("_target_", "")).startswith("hydra_plugins.moe_scaling.")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    try:
        result = run_point(cfg, parent_run_id=os.environ.get(PARENT_ENV), cwd=Path(hc.runtime.cwd))
    except TrainingInterrupted as exc:
        record = {"status": "PREEMPTED", "error": str(exc), "job": job_dir.name, **point_identity(cfg)}
        write_job_record(job_dir, record)
        raise
    except Exception as exc:
        record = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}", "job": job_dir.name}
        record.update(point_identity(cfg))
        write_job_record(job_dir, record)
        if not multirun or fails_its_job(hc):
            raise
        # In-process sweep: keep going; the end-of-sweep callback reports the failure and exits non-zero.
        traceback.print_exc()
        return record
    if result is None:  # a rank other than 0 of a data-parallel point: rank 0 writes the record
        return {}
    record = dataclasses.asdict(result)
    write_job_record(job_dir, record)
    return record


def point_identity(cfg: DictConfig) -> dict:
    """variant, run key and tags of a point for the sweep table, where the config gets that far."""
    try:
        point = planned_point(load_run_config(cfg))
    except Exception:  # noqa: BLE001 - an invalid point has no identity; its error says why
        return {}
    return {"variant": point.variant, "run_key": point.run_key, "tags": point.tags()}


def dry_run(argv: list[str]) -> int:
    """Print what `studies.run argv` would do with each point; nothing is launched or written."""
    from studies.launcher import format_lifecycle, lifecycle_row
    from studies.plan import compose_jobs

    multirun = "-m" in argv or "--multirun" in argv
    overrides = [a for a in argv if not a.startswith("-")]
    jobs = compose_jobs(overrides, multirun)
    common = set.intersection(*(set(job) for job, _ in jobs)) if len(jobs) > 1 else set()
    rows = [lifecycle_row(cfg, [o for o in job if o not in common]) for job, cfg in jobs]
    print(format_lifecycle(rows))
    return 0


def cli(argv: list[str]) -> None:
    if RETRY_FAILED in argv:
        argv.remove(RETRY_FAILED)
        os.environ[RETRY_ENV] = "1"  # inherited by local jobs; SLURM exports the environment too
    if DRY_RUN in argv:
        argv.remove(DRY_RUN)
        sys.exit(dry_run(argv))
    sys.argv[1:] = argv
    main()


if __name__ == "__main__":
    cli(sys.argv[1:])
