"""What running a point again does, and who may run it now (docs/lifecycle.md).

`lifecycle(run_dir)` reads status.json and the checkpoints and decides start / resume / skip / retry /
refuse. `owned(run_dir)` makes one process the point's owner for as long as it trains it: an OS file
lock (filelock's flock), which the kernel releases when the owner dies however it dies, so a crashed
owner never blocks a re-run; owner.json beside it says who holds it, for the message a second sweep
prints when it skips the point.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from moe.train.checkpoint import latest_step
from records import runfiles

Action = Literal["start", "resume", "skip", "retry", "refuse"]


@dataclass(frozen=True)
class Lifecycle:
    action: Action
    """start (new), resume (partial run), skip (DONE), retry (FAILED, asked to) or refuse (FAILED)."""
    step: int
    """Checkpoint step training continues from (0: from initialisation)."""
    status: str | None
    """status.json's status, None for a new point."""
    detail: str
    """One line for people: why, and from where."""


class PreviouslyFailedError(RuntimeError):
    """The point FAILED in an earlier run and retrying was not asked for."""


class PointBusyError(RuntimeError):
    """Another live process owns the point (trains it now)."""


def lifecycle(run_dir: Path, retry_failed: bool = False) -> Lifecycle:
    """What running the point of `run_dir` does now; reads status.json and verifies checkpoint digests."""
    status = runfiles.read_status(run_dir)
    if status is None:
        return Lifecycle("start", 0, None, "start")
    state = status["status"]
    if state == "DONE":
        final = (runfiles.read_summary(run_dir) or {}).get("final", {})
        val = final.get("val/loss")
        detail = "skip: DONE" + (f" (final val loss, raw: {val:.4f})" if isinstance(val, float) else "")
        return Lifecycle("skip", status["step"], state, detail)
    step = latest_step(Path(run_dir) / runfiles.CHECKPOINTS) or 0
    where = f"from step {step}" if step else "from step 0 (no checkpoint)"
    if state == "FAILED":
        reason = f"FAILED at step {status.get('step')}: {status.get('reason')}"
        if retry_failed:
            return Lifecycle("retry", step, state, f"retry {where} ({reason})")
        return Lifecycle("refuse", step, state, f"not retried: {reason} (--retry-failed retries it)")
    return Lifecycle("resume", step, state, f"resume {where} ({state} at step {status.get('step')})")


def owner_of(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the point now (owner.json), or None when no live process does."""
    lock = FileLock(Path(run_dir) / "owner.lock", timeout=0)
    try:
        with lock:
            return None
    except Timeout:
        try:
            return runfiles.read_json(Path(run_dir) / runfiles.OWNER) or {}
        except runfiles.RunFileError:
            return {}


def describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    job = f", job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job} (since {since})"


@contextlib.contextmanager
def owned(run_dir: Path, job: str | None = None) -> Iterator[None]:
    """Hold the point for the block; PointBusyError naming the owner if a live process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / "owner.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = owner_of(run_dir) or {}
        raise PointBusyError(
            f"point {run_dir.name} is being trained by {describe_owner(owner)}: skipped here; "
            "run the sweep again once it has finished to pick up its result"
        ) from None
    try:
        runfiles.write_json(
            run_dir / runfiles.OWNER,
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "job": job},
        )
        yield
    finally:
        (run_dir / runfiles.OWNER).unlink(missing_ok=True)
        lock.release()


def plan_row(label: str, variant: str, run_key: str, run_dir: Path, retry_failed: bool) -> tuple[str, ...]:
    """(overrides, variant, run key, what running it does) for the sweep table."""
    owner = owner_of(run_dir) if Path(run_dir).is_dir() else None
    if owner is not None:
        return label, variant, run_key, f"busy: trained now by {describe_owner(owner)} (skipped)"
    try:
        return label, variant, run_key, lifecycle(run_dir, retry_failed).detail
    except runfiles.RunFileError as exc:
        return label, variant, run_key, f"unknown ({exc})"


def format_plan(rows: list[tuple[str, ...]], roles: list[str] | None = None) -> str:
    """The sweep table; with `roles` (studies.launch.branches.roles) a column says which points are cooldown
    branches and which their parents."""
    header = ("overrides", "variant", "run key", "action")
    if roles is not None:
        header = (*header[:3], "branch", header[3])
        rows = [(*row[:3], role, *row[3:]) for row, role in zip(rows, roles, strict=True)]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "Sweep points:\n" + "\n".join(lines)
