"""`python -m studies.status`: a study's or a sweep's points from the run folders, and bad input."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from records import runfiles
from studies.launch.finish import expand_states
from studies.status import main


def make_sweep(study: Path, name: str, points: dict[str, tuple[str | None, int]]) -> Path:
    """A sweep folder as the launcher leaves it, its run folders in the states given (None: not started)."""
    sweep = study / "multirun" / name
    sweep.mkdir(parents=True)
    jobs = []
    for num, (key, (state, step)) in enumerate(points.items()):
        run_dir = study / "runs" / key
        run_dir.mkdir(parents=True)
        if state is not None:
            runfiles.write_status(run_dir, state, step)
            runfiles.write_events(
                run_dir / runfiles.METRICS,
                [
                    {"step": s, "train/loss": 6.0 - s / 100, "tokens_per_s": 1000.0}
                    for s in range(2, step + 1, 2)
                ],
            )
        jobs.append(
            {
                "num": num,
                "job_id": f"9{num}",
                "log": str(sweep / f"{num}.out"),
                "label": f"granularity={num}",
                "variant": f"moe-G{num}",
                "run_dir": str(run_dir),
                "steps": 20,
                "batch_tokens": 512,
                "host": "elsewhere",
                "pid": None,
            }
        )
    runfiles.write_json(
        sweep / "sweep.json",
        {"study": study.name, "executor": "local", "parent_run_id": "abc", "detach": True, "jobs": jobs},
    )
    return sweep


def test_status_shows_each_points_state_and_step_from_its_run_folder(tmp_path, capsys):
    study = tmp_path / "outputs" / "demo"
    sweep = make_sweep(
        study, "2026-01-01_00-00-00-000001", {"k0": ("DONE", 20), "k1": ("RUNNING", 8), "k2": (None, 0)}
    )
    (study / "multirun" / "2025-old").mkdir()  # a sweep from before sweep.json
    assert main([str(study)]) == 0
    out = capsys.readouterr().out
    assert "1/3 points done; MLflow parent run abc" in out and "detached" in out
    assert re.search(r"granularity=0\s+moe-G0\s+DONE\s+20/20\s+5\.800", out), out
    assert re.search(r"granularity=1\s+moe-G1\s+RUNNING\s+8/20\s+5\.920", out), out
    # launched on another host: its process cannot be seen from here, and it has not started
    assert re.search(r"granularity=2\s+moe-G2\s+QUEUED\s+0/20 .* 92\s+UNKNOWN", out), out
    assert f"end of sweep: not run yet: `python -m studies.launch.finish {sweep}`" in out
    assert "sweep 2025-old: no sweep.json" in out

    assert main([str(sweep)]) == 0  # one sweep folder
    assert "1/3 points done" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "file", "plain_folder"])
def test_status_of_a_path_that_is_no_study_or_sweep_is_one_line_naming_it_exit_2(tmp_path, capsys, case):
    path = tmp_path / "x"
    if case == "file":
        path.write_text("")
    elif case == "plain_folder":
        (path / "sub").mkdir(parents=True)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"studies.status: {path} "), err
    assert {"missing": "does not exist", "file": "is a file", "plain_folder": "neither a study"}[case] in err


def test_sacct_lines_of_pending_arrays_and_requeued_jobs_give_one_state_per_job():
    table = "12_[0-2,5%2]|PENDING\n12_3|RUNNING\n12_4|COMPLETED\n12_4|REQUEUED\n13|CANCELLED by 0\n"
    ids = ["12_0", "12_2", "12_3", "12_4", "12_5", "12_6", "13"]
    assert expand_states(table, ids) == {
        "12_0": "PENDING",
        "12_2": "PENDING",
        "12_3": "RUNNING",
        "12_4": "COMPLETED",
        "12_5": "PENDING",
        "13": "CANCELLED",
    }


def test_status_module_runs_as_a_command(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "studies.status", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip() == f"studies.status: {tmp_path / 'none'} does not exist"
    )
    assert proc.stdout == ""
