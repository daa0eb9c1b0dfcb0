"""Step savings on constructed curves with known answers; smoothing; curve fits.
Per-seed rules (not reached, degenerate fits, the t interval): test_analysis_savings_per_seed.py;
wall-clock savings: test_analysis_savings_time.py."""

import numpy as np
import pandas as pd
import pytest
from torch.testing import assert_close

from analysis.curves import fit_loss_curve, steps_to_reach
from analysis.derive import Smoothing, curves, smooth
from analysis.load import load_files
from analysis.savings import pick_baselines, reach_step, step_savings
from analysis.synthetic import SyntheticStudy, write_study

E, A, ALPHA = 2.0, 12.0, 0.5


def _law(t, speedup=1.0):
    return E + A * (speedup * np.asarray(t, dtype=float)) ** -ALPHA


def test_reach_step_interpolates_linearly_in_log_step():
    r = reach_step([10, 100], [3.0, 2.0], 2.5)
    assert not r.extrapolated
    assert_close(r.step, np.sqrt(10 * 100), rtol=1e-12, atol=0)


def test_never_reaching_variant_is_extrapolated_with_its_fitted_curve():
    t = np.arange(10, 1001, 10)
    target = float(_law(4000))  # reached only at step 4000, beyond the logged 1000
    r = reach_step(t, _law(t), target)
    assert r.extrapolated and r.status == "extrapolated" and "fitted curve" in r.note
    assert_close(r.step, 4000.0, rtol=1e-3, atol=0)


def test_target_below_fitted_asymptote_is_not_reached_and_says_why():
    t = np.arange(10, 1001, 10)
    r = reach_step(t, _law(t), E - 0.1)
    assert r.status == "not reached" and not r.reached
    assert r.step == 1000.0  # the last observed step: any crossing lies beyond it
    assert "levels off above the target" in r.note


def test_curve_fit_recovers_power_law_and_inverts():
    t = np.arange(10, 2001, 10)
    fit = fit_loss_curve(t, _law(t))
    assert_close([fit["E"], fit["A"], fit["alpha"]], [E, A, ALPHA], rtol=1e-5, atol=0)
    assert_close(steps_to_reach(fit, float(_law(500))), 500.0, rtol=1e-5, atol=0)


def test_curve_fit_with_too_few_points_raises():
    with pytest.raises(ValueError, match="only 3 data points"):
        fit_loss_curve([1, 2, 3], [3.0, 2.5, 2.2], fit_from_frac=0.0)


def test_ema_keeps_a_constant_curve_constant_and_median_removes_a_spike():
    assert_close(smooth(np.full(20, 3.0), Smoothing("ema", ema=0.9)), np.full(20, 3.0))
    spiky = np.array([3.0, 3.0, 9.0, 3.0, 3.0])
    assert smooth(spiky, Smoothing("median", window=3))[2] == 3.0


def test_loglinear_smoothing_is_exact_on_a_log_linear_curve():
    t = np.arange(1, 50)
    y = 5.0 - 0.3 * np.log(t)
    assert_close(smooth(y, Smoothing("loglinear", window=5), t), y)


def test_invalid_smoothing_names_the_key():
    with pytest.raises(ValueError, match="smoothing.method='gauss'"):
        Smoothing("gauss")


def _study(tmp_path, **kw):
    spec = SyntheticStudy(**kw)
    truth = write_study(tmp_path / spec.name, spec)
    s = load_files(tmp_path / spec.name)
    return s, truth


def test_savings_on_constructed_curves_equal_one_minus_inverse_speedup(tmp_path):
    s, truth = _study(
        tmp_path,
        speedups={"moe-E8-k2-G1": 1.0, "moe-E8-k2-G8": 1.5, "moe-E8-k2-G4": 1.25},
        seeds=(0,),
        token_budgets=(409600,),
    )
    sav = step_savings(curves(s.metrics, s.runs, smoothing=Smoothing("none")), s.runs)
    got = sav.set_index("variant")["savings_steps"]
    for v, want in truth["savings"].items():
        assert_close(got[v], want, rtol=0, atol=2e-3)
    # same batch and FLOPs per token here, so tokens and FLOPs savings equal step savings
    assert_close(sav["savings_tokens"].to_numpy(), sav["savings_steps"].to_numpy())
    assert not sav["extrapolated"].any()


def test_slower_variant_is_extrapolated_and_has_negative_savings(tmp_path):
    s, _ = _study(
        tmp_path, speedups={"moe-E8-k2-G1": 1.0, "moe-E8-k2-G8": 0.8}, seeds=(0,), token_budgets=(409600,)
    )
    sav = step_savings(curves(s.metrics, s.runs, smoothing=Smoothing("none")), s.runs)
    row = sav.iloc[0]
    assert row["extrapolated"] and row["n_extrapolated"] == 1 and row["status"] == "measured"
    assert_close(row["savings_steps"], 1 - 1 / 0.8, rtol=0, atol=5e-3)
    assert row["n_positive"] == 0


def test_noisy_seeds_give_a_t_interval_around_the_true_savings(tmp_path):
    s, truth = _study(tmp_path, noise=0.01, seeds=(0, 1, 2, 3), token_budgets=(409600,), eval_every=5)
    sav = step_savings(curves(s.metrics, s.runs), s.runs, ci=0.95)
    row = sav.iloc[0]
    want = truth["savings"]["moe-E8-k2-G8"]
    assert row["ci_lo"] <= row["savings_steps"] <= row["ci_hi"]
    assert abs(row["savings_steps"] - want) < 0.05
    assert row["ci_hi"] - row["ci_lo"] > 0 and row["n_seeds"] == 4 and row["n_positive"] == 4


def test_missing_baseline_raises_naming_variants(tmp_path):
    s, _ = _study(tmp_path, seeds=(0,))
    with pytest.raises(ValueError, match="baseline='dense'.*moe-E8-k2-G1"):
        pick_baselines(s.runs, "dense")
    no_g1 = s.runs[s.runs["granularity"] != 1]
    with pytest.raises(ValueError, match="granularity=1 variant"):
        step_savings(pd.DataFrame(), no_g1)


def test_target_reached_before_first_evaluation_is_flagged_not_counted_as_observed():
    # The variant is already below the target at its first evaluation: the crossing step is unobserved.
    steps = np.array([10.0, 20.0, 40.0, 80.0])
    loss = 2.0 + 12.0 * steps**-0.5
    reach = reach_step(steps, loss, target=float(loss[0]) + 0.5)
    assert reach.extrapolated
    assert reach.step < steps[0]
