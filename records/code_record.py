"""The code a study ran: the project folder that runs now, the code snapshot's record
(`<sweep dir>/code/code.json` and `code.diff`, written by studies.launch.snapshot) and the git sha,
derived here alone.

A job runs from its sweep's snapshot, outside any checkout and maybe long after the working tree moved
on, so its sha comes from the snapshot's record; elsewhere from the checkout's HEAD.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

CODE_DIR = "code"
CODE_JSON = "code.json"
CODE_DIFF = "code.diff"


def project_root() -> Path:
    """The folder holding the packages that run now (a checkout, or a snapshot)."""
    return Path(__file__).resolve().parents[1]


def git(source: Path, *args: str) -> str | None:
    """`git args` run in `source`: its stdout, or None where git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_sha() -> str:
    """Commit of the code that runs: the snapshot's recorded sha, else the checkout's HEAD, else
    "unknown" (outside a git checkout)."""
    record = project_root() / CODE_JSON
    if record.is_file():
        try:
            return json.loads(record.read_text()).get("git_sha") or "unknown"
        except (OSError, ValueError):
            return "unknown"
    sha = git(project_root(), "rev-parse", "HEAD")
    return (sha or "").strip() or "unknown"
