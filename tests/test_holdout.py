"""Held-out points (study.holdout): refused before any job when they cannot be forecast, launched after
every other point, and started only once report/forecast.json holds their forecast, which a re-run keeps."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from helpers import run_study
from mlflow.tracking import MlflowClient

from studies.job.config import StudyConfig
from studies.launch.holdout import fit_rows, is_held_out
from studies.launch.sweep import compose_jobs, validate_jobs

# Four widths x G in {1, 2, 4} x three budgets from one WSD run each; the widest is held out, leaving
# three levels of N, D and G (27 points) for the fine-grained law's 7 coefficients.
GRID = [
    "study=scaling_law",
    "model=tiny",
    "model.d_model=16,32,48,64",
    "granularity=1,2,4",
    "seed=0",
    "branch_from=20480",
    "tokens=5120,10240,20480",
    "study.holdout=['model.d_model=64']",
    "infra=basic",
]


# A small grid for the refusals: validation composes and checks each point, so fewer points, faster tests.
SMALL = [
    "study=scaling_law",
    "model=tiny",
    "model.d_model=16,32,48",
    "granularity=1,2",
    "seed=0",
    "tokens=10240",
    "branch_from=null",
    "study.holdout=['model.d_model=48']",
]


def refusal(shrunk: list[str], tmp_path: Path, *extra: str) -> str:
    jobs = compose_jobs([*shrunk, *SMALL, *extra], multirun=True)
    with pytest.raises(ValueError) as info:
        validate_jobs(jobs, cwd=tmp_path)
    assert not (tmp_path / "outputs").exists(), "validation wrote something"
    return str(info.value)


def test_held_out_points_launch_after_every_other_point_and_its_branches(shrunk):
    jobs = compose_jobs([*shrunk, *GRID], multirun=True)
    held = [is_held_out(cfg) for _, cfg in jobs]
    assert held == [False] * 27 + [True] * 9
    assert all("model.d_model=64" in job for job, _ in jobs[27:])
    # within the held-out group the parents (tokens=20480) still come before their branches
    budgets = [next(o for o in job if o.startswith("tokens=")) for job, _ in jobs[27:]]
    assert budgets == ["tokens=20480"] * 3 + ["tokens=5120", "tokens=10240"] * 3


def test_a_holdout_entry_that_matches_no_point_is_refused_naming_it(shrunk, tmp_path):
    message = refusal(shrunk, tmp_path, "study.holdout=['model.d_model=96']")
    assert "study.holdout entry 'model.d_model=96' matches none of the 6 points" in message


def test_holding_out_every_point_is_refused(shrunk, tmp_path):
    message = refusal(shrunk, tmp_path, "study.holdout=['seed=0']")
    assert "holds out every point: none is left to fit the law on" in message


def test_a_fit_set_smaller_than_the_law_is_refused_before_any_job(shrunk, tmp_path):
    message = refusal(shrunk, tmp_path)
    assert "have 4 distinct (N, D, G) values, fewer than its 7 coefficients + 1" in message
    assert "have 2 model sizes; the finegrained law needs 3 or more" in message
    assert "have 1 token budgets; the finegrained law needs 3 or more" in message
    assert "have 2 granularities; the finegrained law needs 3 or more" in message


def test_holdout_with_detach_is_refused_as_the_forecast_would_come_too_late(shrunk, tmp_path):
    message = refusal(shrunk, tmp_path, "launch.detach=true")
    assert "held-out points would be submitted before their forecast exists" in message


@pytest.mark.parametrize("entry", ["model", "=tiny", "model="])
def test_a_holdout_entry_that_is_not_key_value_is_refused_naming_it(entry):
    with pytest.raises(ValueError, match=f"study.holdout entry '{entry}' must be key=value"):
        StudyConfig(holdout=[entry])


def test_the_fit_set_leaves_out_unfinished_and_spiking_points_saying_why(shrunk, tmp_path):
    from studies.job.config import load_run_config
    from studies.job.point import build_point

    jobs = compose_jobs([*shrunk, *SMALL], multirun=True)
    points = [build_point(load_run_config(cfg), cwd=tmp_path) for _, cfg in jobs[:3]]
    for p, vals in zip(points[:2], ([7.0, 5.0, 4.5], [7.0, 5.0, 5.8]), strict=True):  # the second spikes
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "summary.json").write_text(
            json.dumps({"status": "DONE", "final": {"val/loss_final": vals[-1]}})
        )
        (p.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i, "val/loss": v}) + "\n" for i, v in enumerate(vals))
        )
    data, left_out = fit_rows(points)
    assert list(data["run_key"]) == [points[0].run_key] and list(data["loss"]) == [4.5]
    assert left_out == [
        f"{points[1].run_key}: val loss rose 0.80 above its earlier minimum (> 0.5)",
        f"{points[2].run_key}: not finished",
    ]


@pytest.mark.slow
def test_a_study_forecasts_its_held_out_points_before_they_start_and_a_rerun_keeps_the_forecast(
    shrunk, tmp_path
):
    args = [*shrunk, *GRID, "launch.parent_wait_s=120"]
    first = run_study(args, tmp_path, env={"MOE_THREADS": "1"}, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study = tmp_path / "outputs" / "scaling_law"
    path = study / "report" / "forecast.json"
    forecast = json.loads(path.read_text())
    held = {
        p.name
        for p in (study / "runs").iterdir()
        if json.loads((p / "summary.json").read_text())["params"]["model.d_model"] == 64
    }
    assert {row["run_key"] for row in forecast["rows"]} == held and len(held) == 9
    written = datetime.fromisoformat(forecast["written_at"]).timestamp() * 1000
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "scaling_law"]
    runs = client.search_runs([exp.experiment_id])
    starts = {
        r.data.tags.get("run_key"): r.info.start_time for r in runs if r.data.tags.get("kind") == "point"
    }
    assert all(starts[key] > written for key in held), (written, starts)
    assert all(starts[key] < written for key in set(starts) - held)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert {f"forecast/{key}" for key in held} <= set(parent.data.metrics)
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "forecast")] == [
        "forecast/forecast.json"
    ]
    report = (study / "report" / "report.md").read_text()
    assert "## Forecast (written before the held-out runs trained)" in report
    assert (study / "report" / "forecast_vs_observed.csv").exists()
    before = path.read_bytes()
    second = run_study(args, tmp_path, env={"MOE_THREADS": "1"}, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert path.read_bytes() == before


@pytest.mark.slow
def test_held_out_points_without_a_forecast_never_start_and_the_sweep_exits_non_zero(shrunk, tmp_path):
    from analysis.forecast import Forecast, ForecastRow, forecast_path, write_forecast

    # one G: Chinchilla's 5 coefficients on 3 widths x 3 budgets; an earlier forecast, for another point
    grid = [*GRID[:2], "model.d_model=16,32,48,64", "granularity=1", *GRID[4:]]
    study = tmp_path / "outputs" / "scaling_law"
    row = ForecastRow(
        run_key="0123456789",
        model="tiny",
        params=1e6,
        tokens=2e4,
        granularity=1.0,
        seed=0,
        predicted=4.0,
        lo=3.9,
        hi=4.1,
    )
    earlier = Forecast(
        law="chinchilla",
        coefficients={},
        intervals={},
        ci=0.9,
        n_bootstrap=100,
        rmse_log=0.01,
        fit_run_keys=(),
        flags=(),
        rows=(row,),
        written_at="2026-01-01T00:00:00+00:00",
    )
    forecast_path(study).parent.mkdir(parents=True)
    assert write_forecast(forecast_path(study), earlier)
    before = forecast_path(study).read_bytes()
    run = run_study([*shrunk, *grid], tmp_path, env={"MOE_THREADS": "1"}, timeout=900)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert (
        "Held-out points not started:" in run.stderr and "has no forecast for held-out points" in run.stderr
    )
    # held-out parents have a folder (their branches.json, written before any job) but never a status
    started = [
        json.loads((p / "summary.json").read_text())
        for p in (study / "runs").iterdir()
        if (p / "status.json").exists()
    ]
    assert sorted(r["params"]["model.d_model"] for r in started) == [16] * 3 + [32] * 3 + [48] * 3
    assert all(r["status"] == "DONE" for r in started)
    assert forecast_path(study).read_bytes() == before
