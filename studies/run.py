"""`python -m studies.run [-m] axis=value,... [--dry-run] [--retry-failed] [--detach]`: the thin Hydra
shell around `studies.job.execute.run_point`.

Re-running a command is safe (docs/lifecycle.md): DONE points are skipped, partial ones resume from their
checkpoint, FAILED ones are retried only with `launch.retry_failed=true`. `launch.dry_run=true` prints
what each point would do (start / resume from step N / skip / not retried) and launches nothing.
`--retry-failed` and `--dry-run` are short for those two overrides; `--detach` for `launch.detach=true`
(submit the sweep and return; docs/slurm.md). Every point is validated before
anything is written (studies.launch.callbacks), with and without -m.
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

from moe.parallel.distributed import read_env
from moe.train.outcome import TrainingInterrupted
from records import runfiles
from records.code_record import project_root
from studies.job.config import load_run_config, register_configs
from studies.job.execute import run_point
from studies.job.point import build_point
from studies.job.preemption import install as install_stop_signals
from studies.launch.callbacks import PARENT_ENV

register_configs()

FLAGS = {
    "--dry-run": "launch.dry_run=true",
    "--retry-failed": "launch.retry_failed=true",
    "--detach": "launch.detach=true",
}


def fails_its_job(hc) -> bool:
    """Under the project's submitit launchers a failed point fails its own job (studies.launch.launcher);
    Hydra's in-process basic launcher would end the whole sweep, so there the failure is a record."""
    return str(hc.launcher.get("_target_", "")).startswith("hydra_plugins.moe_scaling.")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    install_stop_signals()  # SIGTERM (and submitit's signal in a job) checkpoints at the next step
    try:
        result = run_point(
            cfg,
            parent_run_id=os.environ.get(PARENT_ENV),
            cwd=Path(hc.runtime.cwd),
            job=f"{job_dir.parent.name}/{job_dir.name}",
        )
    except TrainingInterrupted as exc:
        record = {"status": "PREEMPTED", "error": str(exc), "job": job_dir.name, **point_identity(cfg)}
        write_failure_record(job_dir, record)
        raise
    except Exception as exc:
        record = {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}", "job": job_dir.name}
        record.update(point_identity(cfg))
        write_failure_record(job_dir, record)
        if not multirun or fails_its_job(hc):
            raise
        # In-process sweep: keep going; the end-of-sweep callback reports the failure and exits non-zero.
        traceback.print_exc()
        return record
    if result is None:  # a rank other than 0 of a data-parallel point: rank 0 writes the record
        return {}
    record = dataclasses.asdict(result)
    write_record(job_dir, record)
    return record


def write_record(job_dir: Path, record: dict) -> None:
    """point.json, with the folder the job imported the project from (the sweep's code snapshot)."""
    runfiles.write_job_record(job_dir, {**record, "code": str(project_root())})


def write_failure_record(job_dir: Path, record: dict) -> None:
    """The ranks of a multi-task point share one job folder. Rank 0's account of a failure is the one
    kept; another rank writes only where there is none yet (rank 0 died: the survivor's is all there is)."""
    try:
        rank = read_env()[0]
    except ValueError:  # malformed rank variables: the job's own error says so; keep this record
        rank = 0
    if rank == 0 or not (job_dir / runfiles.JOB_RECORD).exists():
        write_record(job_dir, record)


def point_identity(cfg: DictConfig) -> dict:
    """variant, run key and tags of a point for the sweep table, where the config gets that far."""
    try:
        point = build_point(load_run_config(cfg))
    except Exception:  # noqa: BLE001 - an invalid point has no identity; its error says why
        return {}
    return {"variant": point.variant, "run_key": point.run_key, "tags": point.tags()}


def cli(argv: list[str]) -> None:
    sys.argv[1:] = [FLAGS.get(a, a) for a in argv]
    try:
        main()
    except KeyboardInterrupt:  # outside the launcher's own handling (studies.launch.launcher): one line
        from studies.launch.callbacks import end_open_parent_killed

        end_open_parent_killed()
        print(
            "Interrupted (Ctrl-C); points stopped part-way resume when the same command runs again",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    cli(sys.argv[1:])
