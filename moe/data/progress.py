"""Progress of data preparation (tokenizer training, tokenisation): it runs once per corpus and can take
minutes on a real one, inside a job whose log is often the only thing a user watches.

On a terminal a rich progress bar; elsewhere (job logs, CI, nohup) a start line and an end line with
the count and time, since a bar redrawn with carriage returns is unreadable in a log file.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def interactive() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def stage(description: str, total: int | None = None, unit: str = "docs") -> Iterator[Callable[[int], None]]:
    """`with stage("tokenizing train", len(docs)) as advance: ... advance(n)` shows the stage's progress
    on stderr; yields the function that counts `n` more units done."""
    t0 = time.perf_counter()
    done = [0]
    if interactive():
        columns = [
            TextColumn("data: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int) -> None:
                done[0] += n
                bar.advance(task, n)

            yield advance
        return
    size = f" ({total:,} {unit})" if total is not None else ""
    print(f"data: {description}{size} ...", file=sys.stderr, flush=True)

    def count(n: int) -> None:
        done[0] += n

    yield count
    counted = f"{done[0]:,} {unit} " if done[0] or total is not None else ""
    print(
        f"data: {description} done, {counted}in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True
    )
