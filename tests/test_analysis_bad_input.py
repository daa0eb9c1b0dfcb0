"""Bad input to the analysis CLIs and loaders: one line on stderr naming the flag or file and the value,
exit code 2, no traceback; a torn last line of metrics.jsonl is dropped and reported. The cases are
listed in docs/analysis.md ("Bad input: analysis")."""

import http.server
import importlib.util
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis import fit as fit_cli
from analysis import report as report_cli
from analysis.laws import NotIdentifiable, fit_chinchilla
from analysis.load import check_tracking_server, load_files
from analysis.synthetic import SyntheticStudy, write_study
from records.runfiles import RunFileError

SPEC = SyntheticStudy(name="bad", token_budgets=(20480,), seeds=(0,))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("written") / SPEC.name
    write_study(root, SPEC)
    return root


@pytest.fixture
def study(written, tmp_path):
    """A fresh copy of the synthetic study, for a test to break."""
    return Path(shutil.copytree(written, tmp_path / SPEC.name))


def _cli(main, args, capsys):
    """(exit code, stderr lines) of a CLI main, argparse's own exits included."""
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _error(main, args, capsys):
    """The one error line of a refused input (exit code 2, no traceback)."""
    rc, err = _cli(main, args, capsys)
    errors = [line for line in err if "error:" in line]
    assert rc == 2 and len(errors) == 1, (rc, err)
    assert not any("Traceback" in line for line in err)
    return errors[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_report_with_a_dead_tracking_server_fails_in_seconds_naming_the_flag(study, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens: connection refused
    t0 = time.monotonic()
    line = _error(report_cli.main, ["--study-dir", str(study), "--tracking-uri", uri], capsys)
    assert time.monotonic() - t0 < 10
    assert f"--tracking-uri {uri}: no MLflow tracking server answers at {uri}/health" in line


def test_tracking_server_that_never_answers_times_out_quickly():
    with socket.socket() as silent:  # accepts connections (the kernel does) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"no MLflow tracking server answers at .*/health within 0.5 s"):
            check_tracking_server(uri, timeout=0.5)
        assert time.monotonic() - t0 < 3


def test_tracking_server_that_answers_health_passes_the_check():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_port}/", timeout=2)  # raises if refused
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_server("sqlite:///nowhere/mlflow.db")  # only http(s) URIs are probed


def test_report_on_a_missing_or_empty_study_dir_says_which(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert _error(report_cli.main, ["--study-dir", str(missing)], capsys).endswith(
        f"--study-dir {missing}: no such directory"
    )
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    for d in (empty, tmp_path):  # runs/ with no run folder, and a directory without runs/
        line = _error(report_cli.main, ["--study-dir", str(d)], capsys)
        assert f"--study-dir {d}: no run folders in {d / 'runs'}" in line


def test_report_on_a_corrupt_summary_json_names_the_file(study, capsys):
    bad = sorted((study / "runs").iterdir())[0] / "summary.json"
    bad.write_text('{"run_key": "x", "status": ')
    line = _error(report_cli.main, ["--study-dir", str(study), "--n-boot", "0"], capsys)
    assert f"{bad} is not valid JSON" in line


def test_report_cli_error_is_one_line_without_traceback_in_a_real_process(study):
    bad = sorted((study / "runs").iterdir())[0] / "summary.json"
    bad.write_text("[1, 2]")
    p = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--study-dir", str(study), "--n-boot", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == f"python -m analysis.report: error: {bad} holds a list, not a JSON object"


def test_report_with_an_unknown_baseline_names_it(study, capsys):
    line = _error(
        report_cli.main, ["--study-dir", str(study), "--baseline", "dense", "--n-boot", "0"], capsys
    )
    assert "no group has baseline='dense'" in line and "moe-E8-k2-G1" in line


def test_report_with_negative_bootstrap_or_window_is_refused(study, capsys):
    line = _error(report_cli.main, ["--study-dir", str(study), "--n-boot", "-5"], capsys)
    assert line == "python -m analysis.report: error: argument --n-boot: -5 must be >= 0"
    line = _error(report_cli.main, ["--study-dir", str(study), "--window", "0"], capsys)
    assert line.endswith("argument --window: 0 must be >= 1")


def test_report_on_a_torn_last_metrics_line_drops_it_and_says_so(study, capsys, caplog):
    metrics = sorted((study / "runs").iterdir())[0] / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 15])  # killed mid-write: the last line is cut
    rc, err = _cli(report_cli.main, ["--study-dir", str(study), "--n-boot", "0"], capsys)
    assert rc == 0
    note = f"{metrics}: torn last line dropped (the run was killed while writing it)"
    assert note in caplog.text  # logged as a warning (stderr under the CLI)
    report = (study / "report" / "report.md").read_text()
    assert f"## Loading notes\n\n- {note}" in report
    assert load_files(study).notes == (note,)


def test_corrupt_metrics_line_before_the_last_is_an_error_naming_file_and_line(study, capsys):
    metrics = sorted((study / "runs").iterdir())[0] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[4] = lines[4][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFileError, match=rf"{metrics}:5 is not JSON"):
        load_files(study)
    assert f"{metrics}:5 is not JSON" in _error(report_cli.main, ["--study-dir", str(study)], capsys)


@pytest.fixture
def csv(tmp_path):
    """Write rows (params, tokens, loss) to a CSV and return its path."""

    def write(rows, name="pts.csv"):
        path = tmp_path / name
        pd.DataFrame(rows, columns=["params", "tokens", "loss"]).to_csv(path, index=False)
        return str(path)

    return write


def test_fit_with_negative_delta_bootstrap_or_bad_ci_is_refused_naming_the_flag(csv, capsys):
    path = csv([(1e8, 2e9, 3.0)] * 10)
    assert _error(fit_cli.main, [path, "--delta", "-1"], capsys) == (
        "python -m analysis.fit: error: argument --delta: -1 must be > 0"
    )
    assert _error(fit_cli.main, [path, "--bootstrap", "-5"], capsys).endswith(
        "argument --bootstrap: -5 must be >= 0"
    )
    assert _error(fit_cli.main, [path, "--ci", "1.5"], capsys).endswith(
        "argument --ci: 1.5 must be in (0, 1)"
    )
    assert _error(fit_cli.main, [path, "--bootstrap", "x"], capsys).endswith(
        "argument --bootstrap: 'x' is not an integer"
    )


def test_fit_law_refuses_negative_delta_and_bootstrap_naming_the_key(csv):
    df = pd.read_csv(csv([(1e8 * (i + 1), 2e9 * (i % 3 + 1), 3.0 - 0.1 * i) for i in range(9)]))
    with pytest.raises(ValueError, match=r"delta=-1.0 must be > 0"):
        fit_chinchilla(df, delta=-1.0)
    with pytest.raises(ValueError, match=r"bootstrap=-5 must be >= 0"):
        fit_chinchilla(df, bootstrap=-5)


def test_fit_on_identical_rows_is_not_identifiable_not_nonsense_coefficients(csv, capsys):
    path = csv([(1e8, 2e9, 3.0)] * 10)
    line = _error(fit_cli.main, [path], capsys)
    assert (
        "law 'chinchilla' is not identifiable from these 10 points (1 distinct params, 1 distinct tokens"
        in line
    )
    assert "pin down only 1 of its 5 parameter combinations" in line


def test_fit_on_points_whose_params_and_tokens_move_together_is_not_identifiable():
    # Two distinct (N, D) points, each repeated: N and D are confounded, the law has a family of optima.
    df = pd.DataFrame(
        {"params": [1e8] * 5 + [2e8] * 5, "tokens": [2e9] * 5 + [4e9] * 5, "loss": [3.0] * 5 + [2.9] * 5}
    )
    with pytest.raises(
        NotIdentifiable, match="2 distinct params, 2 distinct tokens; 2 distinct covariate rows"
    ):
        fit_chinchilla(df)


def test_fit_on_a_missing_empty_or_non_numeric_csv_names_the_file(tmp_path, csv, capsys):
    missing = tmp_path / "none.csv"
    assert _error(fit_cli.main, [str(missing)], capsys).endswith(f"error: {missing}: no such file")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert f"{empty}: not a readable CSV" in _error(fit_cli.main, [str(empty)], capsys)
    path = csv([(1e8, 2e9, 3.0), (2e8, "lots", 2.9)])
    assert f"{path}: column 'tokens' is not a number on line(s) 3" in _error(fit_cli.main, [path], capsys)


def test_report_with_an_unsupported_tracking_uri_scheme_names_it(study, capsys):
    line = _error(report_cli.main, ["--study-dir", str(study), "--tracking-uri", "foo://x"], capsys)
    assert "tracking URI 'foo://x': " in line and "unsupported URI 'foo://x'" in line


def test_analysis_cli_is_no_command_and_says_which_commands_there_are(capsys):
    from analysis import cli

    assert cli.main(["--help"]) == 0 and cli.main([]) == cli.BAD_INPUT
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"python -m {name} " in out
        assert importlib.util.find_spec(name) is not None  # each is a module that exists
