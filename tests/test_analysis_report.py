"""Loading from a real MLflow sqlite store and from run folders; report and CLI outputs."""

import json
import os

import pandas as pd
import pytest
from torch.testing import assert_close

from analysis import fit as fit_cli
from analysis.load import load_files, load_mlflow, load_study
from analysis.report import write_report
from analysis.synthetic import SyntheticStudy, write_study

os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
SPEC = SyntheticStudy(name="syn", token_budgets=(40960, 81920), seeds=(0, 1), noise=0.005, failed=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study written to run folders and to a fresh sqlite MLflow store (table creation is slow)."""
    root = tmp_path_factory.mktemp("study") / SPEC.name
    uri = f"sqlite:///{root.parent / 'mlflow.db'}"
    truth = write_study(root, SPEC, tracking_uri=uri)
    return root, uri, truth


def test_mlflow_and_files_load_the_same_runs_and_metrics(study):
    root, uri, _ = study
    a, b = load_mlflow(uri, SPEC.name), load_files(root)
    assert len(a.runs) == len(b.runs) == 2 * 2 * 2
    cols = ["run_key", "variant", "model", "granularity", "tokens", "seed", "acct.batch_tokens"]
    ra, rb = (x.runs[cols].sort_values("run_key").reset_index(drop=True) for x in (a, b))
    pd.testing.assert_frame_equal(ra, rb, check_dtype=False)
    key = ["run_key", "metric", "step"]
    ma, mb = (x.metrics.sort_values(key).reset_index(drop=True) for x in (a, b))
    pd.testing.assert_frame_equal(ma[key], mb[key], check_dtype=False)
    assert_close(ma["value"].to_numpy(), mb["value"].to_numpy(), rtol=1e-12, atol=0)
    assert {"val/loss", "train/loss", "router/top1_mass", "tokens"} <= set(ma["metric"])


def test_failed_runs_are_excluded_and_reported_not_mixed_in(study):
    root, uri, _ = study
    for s in (load_mlflow(uri, SPEC.name), load_files(root)):
        assert len(s.excluded) == 1
        assert s.excluded["status"].iloc[0] == "FAILED"
        assert s.excluded["run_key"].iloc[0] not in set(s.runs["run_key"])
        assert s.excluded["run_key"].iloc[0] not in set(s.metrics["run_key"])


def test_unknown_study_raises_listing_experiments(study):
    _, uri, _ = study
    with pytest.raises(ValueError, match=r"study 'nope' not found .*'syn'"):
        load_mlflow(uri, "nope")
    with pytest.raises(ValueError, match="no runs/ folder"):
        load_study(study[0].parent / "missing")


def test_report_from_mlflow_writes_rows_figures_and_parent_artifacts(study, capsys):
    root, uri, truth = study
    path = write_report(
        root, tracking_uri=uri, study=SPEC.name, parent_run_id=truth["parent_run_id"], n_boot=50
    )
    text = path.read_text()
    assert "| tiny | 81920 | moe-E8-k2-G8 | moe-E8-k2-G1 | measured | 2 |" in text
    assert "## Excluded runs" in text and "FAILED" in text
    assert "chinchilla: not fitted (needs >= 2 distinct params values, have 1)" in text
    for png in ("loss_curves.png", "savings.png", "router.png"):
        assert (path.parent / png).stat().st_size > 1000 and f"]({png})" in text
    sav = pd.read_csv(path.parent / "savings.csv")
    assert len(sav) == 2 and sav["savings_steps"].between(0.15, 0.5).all()  # truth 1/3, short noisy runs
    assert (sav["n_seeds"] == 2).all() and (sav["n_positive"] == 2).all()
    assert len(pd.read_csv(path.parent / "savings_per_seed.csv")) == 4  # 2 budgets x 2 seeds
    assert "moe-E8-k2-G8" in capsys.readouterr().out
    from mlflow.tracking import MlflowClient

    logged = {f.path for f in MlflowClient(uri).list_artifacts(truth["parent_run_id"], "report")}
    assert {"report/report.md", "report/savings.png"} <= logged


def test_report_with_unknown_baseline_raises(study):
    with pytest.raises(ValueError, match="baseline='dense'"):
        write_report(study[0], baseline="dense", n_boot=0)


def test_fit_cli_prints_coefficients_as_json(tmp_path, capsys):
    import numpy as np

    from analysis.laws import law_from_preset

    g = np.meshgrid(np.geomspace(1e7, 1e9, 4), np.geomspace(1e9, 1e11, 4))
    df = pd.DataFrame({"params": g[0].ravel(), "tokens": g[1].ravel()})
    df["loss"] = law_from_preset("hoffmann2022").predict(df)
    df.to_csv(tmp_path / "pts.csv", index=False)
    assert fit_cli.main([str(tmp_path / "pts.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_close(out["coefficients"]["alpha"], 0.34, rtol=1e-3, atol=0)
    assert fit_cli.main([str(tmp_path / "pts.csv"), "--law", "finegrained"]) == 2
    assert "granularity" in capsys.readouterr().err


def test_report_on_runs_too_short_to_fit_still_writes_and_explains(tmp_path):
    # One evaluation per run (a sweep with a tiny budget) and a variant that never reaches the baseline's
    # loss: extrapolation has no curve to fit, so it is "not reached" (not a number) and the report says why.
    spec = SyntheticStudy(
        name="short",
        token_budgets=(10240,),
        seeds=(0,),
        eval_every=10,
        speedups={"moe-E8-k2-G1": 1.0, "moe-E8-k2-G8": 0.7},
    )
    root = tmp_path / spec.name
    write_study(root, spec)
    path = write_report(root, n_boot=10)
    text = path.read_text()
    assert "moe-E8-k2-G8" in text
    savings = pd.read_csv(root / "report" / "savings.csv")
    assert savings["savings_steps"].isna().all() and (savings["status"] == "not reached").all()
    assert savings["note"].str.contains("data point").all()
    assert (savings["savings_bound"] <= 0).all()
    assert (root / "report" / "savings.png").exists()


def test_the_downstream_section_is_replaced_not_repeated():
    from analysis.report_md import with_downstream

    once = with_downstream("# Study report\n\ntext\n", "# Downstream\n\n| G | acc |\n")
    twice = with_downstream(once, "# Downstream\n\n| G | acc2 |\n")
    assert twice.count("## Downstream accuracy") == 1 and "acc2" in twice and "| G | acc |" not in twice
    assert twice.startswith("# Study report\n\ntext")
