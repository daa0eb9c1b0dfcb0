"""Wall-clock savings from each run's measured `time/train_s`, the tokens/s ratio, and runs recorded
before that metric existed (unknown, never a crash), through the report and the parent-run metrics."""

import re

import numpy as np
import pandas as pd
import pytest
from torch.testing import assert_close

from analysis.derive import curves
from analysis.findings import read_findings
from analysis.load import load_files
from analysis.report import write_report
from analysis.savings import TIME_METRIC, savings_tables, time_at
from analysis.synthetic import SyntheticStudy, write_study
from records import runfiles
from studies.track.study_view import savings_metrics

G1, G8 = "moe-E8-k2-G1", "moe-E8-k2-G8"
SPEC = SyntheticStudy(name="clock", token_budgets=(163840,), seeds=(0, 1, 2), noise=0.002)
SECONDS_PER_STEP = {G1: 0.10, G8: 0.12}  # G=8 steps take 1.2x as long: tokens/s ratio 1/1.2


def add_train_time(study_dir, seconds_per_step: dict[str, float]) -> None:
    """Give every run of these variants a `time/train_s` at each logged step, as moe/train/loop.py logs it."""
    for d in runfiles.run_dirs(study_dir):
        rate = seconds_per_step.get(runfiles.read_summary(d)["variant"])
        if rate is None:
            continue
        events = runfiles.read_events(d / runfiles.METRICS)
        runfiles.write_events(d / runfiles.METRICS, [{**e, TIME_METRIC: e["step"] * rate} for e in events])


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    root = tmp_path_factory.mktemp("clock") / SPEC.name
    truth = write_study(root, SPEC)
    add_train_time(root, SECONDS_PER_STEP)
    return root, truth


def test_slower_steps_give_smaller_time_savings_than_step_savings(timed):
    root, truth = timed
    s = load_files(root)
    t = savings_tables(curves(s.metrics, s.runs), s.runs, metrics=s.metrics)
    seeds = t.per_seed
    # t_variant(reach) / t_baseline(last) = 1.2 * steps_variant / steps_baseline, seed by seed
    want = 1 - 1.2 * seeds["steps_variant"] / seeds["steps_baseline"]
    assert_close(seeds["savings_time"].to_numpy(), want.to_numpy(), rtol=1e-9, atol=0)
    assert_close(seeds["tokens_per_s_ratio"].to_numpy(), np.full(3, 1 / 1.2), rtol=1e-9, atol=0)
    row = t.summary.iloc[0]
    assert abs(row["savings_steps"] - truth["savings"][G8]) < 0.02
    assert 0 < row["savings_time"] < row["savings_steps"] and row["n_time"] == 3
    assert row["savings_time_ci_lo"] <= row["savings_time"] <= row["savings_time_ci_hi"]


def test_train_time_is_linear_in_step_between_logged_points_and_starts_at_zero():
    clock = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 3.0]))
    assert time_at(clock, 5.0) == 0.5 and time_at(clock, 15.0) == 2.0
    assert time_at(clock, 30.0) == 4.5  # an extrapolated crossing: at the run's mean rate, 0.15 s/step


def test_report_sentence_csv_and_parent_metrics_carry_the_time_savings(timed):
    root, _ = timed
    path = write_report(root)
    (finding,) = read_findings(path)
    m = re.search(
        r"in (\d+\.\d)% fewer steps \(90% t-interval \[\d+\.\d%, \d+\.\d%\], 3 of 3 seeds favour G=8; not "
        r"extrapolated\), (\d+\.\d)% fewer FLOPs and (\d+\.\d)% less training time \(90% t-interval "
        r"\[\d+\.\d%, \d+\.\d%\], tokens/s ratio 0\.83\)",
        finding,
    )
    assert m, finding
    sav = pd.read_csv(path.parent / "savings.csv").iloc[0]
    assert_close(float(m.group(3)) / 100, round(sav["savings_time"], 3), rtol=0, atol=1e-9)
    per_seed = pd.read_csv(path.parent / "savings_per_seed.csv")
    assert len(per_seed) == 3 and per_seed["savings_time"].notna().all()
    assert (
        "| savings_time | savings_time_ci_lo | savings_time_ci_hi | tokens_per_s_ratio |" in path.read_text()
    )
    logged = savings_metrics(path.parent / "savings.csv")
    assert_close(logged[f"savings_time/{G8}"], sav["savings_time"], rtol=1e-12, atol=0)
    assert_close(logged[f"tokens_per_s_ratio/{G8}"], 1 / 1.2, rtol=1e-9, atol=0)


def test_runs_without_train_time_have_unknown_wall_clock_savings_not_a_crash(tmp_path):
    spec = SyntheticStudy(name="old", token_budgets=(163840,), seeds=(0, 1))
    write_study(tmp_path / "old", spec)
    add_train_time(tmp_path / "old", {G8: 0.12})  # the baseline was recorded before time/train_s existed
    path = write_report(tmp_path / "old")
    (finding,) = read_findings(path)
    assert "fewer FLOPs and training time unknown (no time/train_s)" in finding
    sav = pd.read_csv(path.parent / "savings.csv").iloc[0]
    assert (
        sav["status"] == "measured" and np.isnan(sav["savings_time"]) and np.isnan(sav["tokens_per_s_ratio"])
    )
    assert "wall-clock savings unknown (no time/train_s)" in sav["note"]
    assert (pd.read_csv(path.parent / "savings_per_seed.csv")["time_note"] == "no time/train_s").all()
    logged = savings_metrics(path.parent / "savings.csv")
    assert f"savings_steps/{G8}" in logged and not any(
        k.startswith(("savings_time", "tokens_per_s")) for k in logged
    )
