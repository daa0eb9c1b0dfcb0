"""The report's answers: per-G laws on the study's own runs, compute-optimal G, the gap against G = 1."""

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from torch.testing import assert_close

from analysis.derive import spiking_runs, worst_rise
from analysis.forecast import Forecast, ForecastRow, forecast_path, write_forecast
from analysis.law_answers import answers_section
from analysis.law_report import LawSettings, law_fits_table, law_outcome, law_report
from analysis.laws import FINEGRAINED, law_from_preset
from analysis.load import load_files
from analysis.report import write_report
from analysis.synthetic import SyntheticStudy, write_study

TRUE = {"c": 1.0, "g": 30.0, "gamma": 0.5, "a": 60.0, "alpha": 0.34, "b": 100.0, "beta": 0.28}
TRUE_LAW = replace(law_from_preset("krajewski2024"), coefficients=TRUE, theta=tuple(FINEGRAINED.theta(TRUE)))
SIZES = {"s": 1e6, "m": 1e7, "l": 1e8, "xl": 3e8}  # xl: the held-out size
BUDGETS = (1e7, 1e8, 1e9)
FAST = LawSettings(bootstrap=4, keep_starts=64)  # a few starts and refits: each fit well under 1 s


def _study(extra=lambda df: 0.0, sizes=SIZES, gs=(1, 2, 4, 8), seeds=(0, 1), noise=0.0, seed=0):
    """One run per (size, G, budget, seed) with final loss TRUE_LAW + extra(df) + a per-run normal draw:
    (law_data rows, run_finals rows, runs)."""
    df = pd.DataFrame(
        [
            {"model": m, "params": n, "tokens": d, "granularity": float(g), "seed": s, "variant": f"moe-G{g}"}
            for m, n in sizes.items()
            for g in gs
            for d in BUDGETS
            for s in seeds
        ]
    )
    df["run_key"] = [f"{r.model}-G{r.granularity:g}-{r.tokens:g}-{r.seed}" for r in df.itertuples()]
    rng = np.random.default_rng(seed)
    df["loss"] = TRUE_LAW.predict(df) + extra(df) + rng.normal(0, noise, len(df))
    df["flops"] = 6 * df["params"] * df["tokens"]
    data = df[["run_key", "params", "tokens", "loss", "granularity", "flops"]]
    per_run = df[["run_key", "model", "tokens", "variant", "seed"]].assign(final_smooth=df["loss"])
    runs = df[["run_key", "model", "tokens", "variant", "seed", "granularity"]].assign(experts=8)
    return data, per_run, runs


def _forecast(data, keys):
    rows = [
        ForecastRow(
            run_key=r.run_key,
            model="xl",
            params=r.params,
            tokens=r.tokens,
            granularity=r.granularity,
            seed=0,
            predicted=r.loss,
            lo=r.loss,
            hi=r.loss,
        )
        for r in data[data["run_key"].isin(keys)].itertuples()
    ]
    return Forecast(
        law="finegrained",
        coefficients={"alpha": 0.3},
        intervals={},
        ci=0.9,
        n_bootstrap=10,
        rmse_log=0.01,
        fit_run_keys=("a",),
        flags=(),
        rows=tuple(rows),
        written_at="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture(scope="module")
def exact():
    """The exact law on 3 fitted sizes x G in {1, 2, 4, 8}, G = 16 at two sizes, the largest size held out."""
    data, per_run, runs = _study()
    d16, p16, r16 = _study(sizes={"s": 1e6, "m": 1e7}, gs=(16,))
    data, per_run, runs = (
        pd.concat(x, ignore_index=True) for x in ((data, d16), (per_run, p16), (runs, r16))
    )
    held = data["run_key"][data["run_key"].str.startswith("xl-")]
    rep = law_report(data, per_run, runs, forecast=_forecast(data, held), settings=FAST)
    return data, held, rep


def test_per_g_chinchilla_fits_recover_the_true_exponents(exact):
    _, _, rep = exact
    fitted = [o for o in rep.by_granularity if o.fit is not None]
    assert [o.label for o in fitted] == ["G=1", "G=2", "G=4", "G=8"]
    for o in fitted:
        # at fixed G the fine-grained law is Chinchilla's with A = g / G^gamma + a
        truth = [TRUE["alpha"], TRUE["beta"], TRUE["g"] / o.granularity ** TRUE["gamma"] + TRUE["a"]]
        assert_close([o.fit["alpha"], o.fit["beta"], o.fit["A"]], truth, rtol=0.02, atol=0)
        assert o.rmse < 1e-3 and o.fit.n_bootstrap == FAST.bootstrap
        assert set(o.fit.intervals) == set(o.fit.coefficients)
    assert_close(rep.finegrained.fit["gamma"], TRUE["gamma"], rtol=0.02, atol=0)


def test_a_granularity_with_two_sizes_gets_a_reason_not_a_fit(exact):
    _, _, rep = exact
    g16 = rep.by_granularity[-1]
    assert g16.label == "G=16" and g16.fit is None
    assert g16.reason == "needs >= 3 distinct params values, has 2"
    table = law_fits_table(rep)
    row = table[table["granularity"] == "16"]
    assert len(row) == 1 and row["reason"].iloc[0] == g16.reason and np.isnan(row["value"].iloc[0])
    assert set(table.loc[table["granularity"] == "8", "coefficient"]) == {"E", "A", "alpha", "B", "beta"}


def test_a_fit_with_fewer_distinct_points_than_coefficients_plus_one_is_refused_with_the_count():
    data, _, _ = _study(gs=(1,), seeds=(0,))
    keep = [(1e6, 1e7), (1e6, 1e8), (1e7, 1e8), (1e7, 1e9), (1e8, 1e9)]  # 3 sizes, 3 budgets, 5 points
    data = data[[(n, d) in keep for n, d in zip(data["params"], data["tokens"], strict=True)]]
    out = law_outcome("chinchilla", data, FAST, 1.0)
    assert out.fit is None and out.reason == "its 5 coefficients need 6 distinct points, has 5"


def test_held_out_runs_of_the_forecast_are_left_out_of_every_fit(exact):
    data, held, rep = exact
    assert len(held) == 4 * 3 * 2 and rep.held_out == tuple(sorted(held))
    assert rep.finegrained.n_points == len(data) - len(held) == rep.finegrained.fit.n_points
    assert sum(o.n_points for o in rep.by_granularity) == rep.finegrained.n_points
    # the largest budget trained is the largest fitted run's, not the held-out size's
    assert_close(rep.largest_flops, 6 * SIZES["l"] * BUDGETS[-1], rtol=1e-12, atol=0)


def test_answers_name_the_compute_optimal_g_at_1e18_to_1e21_as_an_extrapolation(exact):
    _, _, rep = exact
    text = "\n".join(answers_section(rep))
    assert text.startswith("## Answers") and "(the forecast's 24 held-out runs left out)" in text
    for budget in ("1e18", "1e19", "1e20", "1e21"):
        assert re.search(rf"at {budget} FLOPs \(extrapolation\) G = \d+ \[\d+-\d+", text), budget
    assert "at 6e17 FLOPs (largest run) G = " in text and "beyond the largest run's 6e17 FLOPs" in text
    assert "Krajewski et al. 2024's law" in text and "compute model: F = " in text
    assert "gamma = 0.5" in text and "G=16: not fitted (needs >= 3 distinct params values, has 2)" in text
    assert [o.optimum.flops for o in rep.optima] == [6e17, 1e18, 1e19, 1e20, 1e21]
    assert all(o.g_lo <= o.optimum.granularity <= o.g_hi for o in rep.optima)


def _gap(extra, noise=0.002):
    """The G=8 sentence of the answers on one size (the laws are refused: no fitting)."""
    data, per_run, runs = _study(extra, sizes={"m": 1e7}, gs=(1, 8), seeds=(0, 1, 2), noise=noise)
    rep = law_report(data, per_run, runs, settings=FAST)
    assert rep.finegrained.fit is None and len(rep.gaps) == 1
    (line,) = [x for x in answers_section(rep) if x.startswith("- **G=8 vs G=1")]
    return rep.gaps[0], line


def test_gap_sentence_says_the_g8_advantage_grows_when_it_grows_with_tokens():
    gap, line = _gap(lambda df: -0.03 * (df["granularity"] > 1) * np.log10(df["tokens"] / 1e6))
    assert_close(np.diff(gap.diff), np.array([-0.03, -0.03]), rtol=0, atol=0.01)  # the law: constant in D
    assert gap.slope < 0 and gap.resolvable
    assert (
        "The G=8 advantage grows with tokens" in line and "resolvably: the intervals at 1e7 and 1e9" in line
    )


def test_gap_sentence_says_the_g8_advantage_shrinks_when_it_shrinks_with_tokens():
    gap, line = _gap(lambda df: -0.03 * (df["granularity"] > 1) * (4 - np.log10(df["tokens"] / 1e6)))
    assert gap.slope > 0 and "The G=8 advantage shrinks with tokens" in line


def test_gap_within_seed_noise_does_not_change_resolvably():
    gap, line = _gap(lambda df: -0.003 * (df["granularity"] > 1) * np.log10(df["tokens"] / 1e6), noise=0.05)
    assert not gap.resolvable
    assert "does not change resolvably with tokens (the intervals at 1e7 and 1e9 tokens overlap)" in line


def test_settings_refuse_a_single_bootstrap_refit_naming_the_key():
    with pytest.raises(ValueError, match=r"laws.bootstrap=1 must be >= 2"):
        LawSettings(bootstrap=1)


def test_report_opens_with_answers_and_writes_law_fits_without_the_held_out_runs(tmp_path):
    spec = SyntheticStudy(name="answers", token_budgets=(40960, 81920), seeds=(0, 1, 2), noise=0.002)
    root = tmp_path / spec.name
    write_study(root, spec)
    runs = load_files(root).runs
    g1 = runs[runs["variant"] == "moe-E8-k2-G1"]["run_key"]
    held = g1.iloc[0]
    data = pd.DataFrame(
        {"run_key": [held], "params": [8e5], "tokens": [4e4], "granularity": [1.0], "loss": [3.0]}
    )
    assert write_forecast(forecast_path(root), _forecast(data, [held]))
    text = write_report(root, law_settings=FAST).read_text()

    assert text.index("## Answers") < text.index("## Findings")
    assert text.split("\n## ")[1].startswith("Answers")  # the first section
    assert "The G=8 advantage shrinks with tokens" in text  # L(t) = E + A (s t)^-alpha: the gap closes
    assert (
        "Not answered: the compute-optimal G (no fine-grained law: needs >= 3 distinct params values" in text
    )
    out = root / "report"
    fits = pd.read_csv(out / "law_fits.csv").set_index("granularity")
    assert fits.loc["1", "n_points"] == len(g1) - 1 and fits.loc["8", "n_points"] == len(g1)
    laws = json.loads((out / "laws.json").read_text())
    assert laws["fit_set"]["held_out"] == [held] and set(laws["chinchilla_by_granularity"]) == {"G=1", "G=8"}
    assert "](law_fit_vs_observed.png)" in text and (out / "law_fit_vs_observed.png").stat().st_size > 1000


def test_worst_rise_measures_a_spike_above_the_earlier_minimum_not_a_falling_curve():
    assert worst_rise([8.0, 6.0, 5.0, 4.5]) == 0.0
    assert worst_rise([8.0, 5.0, 5.7, 4.9, 5.2]) == pytest.approx(0.7)
    curve = pd.DataFrame(
        {"run_key": ["a"] * 4 + ["b"] * 4, "step": [1, 2, 3, 4] * 2, "value": [8, 6, 5, 4.9, 8, 5, 6.2, 5.1]}
    )
    assert (
        list(spiking_runs(curve)) == ["b"]
        and "rose 1.20 above its earlier minimum" in spiking_runs(curve)["b"]
    )


def test_a_flagged_run_enters_no_fit_and_the_answers_say_which_and_why():
    data, per_run, runs = _study(sizes={k: SIZES[k] for k in ("s", "m", "l")}, gs=(1,), seeds=(0,))
    key = data["run_key"].iloc[0]
    spoiled = data.assign(
        loss=np.where(data["run_key"] == key, 9.0, data["loss"])
    )  # a spike would pull the fit
    rep = law_report(spoiled, per_run, runs, settings=FAST, flagged={key: "val loss rose 3.00 above ..."})
    (g1,) = rep.by_granularity
    assert g1.n_points == len(data) - 1 and rep.flagged == ((key, "val loss rose 3.00 above ..."),)
    assert g1.rmse < 1e-3  # the spoiled point did not enter the fit
    assert f"left out as flagged: {key}: val loss rose 3.00 above ..." in "\n".join(answers_section(rep))
