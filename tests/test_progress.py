"""Live sweep progress read from the run folders (issue #15 item 1), as a user sees it in a log."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from records import runfiles
from studies.launch.progress import ProgressView, Tracked, latest_events


def point(tmp_path: Path, name: str, steps: int = 100) -> Tracked:
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    return Tracked(
        f"granularity={name}", f"moe-G{name}", run_dir, steps, f"job{name}", tmp_path / f"{name}.out"
    )


def test_lines_mode_shows_each_points_step_losses_throughput_and_eta_from_its_files(tmp_path):
    a, b = point(tmp_path, "1"), point(tmp_path, "8")
    runfiles.write_status(a.run_dir, "RUNNING", 40)
    runfiles.write_events(
        a.run_dir / runfiles.METRICS,
        [
            {"step": 38, "train/loss": 5.1, "tokens_per_s": 1000.0},
            {"step": 40, "val/loss": 5.25},
        ],
    )
    out = io.StringIO()
    view = ProgressView([a, b], [512, 512], "auto", stream=out, every_s=0.0)
    assert view.mode == "lines", "a stream that is not a terminal gets plain lines"
    view.update(["RUNNING", "PENDING"])
    text = out.getvalue()
    # (100 - 40) steps x 512 tokens at 1000 tokens/s = 30.72 s
    assert "granularity=1  moe-G1  RUNNING  40/100  5.100  5.250  1,000  0:00:30" in text, text
    assert "granularity=8  moe-G8  QUEUED  0/100" in text
    assert "0/2 done, ETA 0:00:30" in text


def test_a_failed_job_is_shown_at_once_with_its_log_and_only_once(tmp_path):
    a = point(tmp_path, "1")
    out = io.StringIO()
    view = ProgressView([a], [512], "lines", stream=out, every_s=3600.0)
    view.update(["RUNNING"])
    view.update(["FAILED"])
    view.update(["FAILED"])
    assert out.getvalue().count(f"job job1 (granularity=1) FAILED: log {a.log}") == 1


def test_a_terminal_that_cannot_be_written_stops_the_view_not_the_sweep(tmp_path, capsys):
    stream = io.StringIO()
    view = ProgressView([point(tmp_path, "1")], [512], "lines", stream=stream, every_s=0.0)
    stream.close()
    view.update(["RUNNING"])  # must not raise
    assert view.mode == "off" and "progress display stopped" in capsys.readouterr().err


def test_live_mode_draws_the_table_with_rich(tmp_path):
    out = io.StringIO()
    a = point(tmp_path, "1")
    runfiles.write_status(a.run_dir, "RUNNING", 7)
    view = ProgressView([a], [512], "live", stream=out)
    view.update(["RUNNING"])
    view.close()
    assert "sweep progress" in out.getvalue() and "7/100" in out.getvalue()


def test_latest_events_reads_only_the_end_of_a_long_log_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    runfiles.write_events(path, [{"step": i, "train/loss": float(i)} for i in range(1, 5001)])
    with open(path, "a") as fh:
        fh.write('{"step": 5001, "train/lo')
    events = latest_events(path, max_bytes=4096)
    assert events[-1] == {"step": 5000, "train/loss": 5000.0} and len(events) < 200


def test_an_unknown_progress_mode_is_refused_at_compose_time(compose):
    with pytest.raises(ConfigCompositionException, match="launch.progress"):
        compose(["launch.progress=fancy"])
