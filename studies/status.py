"""`python -m studies.status outputs/<study>` (or one sweep folder): where a study's sweeps stand.

For every sweep folder with a sweep.json (written at launch, studies.launch.finish): each point's state, step of
its total, losses, throughput and ETA, read from its run folder exactly as the launching terminal's
progress view reads them (studies.launch.progress.snapshot: status.json is the source of truth), next to the
scheduler's view of its job (sacct where SLURM answers; for local jobs whether the job's process lives),
and whether the end-of-sweep work (studies.launch.finish) has run. Works while the jobs run (a detached sweep,
a sweep launched from another terminal) and after.

Bad input (a missing path, a folder that is neither a study nor a sweep) is one line naming the path,
exit 2.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any

from records import runfiles
from records.sweep_record import SWEEP_RECORD, NotASweepError, read_sweep_record
from studies.launch.finish import pid_alive, scheduler_states
from studies.launch.progress import HEADER, Tracked, plain_table, rows, snapshot


class StatusInputError(ValueError):
    """The path given to studies.status is not a study or a sweep folder; the message names it."""


def sweep_dirs_of(path: Path) -> list[Path]:
    """The sweep folders `path` stands for: itself (a sweep) or every sweep of a study, oldest first."""
    if not path.exists():
        raise StatusInputError(f"{path} does not exist")
    if not path.is_dir():
        raise StatusInputError(f"{path} is a file, not a study or sweep folder")
    if (path / SWEEP_RECORD).is_file():
        return [path]
    if (path / "multirun").is_dir() or runfiles.runs_dir(path).is_dir():
        multirun = path / "multirun"
        return sorted(p for p in multirun.iterdir() if p.is_dir()) if multirun.is_dir() else []
    raise StatusInputError(
        f"{path} is neither a study folder (with multirun/ or runs/) nor a sweep folder (with {SWEEP_RECORD})"
    )


def _local_state(job: dict[str, Any], sweep_dir: Path) -> str:
    """A local job's process, seen from here: running, ended, or unknown (launched on another host)."""
    if (sweep_dir / str(job["num"]) / runfiles.JOB_RECORD).exists():
        return "ENDED"
    if job.get("host") != socket.gethostname():
        return "UNKNOWN"
    return "RUNNING" if pid_alive(job.get("pid")) else "ENDED"


def sweep_status(sweep_dir: Path) -> str:
    """The table of one sweep, with a heading line saying how far it is."""
    record = read_sweep_record(sweep_dir)
    jobs = sorted(record.get("jobs", []), key=lambda j: int(j["num"]))
    slurm = record.get("executor") == "slurm"
    sched = scheduler_states([str(j["job_id"]) for j in jobs]) if slurm else {}
    tracked = [
        Tracked(
            j["label"], j["variant"], Path(j["run_dir"]), int(j["steps"]), str(j["job_id"]), Path(j["log"])
        )
        for j in jobs
    ]
    job_states = [
        sched.get(t.job_id, "UNKNOWN") if slurm else _local_state(j, sweep_dir)
        for t, j in zip(tracked, jobs, strict=True)
    ]
    snaps = [snapshot(t, s) for t, s in zip(tracked, job_states, strict=True)]
    table_rows = [
        (*row, t.job_id, s)
        for row, t, s in zip(
            rows(tracked, snaps, [int(j["batch_tokens"]) for j in jobs]), tracked, job_states, strict=True
        )
    ]
    done = sum(s.state == "DONE" for s in snaps)
    heading = (
        f"sweep {sweep_dir.name} ({record.get('study')}, {record.get('executor', 'in-process')}"
        f"{', detached' if record.get('detach') else ''}): {done}/{len(jobs)} points done; "
        f"MLflow parent run {record.get('parent_run_id')}"
    )
    lines = [heading, f"  end of sweep: {_finish_state(record, sweep_dir)}"]
    if jobs:
        scheduler = "sacct" if slurm else "process"
        lines.append(plain_table((*HEADER, "job", scheduler), table_rows))
    return "\n".join(lines)


def _finish_state(record: dict[str, Any], sweep_dir: Path) -> str:
    finished = record.get("finished")
    if finished:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished["at"]))
        return f"done at {at} ({finished['points_done']} done, {finished['points_failed']} failed)"
    finisher = record.get("finish_job")
    if finisher:
        state = scheduler_states([finisher["job_id"]]).get(finisher["job_id"], "UNKNOWN")
        return f"SLURM job {finisher['job_id']} ({finisher['dependency']}) {state}, log {finisher['log']}"
    return f"not run yet: `python -m studies.launch.finish {sweep_dir}` once the jobs have ended"


def study_status(path: Path) -> str:
    out = []
    sweeps = sweep_dirs_of(path)
    for sweep_dir in sweeps:
        try:
            out.append(sweep_status(sweep_dir))
        except NotASweepError:  # a sweep launched before sweep.json existed, or a claimed empty folder
            out.append(f"sweep {sweep_dir.name}: no {SWEEP_RECORD} (not launched by this version)")
    return "\n\n".join(out) if out else f"{path}: no sweeps yet (multirun/ is empty)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.status", description=__doc__.splitlines()[0])
    parser.add_argument(
        "path", type=Path, help="a study folder (outputs/<study>) or one of its sweep folders"
    )
    args = parser.parse_args(argv)
    try:
        print(study_status(args.path))
    except (StatusInputError, runfiles.RunFileError) as exc:
        print(f"studies.status: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
