"""A copy of the code a sweep launched with, in its sweep folder, and the jobs importing it from there.

A queued SLURM job (or a requeued one) starts hours after `python -m studies.run`; without a copy it
would import whatever the working tree holds by then. At launch the project's packages are copied to
`<sweep dir>/code/`, with the git commit and the uncommitted changes (code.json, code.diff), and the
environment the jobs inherit puts that copy first on their import path (submitit's local executor passes
os.environ to its processes; sbatch exports the submitting environment by default):

    PYTHONPATH=<sweep dir>/code:...   the snapshot's packages shadow the working tree's (and the
                                      editable install's finder, which runs after the path)
    PYTHONSAFEPATH=1                  `python -m` would put the job's working directory first on
                                      sys.path; run from the repository, that would be the working tree
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from moe.files import write_json_atomic
from records.code_record import CODE_DIFF, CODE_DIR, CODE_JSON, git, project_root

PACKAGES = ("moe", "records", "studies", "analysis", "hydra_plugins", "conf")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


@dataclass(frozen=True)
class Snapshot:
    dir: Path
    """<sweep dir>/code: what the jobs import."""
    source: Path
    """The project folder it was copied from."""
    git_sha: str | None
    """HEAD of the source's checkout; None outside a git checkout."""
    dirty: bool
    """Uncommitted changes to tracked files (in code.diff) or untracked files (listed in code.json)."""

    def tags(self) -> dict[str, str]:
        """MLflow tags of the sweep's parent run."""
        return {
            "code_snapshot": str(self.dir),
            "code_git_sha": self.git_sha or "none",
            "code_dirty": str(self.dirty).lower(),
        }


def take_snapshot(sweep_dir: Path, source: Path | None = None) -> Snapshot:
    """Copy the packages of `source` (default: the running project) to <sweep_dir>/code and record
    where they came from: code.json (git sha, dirty, untracked files) and code.diff (`git diff HEAD`)."""
    source = (source or project_root()).resolve()
    dest = Path(sweep_dir).resolve() / CODE_DIR
    dest.mkdir(parents=True, exist_ok=False)
    copied = []
    for name in PACKAGES:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, ignore=IGNORED)
            copied.append(name)
    # The packages' own git state: a checkout at `source` (or above it, e.g. a monorepo)
    sha = git(source, "rev-parse", "HEAD")
    record: dict[str, object] = {"source": str(source), "packages": copied, "taken_at": time.time()}
    dirty = False
    if sha is None:
        record.update(git_sha=None, git=f"none: {source} is not in a git checkout (no sha, no diff)")
    else:
        paths = [p for p in PACKAGES if (source / p).exists()]
        diff = git(source, "diff", "HEAD", "--", *paths) or ""
        untracked = (
            git(source, "ls-files", "--others", "--exclude-standard", "--", *paths) or ""
        ).splitlines()
        (dest / CODE_DIFF).write_text(diff)
        dirty = bool(diff.strip() or untracked)
        record.update(git_sha=sha.strip(), dirty=dirty, diff=CODE_DIFF, untracked=untracked)
    write_json_atomic(dest / CODE_JSON, record)
    return Snapshot(dest, source, record["git_sha"], dirty)  # type: ignore[arg-type]


JOB_ENV = ("PYTHONPATH", "PYTHONSAFEPATH")


def point_jobs_at(snapshot_dir: Path) -> dict[str, str | None]:
    """From now on, processes started from here (submitit's jobs) import the project from the
    snapshot; returns the previous values for restore_env."""
    before = {key: os.environ.get(key) for key in JOB_ENV}
    path = os.pathsep.join(filter(None, [str(snapshot_dir), before["PYTHONPATH"]]))
    os.environ.update(PYTHONPATH=path, PYTHONSAFEPATH="1")
    return before


def restore_env(before: dict[str, str | None]) -> None:
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
