"""The code snapshot of a sweep (studies.launch.snapshot): what is copied and recorded, and what jobs import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from studies.launch.snapshot import PACKAGES, point_jobs_at, restore_env, take_snapshot

REPO = Path(__file__).resolve().parents[1]


def project_copy(dest: Path) -> Path:
    """The project's packages in a folder of their own (a working tree the test may edit)."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def test_snapshot_of_a_checkout_records_its_sha_and_uncommitted_changes(tmp_path):
    tree = project_copy(tmp_path / "tree")
    git(tree, "init", "-q")
    git(tree, "add", ".")
    git(tree, "commit", "-q", "-m", "base")
    (tree / "studies" / "__init__.py").write_text(
        (tree / "studies" / "__init__.py").read_text() + "EDITED = 1\n"
    )
    (tree / "moe" / "new_module.py").write_text("X = 1\n")
    (tree / "studies" / "__pycache__").mkdir(exist_ok=True)

    snap = take_snapshot(tmp_path / "sweep", source=tree)
    code = json.loads((snap.dir / "code.json").read_text())
    assert snap.dir == (tmp_path / "sweep" / "code").resolve()
    assert code["git_sha"] == snap.git_sha == git(tree, "rev-parse", "HEAD").strip()
    assert snap.dirty and code["untracked"] == ["moe/new_module.py"]
    assert "+EDITED = 1" in (snap.dir / "code.diff").read_text()
    assert sorted(p.name for p in snap.dir.iterdir() if p.is_dir()) == sorted(PACKAGES)
    assert "EDITED = 1" in (snap.dir / "studies" / "__init__.py").read_text()
    assert not list(snap.dir.rglob("__pycache__"))
    assert snap.tags() == {"code_snapshot": str(snap.dir), "code_git_sha": snap.git_sha, "code_dirty": "true"}


def test_code_running_from_a_snapshot_reports_the_commit_it_was_taken_from(tmp_path):
    tree = project_copy(tmp_path / "tree")
    git(tree, "init", "-q")
    git(tree, "add", ".")
    git(tree, "commit", "-q", "-m", "base")
    snap = take_snapshot(tmp_path / "sweep", source=tree)
    git(tree, "commit", "-q", "--allow-empty", "-m", "after launch")  # the tree moves on
    probe = "from records.code_record import git_sha; print(git_sha())"
    env = {**os.environ, "PYTHONPATH": str(snap.dir), "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == snap.git_sha != git(tree, "rev-parse", "HEAD").strip()


def test_snapshot_outside_a_checkout_says_there_is_no_git_state(tmp_path):
    tree = project_copy(tmp_path / "tree")
    snap = take_snapshot(tmp_path / "sweep", source=tree)
    code = json.loads((snap.dir / "code.json").read_text())
    assert snap.git_sha is None and code["git_sha"] is None and not snap.dirty
    assert code["git"].startswith("none:") and "not in a git checkout" in code["git"]
    assert not (snap.dir / "code.diff").exists()
    assert snap.tags()["code_git_sha"] == "none"


def test_a_job_started_from_the_working_tree_imports_the_snapshot_and_misses_later_edits(
    tmp_path, monkeypatch
):
    tree = project_copy(tmp_path / "tree")
    monkeypatch.setenv("PYTHONPATH", str(tree))  # the sweep itself runs from the working tree
    snap = take_snapshot(tmp_path / "sweep", source=tree)
    # after launch: the working tree changes (a queued job must not see it)
    (tree / "studies" / "__init__.py").write_text("raise RuntimeError('edited after launch')\n")
    before = point_jobs_at(snap.dir)
    try:
        # a child in the working tree, with the environment jobs inherit: without PYTHONSAFEPATH its cwd
        # would come first on sys.path
        probe = "import moe, studies, hydra_plugins.moe_scaling as h; print(studies.__file__, moe.__file__, h.__file__)"
        proc = subprocess.run(
            [sys.executable, "-c", probe], cwd=tree, capture_output=True, text=True, timeout=120
        )
    finally:
        restore_env(before)
    assert proc.returncode == 0, proc.stderr
    assert all(Path(p).is_relative_to(snap.dir) for p in proc.stdout.split()), proc.stdout
    assert (
        os.environ["PYTHONPATH"] == str(tree) and os.environ.get("PYTHONSAFEPATH") == before["PYTHONSAFEPATH"]
    )
