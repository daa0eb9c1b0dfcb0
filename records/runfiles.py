"""The run-folder format (docs/outputs.md), one reader and one writer for studies/ and analysis/.

    <study dir>/runs/<run key>/
        config.yaml      resolved config of the point (written by studies.job.record)
        metrics.jsonl    one JSON object per logging event: {"step": N, "<metric>": value, ...}
        summary.json     identity, params, final metrics (written when the point ends)
        status.json      {"status", "step", "reason", ...}: RUNNING / DONE / FAILED / PREEMPTED / INTERRUPTED
        owner.json       the process that trains the point now (studies.job.lifecycle)
        mlflow_run_id    the point's MLflow run
        checkpoints/     moe.train.checkpoint files
        branches.json    a parent's cooldown branches: {branch run key: {"step", "tokens"}} (studies.launch.branches)

Stdlib only (with moe.files, itself stdlib only), so the analysis side can read a study without torch or Hydra. One rule for a broken line
of metrics.jsonl everywhere: a torn last line (a kill mid-write) is dropped; a corrupt line elsewhere is
a RunFileError naming file:line. Every JSON file is written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from moe.files import write_json_atomic

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
STATUS = "status.json"
OWNER = "owner.json"
RUN_ID = "mlflow_run_id"
CHECKPOINTS = "checkpoints"
BRANCHES = "branches.json"
TOKENIZER = "tokenizer.json"
"""The tokenizer the point trained with, copied at its start: an export needs no data cache or corpus."""

STATUSES = ("RUNNING", "DONE", "FAILED", "PREEMPTED", "INTERRUPTED")
RESUMABLE = ("RUNNING", "PREEMPTED", "INTERRUPTED")


class RunFileError(ValueError):
    """A run file exists but cannot be read; the message names the file (and line)."""


def runs_dir(study_dir: Path | str) -> Path:
    return Path(study_dir) / "runs"


def run_dirs(study_dir: Path | str) -> list[Path]:
    """Every run folder of a study, sorted by run key; [] if it has none."""
    root = runs_dir(study_dir)
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# JSON files ---------------------------------------------------------------------------------------


def write_json(path: Path | str, obj: Mapping[str, Any]) -> None:
    """Write `obj` atomically: a reader sees the old file or the new one, never half of one."""
    write_json_atomic(path, obj)


def keep_tokenizer(run_dir: Path | str, tokenizer: Path | str | None) -> None:
    """Copy `tokenizer` (a tokenizer.json; None: the data shipped none) into the run folder, once."""
    dst = Path(run_dir) / TOKENIZER
    if tokenizer is None or dst.is_file():
        return
    tmp = dst.with_name(f".{TOKENIZER}.{os.getpid()}.tmp")
    shutil.copyfile(tokenizer, tmp)
    os.replace(tmp, dst)


def read_json(path: Path | str) -> dict[str, Any] | None:
    """The object in `path`; None if the file does not exist; RunFileError if it is not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path} holds a {type(obj).__name__}, not a JSON object")
    return obj


def read_status(run_dir: Path | str) -> dict[str, Any] | None:
    """status.json of a run folder (None: the point never started); an unknown status is an error."""
    path = Path(run_dir) / STATUS
    status = read_json(path)
    if status is not None and status.get("status") not in STATUSES:
        raise RunFileError(
            f"{path} has unknown status {status.get('status')!r} (one of {', '.join(STATUSES)})"
        )
    return status


def write_status(
    run_dir: Path | str, status: str, step: int, reason: str | None = None, **extra: Any
) -> None:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    write_json(Path(run_dir) / STATUS, {"status": status, "step": step, "reason": reason, **extra})


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / SUMMARY)


def write_summary(run_dir: Path | str, summary: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / SUMMARY, summary)


def read_run_id(run_dir: Path | str) -> str | None:
    path = Path(run_dir) / RUN_ID
    return (path.read_text().strip() or None) if path.exists() else None


def write_run_id(run_dir: Path | str, run_id: str) -> None:
    path = Path(run_dir) / RUN_ID
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


# metrics.jsonl ------------------------------------------------------------------------------------


def read_events(path: Path | str) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl, in file order ([] if absent). A torn last line is dropped; a
    corrupt line elsewhere, or one without an integer `step`, is a RunFileError naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # killed while writing its last line
                break
            raise RunFileError(f"{path}:{number} is not JSON: {line[:200]!r}") from None
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            raise RunFileError(f"{path}:{number} has no integer 'step': {line[:200]!r}")
        events.append(event)
    return events


def is_torn(path: Path | str) -> bool:
    """Whether metrics.jsonl ends in a torn line (read_events drops it); reports say so."""
    path = Path(path)
    if not path.exists():
        return False
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return False
    try:
        json.loads(lines[-1])
    except json.JSONDecodeError:
        return True
    return False


def metric_values(events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], float]:
    """{(metric, step): value}; a repeated (metric, step) keeps the last value."""
    out: dict[tuple[str, int], float] = {}
    for event in events:
        step = int(event["step"])
        for key, value in event.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[(key, step)] = float(value)
    return out


class MetricsWriter:
    """Appends events to metrics.jsonl, each line flushed (a crash keeps the history).

    `through_step` continues a file from a checkpoint (0: start the file afresh): events after that step (written after the
    checkpoint the run resumes from, so training writes them again) are cut first, atomically.
    `kept` and `keys` (every metric name the file held) serve the MLflow side of a resume."""

    def __init__(self, path: Path | str, through_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        events = read_events(self.path)
        self.keys = {k for e in events for k in e if k != "step"}
        self.kept = [e for e in events if e["step"] <= through_step]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in self.kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._file: TextIO | None = self.path.open("a")
        self.last_step = self.kept[-1]["step"] if self.kept else 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: MetricsWriter used after close()")
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        self.last_step = step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_events(path: Path | str, events: Iterable[Mapping[str, Any]]) -> None:
    """A whole metrics.jsonl at once (tests and synthetic studies)."""
    writer = MetricsWriter(path)
    for event in events:
        writer.log_metrics({k: v for k, v in event.items() if k != "step"}, int(event["step"]))
    writer.close()


# Sweep folders: <study dir>/multirun/<time>/<job number>/point.json ----------------------------------

JOB_RECORD = "point.json"


def write_job_record(job_dir: Path | str, record: Mapping[str, Any]) -> None:
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(job_dir) / JOB_RECORD, record)


def read_job_records(sweep_dir: Path | str) -> list[dict[str, Any]]:
    """One record per Hydra job folder of the sweep; a job that died before writing one counts as FAILED."""
    job_dirs = sorted(
        (p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()),
        key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30,
    )
    records = []
    for job_dir in job_dirs:
        record = read_json(job_dir / JOB_RECORD)
        records.append(
            record or {"job": job_dir.name, "status": "FAILED", "error": "job ended without a record"}
        )
    return records
