"""The raw curves beside every report (curves.csv, runs.csv): what they hold, that a report recomputed from
them alone gives the same tables, and the refusals of bad input (analysis/curves_io.py, docs/outputs.md)."""

import dataclasses
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import report as report_cli
from analysis.curves_io import CORE_METRICS, RUN_COLUMNS, load_curves, write_curves
from analysis.load import load_files
from analysis.report import REPORT_METRICS, write_report
from analysis.synthetic import SyntheticStudy, write_study

MACHINE = {"machine.threads": 1, "machine.torch": "2.5.1+cpu", "machine.cpu_capability": "AVX2"}
SPEC = SyntheticStudy(
    name="raw",
    token_budgets=(20480, 40960),
    seeds=(0, 1, 2),
    noise=0.01,
    seed_offset=0.05,
    failed=1,
    learning_rates={"moe-E8-k2-G8": {1e-3: 0.8, 3e-3: 1.0}},
    params={v: MACHINE for v in ("moe-E8-k2-G1", "moe-E8-k2-G8")},
)
TABLES = ("final_losses.csv", "savings.csv", "paired.csv", "lr_grid.csv")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A study's run folders and the report written from them."""
    root = tmp_path_factory.mktemp("curves") / SPEC.name
    write_study(root, SPEC)
    write_report(root, n_boot=30)
    return root, root / "report"


@pytest.fixture
def copy(written, tmp_path):
    """A fresh copy of the report folder alone (no run folders beside it), for a test to break."""
    return Path(shutil.copytree(written[1], tmp_path / "report"))


def test_curves_csv_has_one_row_per_run_and_step_with_identity_and_metric_columns(written):
    root, report = written
    c = pd.read_csv(report / "curves.csv")
    assert list(c.columns[: len(RUN_COLUMNS) + 1]) == [*RUN_COLUMNS, "step"]
    assert set(CORE_METRICS) <= set(c.columns)
    assert c["time/train_s"].isna().all()  # not logged by these runs: an empty column, not a missing one
    assert not c.duplicated(["run_key", "step"]).any()
    files = load_files(root)
    assert set(c["run_key"]) == set(files.runs["run_key"])  # finished runs only
    evals = files.metrics[files.metrics["metric"] == "val/loss"]
    assert c["val/loss"].notna().sum() == len(evals)
    g1 = c[(c["variant"] == "moe-E8-k2-G1") & (c["budget"] == 40960) & (c["seed"] == 1)]
    assert g1["step"].is_monotonic_increasing and g1["tokens"].iloc[-1] == 40960
    assert g1["optim.lr"].eq(3e-3).all() and g1["granularity"].eq(1).all()


def test_runs_csv_holds_every_run_param_including_machine_facts_and_the_excluded_run(written):
    root, report = written
    r = pd.read_csv(report / "runs.csv", dtype={"run_key": str})
    files = load_files(root)
    assert set(files.runs.columns) <= set(r.columns)
    assert {"acct.batch_tokens", "acct.flops_per_token_train", *MACHINE} <= set(r.columns)
    done = r[r["status"] == "FINISHED"]
    assert len(done) == len(files.runs) and done["machine.cpu_capability"].eq("AVX2").all()
    (failed,) = r[r["status"] != "FINISHED"].itertuples()
    assert failed.status == "FAILED" and "synthetic failure" in failed.reason
    text = pd.read_csv(report / "runs.csv", dtype=str).loc[done.index, "acct.steps"]
    assert text.str.fullmatch(r"\d+").all()  # integers stay integers beside the failed run's empty cell


def test_loaded_curves_give_back_the_runs_metrics_and_exclusions_the_report_read(written):
    root, report = written
    files, back = load_files(root), load_curves(report)
    key = ["run_key", "metric", "step"]
    want = files.metrics[files.metrics["metric"].isin(REPORT_METRICS)].sort_values(key).reset_index(drop=True)
    got = back.metrics.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[key], want[key], check_dtype=False)
    assert (got["value"].to_numpy() == want["value"].to_numpy()).all()  # exact: floats written round-trip
    cols = sorted(files.runs.columns)
    a, b = (s.runs[cols].sort_values("run_key").reset_index(drop=True) for s in (files, back))
    pd.testing.assert_frame_equal(b, a, check_dtype=False)
    pd.testing.assert_frame_equal(back.excluded, files.excluded, check_dtype=False)
    assert back.name == SPEC.name and back.source == str(report)


def test_report_recomputed_from_the_curves_alone_gives_the_same_tables_and_files(written, copy, tmp_path):
    _, report = written
    out = tmp_path / "again"
    assert report_cli.main(["--from-curves", str(copy), "--study-dir", str(out), "--n-boot", "30"]) == 0
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(out / "report" / name), pd.read_csv(report / name))
    assert (out / "report" / "findings.txt").read_text() == (report / "findings.txt").read_text()
    for name in ("curves.csv", "runs.csv"):  # rewriting what was read changes nothing
        assert (out / "report" / name).read_bytes() == (report / name).read_bytes()
    for png in ("loss_curves.png", "savings.png", "router.png"):
        assert (out / "report" / png).stat().st_size > 1000
    assert "## Excluded runs" in (out / "report" / "report.md").read_text()


def test_training_seconds_round_trip_and_a_metric_absent_from_a_run_stays_absent(written, tmp_path):
    root, _ = written
    s = load_files(root)
    keys = sorted(s.runs["run_key"])[:2]  # only two runs logged the training time
    timed = s.metrics[(s.metrics["metric"] == "val/loss") & s.metrics["run_key"].isin(keys)]
    timed = timed.assign(metric="time/train_s", value=timed["step"] * 0.137)
    s = dataclasses.replace(s, metrics=pd.concat([s.metrics, timed], ignore_index=True))
    write_curves(s, tmp_path, metrics=REPORT_METRICS)
    back = load_curves(tmp_path).metrics
    t = back[back["metric"] == "time/train_s"].sort_values(["run_key", "step"])
    assert set(t["run_key"]) == set(keys)
    assert (t["value"].to_numpy() == timed.sort_values(["run_key", "step"])["value"].to_numpy()).all()


def _drop(path):
    path.unlink()


def _write(text):
    return lambda path: path.write_text(text)


def _append(line):
    return lambda path: path.write_text(path.read_text() + line + "\n")


def _edit(fn):
    def apply(path):
        fn(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)

    return apply


def _drop_column(name):
    return _edit(lambda df: df.drop(columns=[name]))


def _set(col, value, row=3):
    def put(df):
        df.loc[row, col] = value
        return df

    return _edit(put)


@pytest.mark.parametrize(
    ("file", "breaks", "says"),
    [
        (
            "curves.csv",
            _drop,
            r"curves\.csv: no such file \(a report folder holds curves\.csv and runs\.csv\)",
        ),
        ("runs.csv", _drop, r"runs\.csv: no such file"),
        ("curves.csv", _write(""), r"curves\.csv: not a readable CSV \(No columns to parse from file\)"),
        (
            "runs.csv",
            _append("x," * 80),
            r"runs\.csv: not a readable CSV \(.*Expected \d+ fields in line 21, saw 81",
        ),
        ("curves.csv", _drop_column("step"), r"curves\.csv: missing column\(s\) \['step'\]"),
        ("curves.csv", _drop_column("val/loss"), r"curves\.csv: missing column\(s\) \['val/loss'\]"),
        ("runs.csv", _drop_column("status"), r"runs\.csv: missing column\(s\) \['status'\]"),
        (
            "curves.csv",
            _set("val/loss", "nan-ish"),
            r"curves\.csv: column 'val/loss' is not a number on line\(s\) 5",
        ),
        ("curves.csv", _set("step", "2.5"), r"curves\.csv: column 'step' is not an integer on line\(s\) 5"),
        (
            "curves.csv",
            _set("run_key", "ghost"),
            r"curves\.csv: run_key\(s\) \['ghost'\] are not finished runs",
        ),
        ("runs.csv", _set("run_key", "", 0), r"runs\.csv: run_key empty or repeated on line\(s\) 2"),
    ],
    ids=[
        "no-curves",
        "no-runs",
        "empty",
        "ragged",
        "no-step",
        "no-val",
        "no-status",
        "text-loss",
        "fractional-step",
        "unknown-run",
        "empty-key",
    ],
)
def test_bad_curve_files_are_refused_in_one_line_naming_the_file(copy, tmp_path, capsys, file, breaks, says):
    breaks(copy / file)
    rc = report_cli.main(["--from-curves", str(copy), "--study-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"{report_cli.PROG}: error: {copy / file}:")
    assert re.search(says, err[0]), err[0]
    assert not (tmp_path / "out" / "report" / "report.md").exists()


def test_from_curves_refuses_a_missing_folder_and_a_tracking_uri_naming_the_flag(tmp_path, capsys):
    gone = tmp_path / "nowhere"
    assert report_cli.main(["--from-curves", str(gone), "--study-dir", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"{report_cli.PROG}: error: --from-curves {gone}: no such directory"
    )
    args = ["--from-curves", str(tmp_path), "--study-dir", str(tmp_path), "--tracking-uri", "sqlite:///x.db"]
    assert report_cli.main(args) == 2
    assert "--from-curves and --tracking-uri are exclusive" in capsys.readouterr().err
