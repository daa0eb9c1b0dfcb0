"""The many-window final evaluation (val/loss_final) in the analysis: read per run, paired by seed."""

import numpy as np
import pandas as pd
import pytest

from analysis.derive import run_finals
from analysis.paired import paired_differences
from analysis.report_md import final_eval_section

BASE, VAR = "moe-E8-k2-G1", "moe-E8-k2-G8"


def _study(final_eval: dict[str, float]):
    keys = list(final_eval)
    runs = pd.DataFrame(
        {
            "run_key": keys,
            "model": "tiny",
            "tokens": 2_000_000,
            "variant": [BASE, BASE, VAR, VAR],
            "seed": [0, 1, 0, 1],
            "optim.lr": 0.01,
        }
    )
    curve = pd.DataFrame(
        [
            {"run_key": k, "step": s, "value": 5.0, "smooth": 5.0 - s / 1000, "tokens": s, "flops": s}
            for k in keys
            for s in (10, 20)
        ]
    )
    metrics = pd.DataFrame(
        [{"run_key": k, "metric": "val/loss_final", "step": 20, "value": v} for k, v in final_eval.items()]
        + [{"run_key": k, "metric": "val/loss_final_se", "step": 20, "value": 0.009} for k in keys]
        + [{"run_key": k, "metric": "val/loss", "step": 20, "value": 9.9} for k in keys]
    )
    return curve, runs, metrics


def test_paired_differences_on_the_final_evaluation_pair_each_seed_and_show_its_spread():
    curve, runs, metrics = _study({"a": 4.10, "b": 4.00, "c": 3.95, "d": 3.90})
    per_run = run_finals(curve, runs, metrics)
    assert per_run.set_index("run_key")["final_eval"].to_dict() == {
        "a": 4.10,
        "b": 4.00,
        "c": 3.95,
        "d": 3.90,
    }
    row = paired_differences(per_run, {("tiny", 2_000_000): BASE}, column="final_eval").iloc[0]
    assert row["diffs"] == "-0.1500,-0.1000" and row["favour_variant"] == 2
    assert row["mean_diff"] == pytest.approx(-0.125) and row["sd_diff"] == pytest.approx(
        np.std([-0.15, -0.1], ddof=1)
    )
    smooth = paired_differences(per_run, {("tiny", 2_000_000): BASE}).iloc[0]
    assert smooth["mean_diff"] == pytest.approx(0.0), "the smoothed curve is its own column"


def test_runs_without_a_final_evaluation_leave_the_section_out():
    curve, runs, metrics = _study({"a": 4.10, "b": 4.00, "c": 3.95, "d": 3.90})
    per_run = run_finals(curve, runs, metrics[metrics["metric"] == "val/loss"])
    assert per_run["final_eval"].isna().all()
    paired = paired_differences(per_run, {("tiny", 2_000_000): BASE}, column="final_eval")
    assert paired.iloc[0]["n_pairs"] == 0
    assert final_eval_section(per_run, paired) == []
    shown = "\n".join(final_eval_section(run_finals(curve, runs, metrics), paired))
    assert "single_run_se" in shown and "0.009" in shown
