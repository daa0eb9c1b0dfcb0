"""The overhead benchmark runs end to end on a shrunk config and reports consistent figures."""

from __future__ import annotations

import pytest

from studies.bench import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_reports_overheads_of_the_real_loop(shrunk, capsys):
    result = main(["--steps", "4", "--repeats", "1", *shrunk, "train.eval_every=2", "train.log_every=1"])
    assert result["bare_s"] > 0 and result["full_s"] > 0
    assert 0 < result["mlflow_frac"] < 1
    assert result["overhead_in_run"] > 0  # two evals and four log events were timed
    out = capsys.readouterr().out
    assert "loop overhead:" in out and "MLflow" in out
