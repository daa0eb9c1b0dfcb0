"""Cooldown branches of a warmup-stable-decay run (docs/branches.md; Hägele et al. 2024, arXiv 2405.18392).

A sweep with `branch_from=D` trains its point with tokens=D (the parent) in full, as an ordinary WSD run.
Each point with a smaller budget (a branch) starts from the parent's checkpoint of its branch point (its
own steps less its decay steps, inside the parent's constant phase) and trains only its cooldown. The
identity (studies.job.point.Parent, the branch's plan) is derived with the point; this module does the rest:

    before jobs   check_branches(points): the branches that cannot start, naming both run keys;
                  parents_first(jobs): the order a sweep launches its points in; register(points):
                  each parent's branches.json, the steps it keeps (KeptSteps, moe.train.loop's `keep`);
                  roles(points) and tokens_line(points) for the sweep's table
    in the job    start(point, wait_s): wait for the parent's checkpoint, check it, copy the parent's
                  history up to the branch point and return the state the branch starts from
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from moe.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    is_committed,
    list_checkpoints,
    load_checkpoint,
)
from moe.train.plan import check_resume
from records import runfiles
from studies.job import lifecycle
from studies.job.point import Point

POLL_S = 1.0
"""How often a waiting branch looks for its parent's checkpoint."""
SAY_EVERY_S = 300.0
"""A waiting branch says what it waits for when it starts waiting, then this often."""


class BranchError(ValueError):
    """A branch that cannot start: its parent's checkpoint is missing, unusable or never coming."""


def parent_dir(point: Point) -> Path:
    """The parent's run folder (a branch's only)."""
    return point.study_dir / "runs" / point.parent.run_key


def _names(point: Point) -> str:
    return (
        f"branch {point.run_key} (tokens={point.train.tokens}) of parent {point.parent.run_key} "
        f"(tokens={point.parent.tokens})"
    )


def _committed(folder: Path) -> list[int]:
    """Steps of the checkpoints in `folder` written to the end, newest first."""
    return [step for step, path in list_checkpoints(folder) if is_committed(path)]


def _start_checkpoint(point: Point) -> Path:
    return checkpoint_path(parent_dir(point) / runfiles.CHECKPOINTS, point.plan.branch_step)


def _where(status: dict[str, Any]) -> str:
    return f"{status['status']} at step {status.get('step')}" if status else "not started"


def _never(point: Point) -> str | None:
    """Why the parent will never write the branch's checkpoint (it is past the branch point without
    one), or None."""
    folder, step = parent_dir(point), point.plan.branch_step
    steps = _committed(folder / runfiles.CHECKPOINTS)
    if step in steps:
        return None
    done = (runfiles.read_status(folder) or {}).get("status") == "DONE"
    if not done and not (steps and steps[0] > step):
        return None
    where = "DONE" if done else f"past step {step} (its newest checkpoint is of step {steps[0]})"
    return (
        f"its parent is {where} without a checkpoint of the branch point, step {step}, which it was not "
        f"asked to keep: train tokens={point.run.tokens} as a separate run (without branch_from)"
    )


def _own_progress(point: Point) -> bool:
    """Whether the branch is DONE or has a checkpoint of its own (then it needs its parent no more)."""
    done = (runfiles.read_status(point.run_dir) or {}).get("status") == "DONE"
    return done or bool(_committed(point.run_dir / runfiles.CHECKPOINTS))


def check_branches(points: Sequence[Point]) -> list[tuple[Point, str]]:
    """(branch, one sentence naming both run keys) for each branch of a sweep that cannot start: its
    parent's checkpoint is unusable or of another config, or missing with no parent coming to write it
    (not in this sweep and not trained now by another process, past the branch point, or FAILED)."""
    in_sweep = {p.run_key for p in points}
    bad = []
    for p in points:
        if p.parent is None or _own_progress(p):
            continue
        try:
            if is_committed(_start_checkpoint(p)):
                start_state(p)
                continue
            never = _never(p)
            if never:
                raise BranchError(never)
            status = runfiles.read_status(parent_dir(p)) or {}
            retried = p.parent.run_key in in_sweep and p.run.launch.retry_failed
            if status.get("status") == "FAILED" and not retried:
                raise BranchError(
                    f"its parent FAILED at step {status.get('step')} ({status.get('reason')}) before the "
                    f"branch point, step {p.plan.branch_step} (--retry-failed retries it)"
                )
            live = parent_dir(p).is_dir() and lifecycle.owner_of(parent_dir(p)) is not None
            if p.parent.run_key not in in_sweep and not live:
                raise BranchError(
                    f"its parent's checkpoint of the branch point, step {p.plan.branch_step}, is "
                    f"missing and the parent is not in this sweep: add tokens={p.run.branch_from}"
                )
        except BranchError as exc:
            bad.append((p, str(exc) if str(exc).startswith("branch ") else f"{_names(p)}: {exc}"))
    return bad


def parents_first(jobs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """(overrides, composed config) jobs in sweep order with every branch after every other point (a
    stable sort), so a launcher that runs batches one after another, or one point at a time, starts each
    parent before its branches wait for it."""

    def is_branch(cfg: Any) -> bool:
        try:
            return cfg.get("branch_from") is not None and cfg.get("tokens") != cfg.get("branch_from")
        except AttributeError:  # a composition error: validation reports it
            return False

    return sorted(jobs, key=lambda job: is_branch(job[1]))


def register(points: Iterable[Point]) -> None:
    """Ask each branch's parent to keep the checkpoint of the branch point: runs/<parent key>/branches.json
    holds {branch run key: {"step", "tokens"}} (merged under a lock; the parent reads it every step)."""
    for p in points:
        if p.parent is None:
            continue
        folder = parent_dir(p)
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"step": p.plan.branch_step, "tokens": p.train.tokens}
        with FileLock(folder / "branches.lock"):
            found = runfiles.read_json(folder / runfiles.BRANCHES) or {}
            if found.get(p.run_key) != entry:
                runfiles.write_json(folder / runfiles.BRANCHES, {**found, p.run_key: entry})


class KeptSteps:
    """moe.train.loop's `keep` for a point: whether a branch registered in its branches.json starts at `step`.
    The file is read again when it changes, so a branch registered while the point trains is kept if the
    point has not passed its step yet."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / runfiles.BRANCHES
        self._seen: tuple[int, int, int] | None = None
        self._steps: frozenset[int] = frozenset()

    def __call__(self, step: int) -> bool:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            entries = (runfiles.read_json(self.path) or {}).values()
            self._seen, self._steps = seen, frozenset(int(e["step"]) for e in entries)
        return step in self._steps


def start_state(point: Point) -> dict[str, Any]:
    """The parent's checkpoint of the branch point, checked to be the parent's (its model, optimiser and
    plan); BranchError naming both run keys if it is unusable or of another config."""
    path, step = _start_checkpoint(point), point.plan.branch_step
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise BranchError(
            f"{_names(point)}: its parent's checkpoint of step {step} is unusable ({exc})"
        ) from None
    try:
        check_resume(state, point.parent.plan, point.model, point.run.optim)
    except ValueError as exc:
        raise BranchError(
            f"{_names(point)}: its parent's checkpoint of step {step} was written by a different "
            f"config ({exc})"
        ) from None
    return state


def wait_for_parent(
    point: Point, wait_s: float, poll_s: float = POLL_S, say: Callable[[str], None] = print
) -> None:
    """Return once the parent's checkpoint of the branch point is written; BranchError when it never will
    be (the parent passed the step without it, or FAILED while this branch waited) or after wait_s."""
    step, t0, said = point.plan.branch_step, time.monotonic(), None
    before = runfiles.read_status(parent_dir(point)) or {}
    while not is_committed(_start_checkpoint(point)):
        never = _never(point)
        if never:
            raise BranchError(f"{_names(point)}: {never}")
        status = runfiles.read_status(parent_dir(point)) or {}
        if status.get("status") == "FAILED" and status != before:
            raise BranchError(
                f"{_names(point)}: its parent FAILED at step {status.get('step')} "
                f"({status.get('reason')}) before the branch point, step {step}"
            )
        if time.monotonic() - t0 >= wait_s:
            raise BranchError(
                f"{_names(point)}: its parent has not written its checkpoint of the branch point, "
                f"step {step}, after launch.parent_wait_s={wait_s:g} s (it is {_where(status)}): "
                f"train it (tokens={point.run.branch_from}) and run this point again"
            )
        if said is None or time.monotonic() - said >= SAY_EVERY_S:
            say(
                f"[{point.variant}] {_names(point)}: waiting for the parent's checkpoint of step {step} "
                f"(it is {_where(status)})"
            )
            said = time.monotonic()
        time.sleep(poll_s)


def copy_history(point: Point) -> int:
    """The parent's metrics.jsonl events up to the branch point become the start of the branch's, which is
    then the whole curve a run of its schedule logs (docs/branches.md); returns how many."""
    events = runfiles.read_events(parent_dir(point) / runfiles.METRICS)
    kept = [e for e in events if e["step"] <= point.plan.branch_step]
    runfiles.write_events(point.run_dir / runfiles.METRICS, kept)
    return len(kept)


def start(point: Point, wait_s: float, poll_s: float = POLL_S) -> dict[str, Any]:
    """The state a branch without a checkpoint of its own starts from: its parent's checkpoint of the
    branch point (registered, then waited for while the parent trains), with the parent's history up to
    there copied into the branch's metrics.jsonl."""
    register([point])
    wait_for_parent(point, wait_s, poll_s)
    state = start_state(point)
    copied = copy_history(point)
    print(
        f"[{point.variant}] {_names(point)}: starting from the parent's checkpoint of step "
        f"{point.plan.branch_step} ({copied} metric events of its history copied)",
        flush=True,
    )
    return state


# The sweep's table ---------------------------------------------------------------------------------


def roles(points: Sequence[Point]) -> list[str] | None:
    """Per point: "parent of <n>", "branch of <key> at step <b>" or "-"; None when no point branches."""
    if not any(p.role for p in points):
        return None
    children = [p.parent.run_key for p in points if p.parent is not None]
    out = []
    for p in points:
        if p.parent is not None:
            out.append(f"branch of {p.parent.run_key} at step {p.plan.branch_step}")
        else:
            out.append(f"parent of {children.count(p.run_key)}" if p.role else "-")
    return out


def tokens_trained(points: Sequence[Point]) -> tuple[int, int]:
    """(tokens the points train with branches, where a branch trains only its cooldown, tokens they
    would train as separate runs)."""
    separate = sum(p.plan.steps * p.plan.batch_tokens for p in points)
    shared = sum(p.plan.branch_step * p.plan.batch_tokens for p in points if p.parent is not None)
    return separate - shared, separate


def tokens_line(points: Sequence[Point]) -> str | None:
    """The sweep table's line "tokens trained: <n> with branches vs <m> as separate runs", or None when
    no point branches."""
    if not any(p.role for p in points):
        return None
    with_branches, separate = tokens_trained(points)
    return (
        f"tokens trained: {with_branches:,} with branches vs {separate:,} as separate runs "
        f"({1 - with_branches / separate:.0%} fewer)"
    )
