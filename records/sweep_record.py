"""The sweep record, `<sweep dir>/sweep.json`: written at launch (the parent run id, the tracking URI,
the report's settings, the jobs) and updated by the launcher, the Hydra callback and the sweep's end
(studies.launch.finish), always through `update_sweep_record`, under a lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from filelock import FileLock

from records import runfiles

SWEEP_RECORD = "sweep.json"


class NotASweepError(ValueError):
    """The path is not a sweep folder with a sweep.json; the message names the path."""


def read_sweep_record(sweep_dir: Path | str) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_RECORD
    if not Path(sweep_dir).is_dir():
        raise NotASweepError(f"{sweep_dir} is not a folder")
    record = runfiles.read_json(path)
    if record is None:
        raise NotASweepError(
            f"{sweep_dir} is not a sweep folder: it has no {SWEEP_RECORD} "
            "(written when `python -m studies.run -m ...` launches a sweep)"
        )
    return record


def update_sweep_record(sweep_dir: Path | str, /, **changes: Any) -> dict[str, Any]:
    """Read-modify-write sweep.json under a lock (the launcher, the callback and finish all write it)."""
    path = Path(sweep_dir) / SWEEP_RECORD
    with FileLock(f"{path}.lock"):
        record = runfiles.read_json(path) or {}
        jobs = changes.pop("add_jobs", None)
        record.update(changes)
        if jobs:
            record["jobs"] = [*record.get("jobs", []), *jobs]
        runfiles.write_json(path, record)
    return record
