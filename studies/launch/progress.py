"""Live progress of a sweep in the terminal that launched it, read from the run folders.

The run folders are the source of truth on a laptop and on a cluster alike (status.json keeps its step
current; metrics.jsonl holds the losses and throughput), so the view works the same for submitit_local
and submitit_slurm and never scrapes a job's stdout. On a terminal, rich redraws one table in place;
elsewhere (CI, nohup, a SLURM log) a plain line per point is printed when its state changes and every
`every_s` seconds at most. A failed job is shown at once with the path to its log.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from records import runfiles

ProgressMode = Literal["auto", "live", "lines", "off"]
TAIL_BYTES = 16384  # enough of metrics.jsonl's end for the latest train and val losses


@dataclass
class Tracked:
    """One job of the sweep, as the progress view knows it."""

    label: str
    """The point's varying overrides."""
    variant: str
    run_dir: Path
    steps: int
    """Total optimiser steps of the point."""
    job_id: str
    log: Path
    """The job's stdout (submitit)."""


@dataclass(frozen=True)
class Snapshot:
    state: str
    step: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float | None


def latest_events(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The last complete events of a metrics.jsonl, reading only its end (it may be long)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            lines = fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line read is likely cut
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line: the writer is mid-line
            continue
    return events


def snapshot(point: Tracked, job_state: str) -> Snapshot:
    try:
        status = runfiles.read_status(point.run_dir) or {}
    except runfiles.RunFileError:
        status = {}
    events = latest_events(point.run_dir / runfiles.METRICS)
    last = lambda key: next((e[key] for e in reversed(events) if key in e), None)  # noqa: E731
    step = max([status.get("step") or 0] + [e.get("step", 0) for e in events])
    state = status.get("status") or ("QUEUED" if job_state in ("PENDING", "UNKNOWN", "") else job_state)
    return Snapshot(state, step, last("train/loss"), last("val/loss"), last("tokens_per_s"))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def eta_s(point: Tracked, snap: Snapshot, batch_tokens: int) -> float | None:
    if not snap.tokens_per_s or snap.state not in ("RUNNING",):
        return None
    return (point.steps - snap.step) * batch_tokens / snap.tokens_per_s


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rows(
    points: Sequence[Tracked], snaps: Sequence[Snapshot], batch_tokens: Sequence[int]
) -> list[tuple[str, ...]]:
    out = []
    for p, s, b in zip(points, snaps, batch_tokens, strict=True):
        out.append(
            (
                p.label,
                p.variant,
                s.state,
                f"{s.step}/{p.steps}",
                _fmt(s.train_loss, ".3f"),
                _fmt(s.val_loss, ".3f"),
                _fmt(s.tokens_per_s, ",.0f"),
                _hms(eta_s(p, s, b)),
            )
        )
    return out


HEADER = ("point", "variant", "state", "step", "train loss", "val loss (raw)", "tokens/s", "ETA")


def plain_table(header: Sequence[str], table_rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell (the lines mode's view, studies.status)."""
    table = [tuple(header), *map(tuple, table_rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


class ProgressView:
    """Polls the run folders and shows them; `close()` leaves the last view on screen."""

    def __init__(
        self,
        points: Sequence[Tracked],
        batch_tokens: Sequence[int],
        mode: ProgressMode = "auto",
        stream: TextIO | None = None,
        every_s: float = 30.0,
    ):
        self.points, self.batch_tokens = list(points), list(batch_tokens)
        self.stream = stream or sys.stdout
        self.every_s = every_s
        if mode == "auto":
            mode = "live" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self._live: Any = None
        self._last_line: dict[int, str] = {}
        self._last_print = 0.0
        self._failed_shown: set[int] = set()
        if self.mode == "live":
            try:
                from rich.console import Console
                from rich.live import Live

                self._live = Live(self._table([]), console=Console(file=self.stream), refresh_per_second=2)
                self._live.start()
            except Exception as exc:  # noqa: BLE001 - a terminal rich cannot drive: plain lines instead
                print(
                    f"live progress unavailable ({type(exc).__name__}: {exc}); printing plain lines",
                    file=self.stream,
                    flush=True,
                )
                self.mode, self._live = "lines", None

    def _table(self, table_rows: list[tuple[str, ...]]):
        from rich.table import Table

        table = Table(*HEADER, title="sweep progress (from the run folders)")
        for row in table_rows:
            table.add_row(*row)
        return table

    def update(self, job_states: Sequence[str]) -> None:
        if self.mode == "off":
            return
        snaps = [snapshot(p, s) for p, s in zip(self.points, job_states, strict=True)]
        table_rows = rows(self.points, snaps, self.batch_tokens)
        for i, (p, s) in enumerate(zip(self.points, job_states, strict=True)):
            if s in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY") and i not in self._failed_shown:
                self._failed_shown.add(i)
                self._say(f"job {p.job_id} ({p.label}) {s}: log {p.log}")
        try:
            if self._live is not None:
                self._live.update(self._table(table_rows))
                return
            now = time.monotonic()
            due = now - self._last_print >= self.every_s
            for i, row in enumerate(table_rows):
                line = "  ".join(row)
                changed = self._last_line.get(i, "").split("  ")[:3] != line.split("  ")[:3]  # state moved
                if changed or due:
                    self._say(f"[progress] {line}")
                    self._last_line[i] = line
            if due:
                self._last_print = now
                done = sum(s.state == "DONE" for s in snaps)
                etas = [
                    e
                    for p, s, b in zip(self.points, snaps, self.batch_tokens, strict=True)
                    if (e := eta_s(p, s, b)) is not None
                ]
                self._say(
                    f"[progress] {done}/{len(snaps)} done" + (f", ETA {_hms(max(etas))}" if etas else "")
                )
        except (OSError, ValueError) as exc:  # a closed or unwritable terminal must not stop the sweep
            self.mode = "off"
            print(f"progress display stopped ({exc})", file=sys.stderr, flush=True)

    def _say(self, line: str) -> None:
        try:
            if self._live is not None:
                self._live.console.print(line)
            else:
                print(line, file=self.stream, flush=True)
        except (OSError, ValueError) as exc:
            self.mode = "off"
            print(f"progress display stopped ({exc})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def watch(
    view: ProgressView, job_states: Callable[[], list[str]], done: Callable[[], bool], poll_s: float = 1.0
) -> None:
    """Refresh `view` until `done()`; states come from the scheduler (submitit), progress from files."""
    try:
        while not done():
            view.update(job_states())
            time.sleep(poll_s)
        view.update(job_states())
    finally:
        view.close()
