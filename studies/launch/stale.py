"""Sweep parent runs left RUNNING in MLflow by a sweep process that is gone (SIGKILL, a lost node, a
closed laptop): the next sweep of the study ends them KILLED, so the MLflow UI shows no sweep as running
that nothing runs. A parent counts as stale only when its sweep.json names the process that launched it
on this machine and that process is gone; a detached sweep (its jobs run on; `studies.launch.finish`
ends its parent) and one launched elsewhere are left alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from records import runfiles
from records.sweep_record import SWEEP_RECORD
from studies.launch.finish import pid_alive
from studies.track import tracking


def launcher_identity() -> dict[str, object]:
    """What sweep.json records of the sweep process, for `stale_reason` to find it gone later."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def stale_reason(sweep_dir: str | None) -> str | None:
    """Why the sweep of `sweep_dir` is known to be gone (None: running, detached or cannot tell)."""
    record = runfiles.read_json(Path(sweep_dir) / SWEEP_RECORD) if sweep_dir else None
    launcher = (record or {}).get("launcher") or {}
    if not record or record.get("detach") or launcher.get("host") != socket.gethostname():
        return None
    if pid_alive(launcher.get("pid")):
        return None
    return f"its sweep process {launcher.get('pid')} on {launcher['host']} is gone"


def close_stale_parents(uri: str, study: str) -> list[str]:
    """End KILLED every sweep parent run of `study` that is RUNNING but whose sweep is gone; returns one
    line per run closed. A sqlite store that does not exist yet is not created."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []
    client = tracking.open_client(uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return []
    running = client.search_runs(
        [experiment.experiment_id], "tags.kind = 'sweep' and attributes.status = 'RUNNING'"
    )
    closed = []
    for run in running:
        why = stale_reason(run.data.tags.get("sweep_dir"))
        if why and tracking.end_run(uri, run.info.run_id, ok=False, killed=True):
            closed.append(f"MLflow parent run {run.info.run_name} ended KILLED: {why}")
    return closed
