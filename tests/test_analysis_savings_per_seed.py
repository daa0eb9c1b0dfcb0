"""Savings per seed: each seed against its own baseline seed, summarised by a mean, a Student t interval
over seeds and a sign count; a variant that does not reach the target is labelled, never positive and
never a silent NaN; degenerate loss-curve fits are flagged and never used."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats
from torch.testing import assert_close

from analysis import plots
from analysis.curves import (
    ALPHA_RANGE,
    E_MIN,
    degenerate_reason,
    fit_loss_curve,
    is_degenerate,
    steps_to_reach,
)
from analysis.derive import Smoothing, curves
from analysis.findings import finding_sentences
from analysis.laws import CURVE_SPECS, LawFit
from analysis.report_md import fits_section
from analysis.savings import reach_step, savings_tables

G1, G8 = "moe-E8-k2-G1", "moe-E8-k2-G8"
STEPS = np.arange(10, 1001, 10, dtype=float)


def _law(t, speedup=1.0, E=2.0, offset=0.0):
    return E + 12.0 * (speedup * np.asarray(t, dtype=float)) ** -0.5 + offset


def _frames(losses: dict[tuple[str, int], np.ndarray], steps=STEPS):
    """(curve, runs) for runs keyed (variant, seed) with these val losses at `steps`, unsmoothed."""
    runs, rows = [], []
    for (variant, seed), loss in losses.items():
        key = f"{variant}-s{seed}"
        runs.append(
            {
                "run_key": key,
                "model": "tiny",
                "tokens": 1024 * int(steps[-1]),
                "variant": variant,
                "seed": seed,
                "granularity": int(variant.rsplit("G", 1)[1]),
                "acct.batch_tokens": 1024,
                "acct.flops_per_token_train": 6e6,
            }
        )
        rows += [(key, "val/loss", s, v) for s, v in zip(steps, loss, strict=True)]
    runs = pd.DataFrame(runs)
    metrics = pd.DataFrame(rows, columns=["run_key", "metric", "step", "value"])
    return curves(metrics, runs, smoothing=Smoothing("none")), runs


def _tables(losses, **kw):
    curve, runs = _frames(losses)
    return savings_tables(curve, runs, **kw), runs


def test_each_seed_is_measured_against_its_own_baseline_seed():
    # The seed moves both arms' losses by the same offset; each seed has its own speed-up.
    speedups, offsets = {0: 1.5, 1: 1.25, 2: 2.0}, {0: 0.1, 1: -0.05, 2: 0.0}
    losses = {(G1, s): _law(STEPS, 1.0, offset=o) for s, o in offsets.items()}
    losses |= {(G8, s): _law(STEPS, speedups[s], offset=offsets[s]) for s in speedups}
    t, _ = _tables(losses)
    per_seed = t.per_seed.set_index("seed")
    want = {s: 1 - 1 / sp for s, sp in speedups.items()}
    assert_close(
        per_seed["savings_steps"].to_numpy(), np.array([want[s] for s in (0, 1, 2)]), rtol=0, atol=2e-3
    )
    assert (per_seed["reach"] == "observed").all()
    assert_close(
        per_seed["target_loss"].to_numpy(), _law(1000) + np.array([0.1, -0.05, 0.0]), rtol=1e-12, atol=0
    )
    row = t.summary.iloc[0]
    assert row["status"] == "measured" and row["n_seeds"] == 3 and row["n_positive"] == 3
    assert_close(row["savings_steps"], per_seed["savings_steps"].mean(), rtol=1e-12, atol=0)


def test_interval_is_student_t_over_the_per_seed_savings_and_the_sign_count_counts_positive_seeds():
    speedups = {0: 1.5, 1: 1.3, 2: 0.9, 3: 1.1}
    losses = {(G1, s): _law(STEPS) for s in speedups} | {
        (G8, s): _law(STEPS, sp) for s, sp in speedups.items()
    }
    t, _ = _tables(losses, ci=0.9)
    x = t.per_seed["savings_steps"].to_numpy()
    half = stats.t.ppf(0.95, 3) * x.std(ddof=1) / 2
    row = t.summary.iloc[0]
    assert_close([row["ci_lo"], row["ci_hi"]], [x.mean() - half, x.mean() + half], rtol=1e-12, atol=0)
    assert_close(row["savings_steps_sd"], x.std(ddof=1), rtol=1e-12, atol=0)
    assert row["n_positive"] == 3 and row["n_extrapolated"] == 1  # seed 2 (slower) is extrapolated
    assert "3 of 4 seeds favour G=8" in finding_sentences(t.summary, _frames(losses)[1])[0]


def test_variant_whose_fitted_curve_levels_off_above_the_target_is_not_reached_and_never_positive():
    losses = {(G1, 0): _law(STEPS), (G8, 0): _law(STEPS, E=2.5)}  # G8's asymptote lies above G1's loss
    t, runs = _tables(losses)
    seed = t.per_seed.iloc[0]
    assert seed["reach"] == "not reached" and "levels off above the target" in seed["note"]
    assert np.isnan(seed["savings_steps"]) and seed["savings_bound"] <= 0  # unknown, labelled, at most 0
    row = t.summary.iloc[0]
    assert row["status"] == "not reached" and row["n_not_reached"] == 1 and row["n_positive"] == 0
    assert np.isnan(row["savings_steps"]) and "not reached in 1 of 1 seed" in row["note"]
    (finding,) = finding_sentences(t.summary, runs)
    assert (
        finding.startswith("G=8 does not reach G=1's final val loss")
        and "savings unknown, at most 0.0%" in finding
    )


def test_crossing_beyond_the_last_step_is_extrapolated_labelled_and_negative():
    t, runs = _tables({(G1, 0): _law(STEPS), (G8, 0): _law(STEPS, 0.8)})
    seed = t.per_seed.iloc[0]
    assert seed["reach"] == "extrapolated" and seed["steps_variant"] > STEPS[-1]
    assert_close(seed["savings_steps"], 1 - 1 / 0.8, rtol=0, atol=2e-3)
    (finding,) = finding_sentences(t.summary, runs)
    assert (
        "25.0% more steps (no interval, 0 of 1 seed favours G=8; extrapolated by the fitted curve in 1 of 1 seed)"
        in finding
    )


def _plateau(level_from=750.0):
    """A power law that stops falling at `level_from`: its fit crosses lower losses before step 1000."""
    return np.where(STEPS >= level_from, _law(level_from), _law(STEPS))


def test_fit_crossing_before_the_last_observed_step_is_not_reached_not_positive():
    target = float(_law(850))  # the fit (mostly the power law) crosses near 850; the curve never does
    r = reach_step(STEPS, _plateau(), target)
    assert r.status == "not reached" and r.step == STEPS[-1] and "before its last observed step" in r.note
    baseline = _law(STEPS, 0.85)  # ends exactly at the target, at step 1000
    t, _ = _tables({(G1, 0): baseline, (G8, 0): _plateau()})
    seed = t.per_seed.iloc[0]
    assert seed["reach"] == "not reached" and np.isnan(seed["savings_steps"]) and seed["savings_bound"] <= 0


def test_log_linear_curve_gives_a_degenerate_fit_that_is_flagged_and_not_used():
    falls_forever = 5.0 - 0.3 * np.log(STEPS)  # no asymptote: the fit runs E to its bound 0
    fit = fit_loss_curve(STEPS, falls_forever)
    assert is_degenerate(fit) and fit["E"] < E_MIN and "at its bound 0" in degenerate_reason(fit)
    target = float(falls_forever[-1] - 0.1)
    assert (
        np.isfinite(steps_to_reach(fit, target)) and steps_to_reach(fit, target) > STEPS[-1]
    )  # would give a number
    r = reach_step(STEPS, falls_forever, target)
    assert r.status == "not reached" and "degenerate loss-curve fit" in r.note


def _curve_fit(E, A, alpha):
    return LawFit(
        law="curve",
        coefficients={"E": E, "A": A, "alpha": alpha},
        objective=0.0,
        rmse_log=0.0,
        n_points=10,
        n_starts=1,
        n_converged=1,
        delta=1e-3,
        theta=tuple(CURVE_SPECS["curve"].theta({"E": E, "A": A, "alpha": alpha})),
    )


def test_exponent_off_its_range_is_degenerate_and_a_usual_fit_is_not():
    lo, hi = ALPHA_RANGE
    assert "alpha" in degenerate_reason(_curve_fit(2.0, 12.0, hi * 2))
    assert "alpha" in degenerate_reason(_curve_fit(2.0, 12.0, lo / 2))
    assert degenerate_reason(_curve_fit(2.0, 12.0, 0.5)) == ""


def test_degenerate_fit_is_not_drawn_and_the_report_lists_it():
    curve, runs = _frames({(G1, 0): _law(STEPS)})
    good, bad = _curve_fit(2.0, 12.0, 0.5), _curve_fit(1e-6, 12.0, 0.2)
    lines = {}
    for name, fit in (("good", good), ("bad", bad)):
        fig, ax = plt.subplots()
        plots.plot_loss_curves(ax, curve, runs, fits={f"{G1}-s0": fit})
        lines[name] = len(ax.lines)
        plt.close(fig)
    assert lines == {"good": 2, "bad": 1}  # the data always; the dashed fit only when usable
    table = pd.DataFrame(
        [
            {"run_key": "k1", "E": 1e-6, "degenerate": degenerate_reason(bad), "variant": G1, "seed": 0},
            {"run_key": "k2", "E": 2.0, "degenerate": "", "variant": G8, "seed": 0},
        ]
    )
    text = "\n".join(fits_section(table))
    assert (
        "Degenerate fits (1 of 2), not used for savings and not drawn: k1 (moe-E8-k2-G1, seed 0): E=1e-06"
        in text
    )


def test_most_seeds_not_reaching_make_the_summary_not_reached_and_a_minority_counts_at_its_bound():
    never = _law(STEPS, E=2.5)
    base = {(G1, s): _law(STEPS) for s in range(3)}
    two_miss = base | {(G8, 0): _law(STEPS, 1.5), (G8, 1): never, (G8, 2): never}
    row = _tables(two_miss)[0].summary.iloc[0]
    assert row["status"] == "not reached" and np.isnan(row["savings_steps"])
    assert row["note"].startswith("not reached in 2 of 3 seeds (seed 1: its fitted curve levels off")
    one_miss = base | {(G8, 0): _law(STEPS, 1.5), (G8, 1): _law(STEPS, 1.25), (G8, 2): never}
    t, runs = _tables(one_miss)
    row = t.summary.iloc[0]
    assert row["status"] == "measured" and row["n_not_reached"] == 1 and row["n_positive"] == 2
    bound = t.per_seed.set_index("seed").loc[2, "savings_bound"]
    assert bound <= 0 and row["upper_bound"]
    # seed 2 counts at its bound, never left out: leaving it out would favour the variant
    assert_close(row["savings_steps"], (1 - 1 / 1.5 + 1 - 1 / 1.25 + bound) / 3, rtol=0, atol=2e-3)
    (finding,) = finding_sentences(t.summary, runs)
    assert (
        "2 of 3 seeds favour G=8; not extrapolated; not reached in 1 of 3 seeds, counted at its bound"
        in finding
    )
    assert "the savings are upper bounds" in finding


def test_only_seeds_both_arms_ran_are_paired_and_none_is_not_measured():
    losses = {
        (G1, 0): _law(STEPS),
        (G1, 1): _law(STEPS),
        (G8, 1): _law(STEPS, 1.5),
        (G8, 2): _law(STEPS, 1.5),
    }
    row = _tables(losses)[0].summary.iloc[0]
    assert row["n_seeds"] == 1 and row["unpaired"] == "0,2"
    t, runs = _tables({(G1, 0): _law(STEPS), (G8, 1): _law(STEPS, 1.5)})
    row = t.summary.iloc[0]
    assert row["status"] == "not measured" and "no seed both arms ran" in row["note"] and t.per_seed.empty
    assert finding_sentences(t.summary, runs)[0].startswith(
        "G=8 vs G=1: savings not measured (no seed both arms ran"
    )
