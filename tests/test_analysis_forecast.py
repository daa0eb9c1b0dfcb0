"""Forecasts of held-out points: the fit and its interval, the write-once file, the comparison, the report."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from torch.testing import assert_close

from analysis.derive import curves, run_finals
from analysis.forecast import (
    Forecast,
    ForecastRow,
    forecast_path,
    make_forecast,
    read_forecast,
    write_forecast,
)
from analysis.forecast_compare import compare, forecast_summary, observed_losses
from analysis.laws import HOFFMANN_2022, fit_finegrained, law_from_preset
from analysis.load import load_files
from analysis.lse import grid
from analysis.report import write_report
from analysis.synthetic import SyntheticStudy, write_study

TRUE_LAW = law_from_preset("krajewski2024")
SMALL = {"keep_starts": 64, "polish": 2, "workers": 1}  # a few starts: each fit takes well under a second


def _points(params, tokens, granularities, *, noise=0.001, seed=0, law=TRUE_LAW):
    """One run per (N, D, G), its loss drawn from `law` with multiplicative log-normal noise."""
    N, D, G = np.meshgrid(params, tokens, granularities)
    df = pd.DataFrame({"params": N.ravel(), "tokens": D.ravel(), "granularity": G.ravel()})
    df["run_key"] = [f"run{i}" for i in range(len(df))]
    df["loss"] = law.predict(df) * np.exp(np.random.default_rng(seed).normal(0, noise, len(df)))
    return df


def _targets(rows):
    """Held-out points: (run_key, params, tokens, granularity)."""
    t = pd.DataFrame(rows, columns=["run_key", "params", "tokens", "granularity"])
    return t.assign(model="big", seed=0)


FIT_DATA = _points(np.geomspace(1e7, 1e8, 4), np.geomspace(1e9, 1e10, 3), [1.0, 4.0, 16.0])
HELD_OUT = _targets([("big-G4", 2e8, 1e10, 4.0), ("big-G16", 2e8, 3e9, 16.0)])


@pytest.fixture(scope="module")
def forecast():
    return make_forecast(FIT_DATA, HELD_OUT, bootstrap=40, **SMALL)


def _row(key, predicted, lo, hi, G=4.0):
    return ForecastRow(
        run_key=key,
        model="big",
        params=2e8,
        tokens=1e10,
        granularity=G,
        seed=0,
        predicted=predicted,
        lo=lo,
        hi=hi,
    )


def _hand_forecast(rows):
    return Forecast(
        law="finegrained",
        coefficients={"alpha": 0.1},
        intervals={"alpha": (0.09, 0.11)},
        ci=0.9,
        n_bootstrap=10,
        rmse_log=0.01,
        fit_run_keys=("a", "b"),
        flags=(),
        rows=tuple(rows),
        written_at="2025-01-01T00:00:00+00:00",
    )


def test_forecast_of_larger_held_out_model_is_close_to_the_true_law_and_its_interval_covers_it(forecast):
    truth = TRUE_LAW.predict(HELD_OUT)
    predicted = np.array([r.predicted for r in forecast.rows])
    # N = 2e8 is twice the largest fitted model; 0.1% noise per point
    assert_close(predicted, truth, rtol=2e-3, atol=0)
    for r, t in zip(forecast.rows, truth, strict=True):
        assert r.lo < t < r.hi, (r, t)
        assert r.hi - r.lo < 0.01 * r.predicted
    assert [r.run_key for r in forecast.rows] == ["big-G4", "big-G16"]
    assert forecast.fit_run_keys == tuple(FIT_DATA["run_key"]) and forecast.n_bootstrap == 40
    assert forecast.law == "finegrained" and forecast.ci == 0.9 and forecast.flags == ()
    assert_close(forecast.coefficients["alpha"], TRUE_LAW["alpha"], rtol=0.2, atol=0)


def test_predict_interval_needs_a_bootstrap_and_brackets_the_replicates():
    fit = fit_finegrained(FIT_DATA, bootstrap=20, ci=0.9, **SMALL)
    assert len(fit.bootstrap_thetas) == 20 and all(len(t) == len(fit.theta) for t in fit.bootstrap_thetas)
    lo, hi = fit.predict_interval(HELD_OUT, 0.9)
    each = np.array([replace(fit, theta=t).predict(HELD_OUT) for t in fit.bootstrap_thetas])
    assert (each.min(axis=0) <= lo).all() and (lo < hi).all() and (hi <= each.max(axis=0)).all()
    with pytest.raises(ValueError, match="fitted without bootstrap"):
        replace(fit, bootstrap_thetas=()).predict_interval(HELD_OUT, 0.9)


def test_forecast_round_trips_through_json_exactly(forecast):
    assert Forecast.from_json(forecast.to_json()) == forecast
    assert Forecast.from_json(json.loads(json.dumps(forecast.to_json()))) == forecast


def test_write_forecast_never_overwrites_an_existing_forecast(tmp_path, forecast):
    path = forecast_path(tmp_path / "study")
    assert write_forecast(path, forecast) is True
    first = path.read_bytes()
    later = _hand_forecast([_row("other", 3.0, 2.9, 3.1)])
    assert write_forecast(path, later) is False
    assert path.read_bytes() == first
    assert read_forecast(path) == forecast
    assert [p.name for p in path.parent.iterdir()] == ["forecast.json"]  # no temp file left behind


def test_too_few_points_for_the_law_is_refused_naming_the_count():
    few = FIT_DATA.head(5)  # 5 distinct points; the fine-grained law has 7 coefficients
    with pytest.raises(ValueError, match=r"7 coefficients: it needs at least 8 .* fit_data has 5"):
        make_forecast(few, HELD_OUT, bootstrap=10, **SMALL)


@pytest.mark.parametrize(
    "fit_data, targets, message",
    [
        (FIT_DATA, HELD_OUT.iloc[:0], "targets is empty"),
        (FIT_DATA, HELD_OUT.assign(tokens=[1e10, np.nan]), "target big-G16: tokens=nan must be finite"),
        (
            FIT_DATA[FIT_DATA["granularity"] == 4.0],
            HELD_OUT,
            "2 distinct granularity values in fit_data, has 1",
        ),
        (FIT_DATA.drop(columns="loss"), HELD_OUT, r"fit_data lacks columns \['loss'\]"),
        (
            FIT_DATA,
            HELD_OUT.assign(run_key=["run3", "x"]),
            r"held-out run keys are also in fit_data: \['run3'\]",
        ),
    ],
)
def test_unusable_inputs_are_refused_with_a_sentence_naming_what_is_missing(fit_data, targets, message):
    with pytest.raises(ValueError, match=message):
        make_forecast(fit_data, targets, bootstrap=10, **SMALL)


def test_exponent_at_the_edge_of_the_start_grid_is_flagged():
    # Chinchilla law with alpha = 0.5, the top of these starts: the fit lands on the grid's edge.
    law = law_from_preset("hoffmann2022")
    law = replace(law, theta=tuple(law.spec.theta({**HOFFMANN_2022, "alpha": 0.5})))
    data = _points(np.geomspace(1e7, 1e9, 4), np.geomspace(1e9, 1e11, 4), [1.0], noise=1e-4, law=law)
    starts = grid(log_E=(0.0, 0.5), log_A=(5.0, 10.0), alpha=(0.2, 0.5), log_B=(5.0, 10.0), beta=(0.2, 0.5))
    fc = make_forecast(
        data, _targets([("big", 3e9, 1e11, 1.0)]), law="chinchilla", bootstrap=10, starts=starts, workers=1
    )
    assert any(f.startswith("alpha = ") and "grid's upper edge 0.5" in f for f in fc.flags), fc.flags
    assert not any(f.startswith("beta") for f in fc.flags)


def test_compare_marks_a_missing_run_not_finished_and_computes_no_error_for_it():
    fc = _hand_forecast([_row("done", 3.0, 2.9, 3.1), _row("missing", 3.0, 2.9, 3.1)])
    table = compare(fc, pd.DataFrame({"run_key": ["done", "unrelated"], "loss": [3.03, 2.5]}))
    assert list(table["status"]) == ["compared", "not finished"]
    done, missing = table.iloc[0], table.iloc[1]
    assert_close(done["rel_err"], (3.0 - 3.03) / 3.03, rtol=1e-12, atol=0)
    assert_close(done["abs_err"], 0.03, rtol=1e-9, atol=0)
    assert bool(done["inside"])
    assert np.isnan(missing["observed"]) and np.isnan(missing["abs_err"]) and np.isnan(missing["rel_err"])
    assert pd.isna(missing["inside"])


def test_forecast_summary_counts_within_one_percent_and_inside_interval():
    fc = _hand_forecast(
        [
            _row("close-inside", 3.0, 2.9, 3.1),  # observed 3.015: rel err -0.5%, inside
            _row("far-outside", 3.0, 2.99, 3.01),  # observed 3.06: rel err -2%, outside
            _row("close-outside", 3.0, 2.999, 3.001),  # observed 2.973: rel err +0.9%, outside
            _row("never-ran", 3.0, 2.9, 3.1),
        ]
    )
    observed = pd.DataFrame(
        {"run_key": ["close-inside", "far-outside", "close-outside"], "loss": [3.015, 3.06, 2.973]}
    )
    lines = forecast_summary(compare(fc, observed))
    assert lines[0] == "3 of 4 held-out points finished and are compared with their forecast."
    assert lines[1] == "2 of 3 are within 1% relative error."
    assert lines[2] == "1 of 3 are inside their forecast interval."
    assert lines[3].startswith("The largest |relative error| is 1.96% (far-outside")
    assert lines[4] == "1 held-out points never finished: never-ran."


def test_observed_loss_is_the_final_evaluation_where_logged_else_the_smoothed_final():
    per_run = pd.DataFrame({"run_key": ["a", "b"], "final_smooth": [3.0, 3.2], "final_eval": [2.95, np.nan]})
    assert list(observed_losses(per_run)["loss"]) == [2.95, 3.2]
    assert list(observed_losses(per_run.drop(columns="final_eval"))["loss"]) == [3.0, 3.2]


def test_report_compares_an_existing_forecast_with_the_finished_runs(tmp_path):
    spec = SyntheticStudy(name="fc", token_budgets=(40960,), seeds=(0, 1))
    root = tmp_path / spec.name
    write_study(root, spec)
    study = load_files(root)
    key = study.runs["run_key"].iloc[0]
    fc = _hand_forecast([_row(key, 3.0, 2.9, 3.1), _row("held-out-never-ran", 2.8, 2.7, 2.9, G=8.0)])
    assert write_forecast(forecast_path(root), fc)
    path = write_report(root, n_boot=0)

    table = pd.read_csv(root / "report" / "forecast_vs_observed.csv")
    assert list(table["run_key"]) == [key, "held-out-never-ran"]
    assert list(table["status"]) == ["compared", "not finished"]
    finals = run_finals(curves(study.metrics, study.runs), study.runs, study.metrics).set_index("run_key")
    assert_close(table["observed"].iloc[0], finals.loc[key, "final_smooth"], rtol=1e-12, atol=0)
    assert np.isnan(table["rel_err"].iloc[1])
    text = path.read_text()
    assert "## Forecast (written before the held-out runs trained)" in text
    assert "Written 2025-01-01T00:00:00+00:00" in text and "alpha = 0.1 [0.09, 0.11]" in text
    assert "- 1 held-out points never finished: held-out-never-ran." in text
    assert "](forecast.png)" in text and (root / "report" / "forecast.png").stat().st_size > 1000
    assert read_forecast(forecast_path(root)) == fc  # the report reads the forecast, never rewrites it


def test_report_without_a_forecast_has_no_forecast_section(tmp_path):
    spec = SyntheticStudy(name="nofc", token_budgets=(20480,), seeds=(0,))
    write_study(tmp_path / spec.name, spec)
    text = write_report(tmp_path / spec.name, n_boot=0).read_text()
    assert (
        "## Forecast" not in text
        and not (tmp_path / spec.name / "report" / "forecast_vs_observed.csv").exists()
    )
