"""The end of a sweep, one function for every path: `finish_sweep(sweep_dir)`.

    the sweep's table       from the jobs' point.json records (summary.txt in the sweep folder)
    the MLflow parent run   tags points_done / _failed / _busy, summary.txt, status FINISHED or FAILED
    the analysis report     the whole study's (analysis.report), a guest: its failure is printed

It runs from StudyCallback.on_multirun_end after a sweep that waited for its jobs, as the SLURM job a
detached sweep submits after its array (`--dependency=afterany:<array>`), and by hand:

    python -m studies.launch.finish outputs/<study>/multirun/<sweep>   [--no-report] [--even-if-running]

Everything it needs is in the sweep folder's sweep.json (written at launch: the parent run id, the
tracking URI, the report's settings, the jobs), so it needs no Hydra config. Running it again redoes
the same writes (same tags, same artifact paths, the parent run ended again with the same status).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from records import runfiles
from records.sweep_record import NotASweepError, read_sweep_record, update_sweep_record
from studies.track import tracking

# sacct/squeue states of a job that will not run again (anything else may still run or be queued)
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
}


class SweepStillRunning(RuntimeError):
    """Some of the sweep's jobs are queued or running; finishing now would report them as failed."""


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job id ("123" or an array task "123_4"), from sacct, else squeue; {} where
    neither answers (no SLURM here)."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    if not ids:
        return {}
    for cmd in (
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
        ["squeue", "-h", "-o", "%i|%T", "-j", ",".join(ids)],
    ):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return expand_states(out.stdout, job_ids)
    return {}


def expand_states(table: str, job_ids: list[str]) -> dict[str, str]:
    """`id|STATE` lines to a state per asked id; a pending array reads `123_[0-3,5%2]|PENDING`."""
    states: dict[str, str] = {}
    for line in table.splitlines():
        if "|" not in line:
            continue
        key, state = line.split("|", 1)
        state = state.split()[0] if state.strip() else "UNKNOWN"
        if "_[" in key:
            base, ranges = key.split("_[", 1)
            for part in ranges.rstrip("]").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    states.setdefault(f"{base}_{i}", state)
        else:
            states.setdefault(key, state)  # sacct lists the newest attempt first
    return {j: states[j] for j in job_ids if j in states}


def running_jobs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's jobs that have no point.json yet and may still run: a live local controller on this
    host, or a SLURM job that has not ended."""
    sweep_dir = Path(record["sweep_dir"])
    waiting = [
        j for j in record.get("jobs", []) if not (sweep_dir / str(j["num"]) / runfiles.JOB_RECORD).exists()
    ]
    states = scheduler_states([str(j["job_id"]) for j in waiting if record.get("executor") == "slurm"])
    alive = []
    for job in waiting:
        if record.get("executor") == "slurm":
            if states.get(str(job["job_id"]), "UNKNOWN") not in ENDED:
                alive.append(job)
        elif job.get("host") == socket.gethostname() and pid_alive(job.get("pid")):
            alive.append(job)
    return alive


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The end of a sweep ------------------------------------------------------------------------------


def smoothed_final(record: dict[str, Any]) -> tuple[float | None, str | None]:
    """(final smoothed val loss, its label) from the point's summary.json, where it has one."""
    summary = runfiles.read_summary(record["run_dir"]) if record.get("run_dir") else None
    final, labels = (summary or {}).get("final") or {}, (summary or {}).get("final_labels") or {}
    return final.get("val/loss_smoothed"), labels.get("val/loss_smoothed")


def format_table(records: list[dict[str, Any]]) -> str:
    """The sweep's table; both final val losses, named as in summary.json and the report."""
    smoothed = [smoothed_final(r) for r in records]
    label = next((lab for _, lab in smoothed if lab), "final val loss (smoothed)")
    header = (
        "variant",
        "model",
        "seed",
        "params",
        "active",
        "tokens",
        "final val loss (raw)",
        label,
        "status",
    )
    rows = [header]
    for r, (smooth, _) in zip(records, smoothed, strict=True):
        tags = r.get("tags") or {}
        val = r.get("val_loss")
        rows.append(
            (
                str(r.get("variant", "?")),
                tags.get("model", "?"),
                tags.get("seed", "?"),
                f"{r['params_total']:,}" if r.get("params_total") else "-",
                f"{r['params_active']:,}" if r.get("params_active") else "-",
                f"{r['tokens']:,}" if r.get("tokens") else "-",
                f"{val:.4f}" if isinstance(val, float) else "-",
                f"{smooth:.4f}" if isinstance(smooth, float) else "-",
                r.get("status", "?"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sweep_records(sweep_dir: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per job: its point.json, or FAILED where the job ended without one (or never started:
    a job cancelled while queued has no folder)."""
    jobs = record.get("jobs")
    if not jobs:  # an in-process sweep (infra=basic): its job folders are all there is
        return runfiles.read_job_records(sweep_dir)
    out = []
    for job in sorted(jobs, key=lambda j: int(j["num"])):
        found = runfiles.read_json(sweep_dir / str(job["num"]) / runfiles.JOB_RECORD)
        out.append(
            found
            or rebuilt_done_record(job, record)
            or {
                "job": str(job["num"]),
                "variant": job.get("variant"),
                "status": "FAILED",
                "error": f"job {job.get('job_id')} ended without a record (log {job.get('log')})",
            }
        )
    return out


def rebuilt_done_record(job: dict[str, Any], record: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a job killed after its point was DONE but before it wrote point.json, rebuilt from
    the point's summary.json; its MLflow run, left RUNNING by the kill, is completed from the run folder
    (studies.sync). None when the point is not DONE."""
    run_dir = Path(job.get("run_dir") or "")
    status = runfiles.read_status(run_dir) if job.get("run_dir") and run_dir.is_dir() else None
    summary = runfiles.read_summary(run_dir) if status and status.get("status") == "DONE" else None
    if not summary:
        return None
    from studies import sync  # here: the CLI's --help needs no MLflow

    try:
        if sync.complete_run(record["tracking_uri"], run_dir, record["study"], Path(record["study_dir"])):
            print(
                f"job #{job['num']}: point {run_dir.name} is DONE; its MLflow run was completed", flush=True
            )
    except Exception as exc:  # noqa: BLE001 - the files hold the result; studies.sync can finish later
        print(
            f"job #{job['num']}: point {run_dir.name} is DONE but its MLflow run was not completed "
            f"({type(exc).__name__}: {str(exc)[:200]}); run `python -m studies.sync {record['study_dir']}`",
            flush=True,
        )
    params = summary.get("params") or {}
    return {
        "job": str(job["num"]),
        "run_key": summary.get("run_key"),
        "variant": summary.get("variant"),
        "status": "DONE",
        "tags": summary.get("tags", {}),
        "params_total": params.get("acct.params_total"),
        "params_active": params.get("acct.params_active"),
        "tokens": summary.get("tokens"),
        "val_loss": (summary.get("final") or {}).get("val/loss"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "run_dir": str(run_dir),
        "error": None,
    }


@dataclass(frozen=True)
class FinishResult:
    records: list[dict[str, Any]]
    done: int
    failed: list[dict[str, Any]]
    busy: list[dict[str, Any]]


def finish_sweep(
    sweep_dir: Path | str, *, report: bool | None = None, even_if_running: bool = False
) -> FinishResult:
    """Table, parent run and report of a sweep whose jobs have ended (idempotent). SweepStillRunning if
    some job is queued or running (unless even_if_running: the afterany job, which SLURM starts only
    after the array ended, does not ask sacct, which may lag)."""
    sweep_dir = Path(sweep_dir).resolve()
    record = read_sweep_record(sweep_dir)
    record["sweep_dir"] = str(sweep_dir)  # the folder may have moved since launch
    if not even_if_running and (alive := running_jobs(record)):
        ids = ", ".join(str(j["job_id"]) for j in alive)
        raise SweepStillRunning(
            f"{len(alive)} of the sweep's jobs have not ended yet ({ids}): run "
            f"`python -m studies.launch.finish {sweep_dir}` again once they have "
            f"(`python -m studies.status {sweep_dir}` shows them)"
        )
    records = sweep_records(sweep_dir, record)
    busy = [r for r in records if r.get("status") == "BUSY"]
    failed = [r for r in records if r.get("status") not in ("DONE", "BUSY")]
    done = len(records) - len(failed) - len(busy)
    table = format_table(records)
    print(f"\nStudy {record['study']!r}, sweep {sweep_dir.name}: {done}/{len(records)} points done\n{table}")
    for r in busy:
        print(f"  {r.get('variant')}: {r.get('error')}")
    (sweep_dir / "summary.txt").write_text(table + "\n")
    uri, parent = record["tracking_uri"], record.get("parent_run_id")
    if parent:
        finalise_parent(
            uri,
            parent,
            sweep_dir,
            {"points_done": str(done), "points_failed": str(len(failed)), "points_busy": str(len(busy))},
            ok=not failed,
        )
    print(f"\nMLflow UI:  {tracking.ui_command(uri)}")
    report_path = None
    if record.get("report", True) if report is None else report:
        report_path = write_study_report(
            Path(record["study_dir"]),
            uri,
            record["study"],
            record.get("baseline"),
            record.get("best_lr"),
            parent,
        )
    publish_view(uri, parent, record["study"], sweep_dir, report_path)
    update_sweep_record(
        sweep_dir,
        finished={
            "at": time.time(),
            "points_done": done,
            "points_failed": len(failed),
            "points_busy": len(busy),
        },
    )
    return FinishResult(records, done, failed, busy)


def finalise_parent(uri: str, parent_run_id: str, sweep_dir: Path, tags: dict[str, str], ok: bool) -> None:
    """The one place the sweep's MLflow parent run is finalised (idempotent: the same tags and artifact
    again, and ending an ended run sets the same status)."""
    from studies.track.mlflow_logger import MlflowLogger  # here: the CLI's --help needs no MLflow

    parent = MlflowLogger(uri, parent_run_id)
    parent.set_tags(tags)
    parent.log_artifacts([sweep_dir / "summary.txt"])
    tracking.end_run(uri, parent_run_id, ok=ok)


def publish_view(
    uri: str, parent_run_id: str | None, study: str, sweep_dir: Path, report: Path | None
) -> None:
    """The MLflow study view (studies.track.study_view): after the report, whose savings and figures the parent
    run then carries; it never raises, and what MLflow refused is printed."""
    from studies.track.study_view import publish_study_view

    print(publish_study_view(uri, parent_run_id, study, sweep_dir, report).hint())


def write_study_report(
    study_dir: Path,
    uri: str,
    study: str,
    baseline: str | None,
    best_lr: bool | None,
    parent_run_id: str | None,
) -> Path | None:
    """The report's path; the analysis is a guest here: its failure is printed (None), never fails a
    finished sweep."""
    try:
        from analysis.report import write_report

        path = write_report(
            study_dir,
            tracking_uri=uri,
            study=study,
            baseline=baseline,
            parent_run_id=parent_run_id,
            best_lr=best_lr,
        )
        print(f"Report (the whole study {study!r}: every DONE point of it, not only this sweep's): {path}")
        from analysis.findings import read_findings

        print("\n".join(read_findings(path)))
        return Path(path)
    except Exception:  # noqa: BLE001 - any analysis error must not fail a finished sweep
        print("analysis report failed (the sweep itself is recorded):\n" + traceback.format_exc())
        return None


def failure_message(result: FinishResult) -> str:
    reasons = "\n".join(
        f"  {r.get('variant') or 'job ' + str(r.get('job'))}: {r.get('error')}" for r in result.failed
    )
    return f"{len(result.failed)} of {len(result.records)} sweep points failed:\n{reasons}"


def finish_job(sweep_dir: str) -> dict[str, int]:
    """What a detached SLURM sweep's afterany job runs (the array has ended); its counts are the result."""
    result = finish_sweep(sweep_dir, even_if_running=True)
    return {"done": result.done, "failed": len(result.failed), "busy": len(result.busy)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studies.launch.finish", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="outputs/<study>/multirun/<sweep>")
    parser.add_argument("--no-report", action="store_true", help="skip the analysis report")
    parser.add_argument(
        "--even-if-running",
        action="store_true",
        help="finish although jobs are queued or running (they are reported as failed)",
    )
    args = parser.parse_args(argv)
    try:
        result = finish_sweep(
            args.sweep_dir, report=False if args.no_report else None, even_if_running=args.even_if_running
        )
    except (NotASweepError, SweepStillRunning, runfiles.RunFileError) as exc:
        print(f"studies.launch.finish: {exc}", file=sys.stderr)
        return 2
    if result.failed:
        print(failure_message(result), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
