"""Every refusal a sentence, before anything is written, in every mode (issue #14): single runs take the
sweep's validation, --dry-run validates, the launcher's scheduler and the environment are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_study
from hydra import initialize_config_dir

from studies.job.config import register_configs
from studies.launch.sweep import CONF_DIR, validate_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


ENV = {"MOE_JOBS": "1", "MOE_THREADS": "1"}  # what every command of these tests runs with


def nothing_written(root: Path) -> None:
    written = [p for p in root.rglob("*") if "outputs" in p.parts]
    assert not written, written[:5]


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
        (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
        (["optim.beta1=1"], "optim.beta1=1.0 must be in [0, 1)"),
        pytest.param(["optim.lr=nan"], "optim.lr=nan must be a finite number", marks=pytest.mark.slow),
        pytest.param(
            ["tracking.uri=garbage://x"], "tracking.uri='garbage://x' is not usable", marks=pytest.mark.slow
        ),
        pytest.param(["paths.root=/proc/x"], "paths.root='/proc/x' is not writable", marks=pytest.mark.slow),
    ],
    ids=["eps_zero", "negative_decay", "beta1_one", "lr_nan", "garbage_uri", "unwritable_root"],
)
def test_a_single_run_is_validated_like_a_sweep_before_hydra_writes_its_folder(
    shrunk, tmp_path, bad, fragment
):
    proc = run_study([*shrunk, *bad], tmp_path, env=ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("Run not started: ") or "\nRun not started: " in proc.stderr, proc.stderr[
        -2000:
    ]
    assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    nothing_written(tmp_path)


def test_dry_run_of_an_invalid_sweep_exits_non_zero_and_of_a_valid_one_writes_nothing(shrunk, tmp_path):
    bad = run_study(["-m", *shrunk, "granularity=1,3", "--dry-run"], tmp_path, env=ENV)
    assert bad.returncode == 1 and "granularity=3 does not divide" in bad.stderr, bad.stderr[-2000:]
    good = run_study(["-m", *shrunk, "granularity=1,2", "--dry-run"], tmp_path, env=ENV)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "granularity=2  moe-E8-k2-G2" in good.stdout and "start" in good.stdout
    assert "Dry run: 2 points validated; nothing launched." in good.stdout
    nothing_written(tmp_path)


@pytest.mark.slow
def test_dry_run_with_a_misspelt_key_names_it_and_exits_non_zero(shrunk, tmp_path):
    proc = run_study(["-m", *shrunk, "granularty=1,2", "--dry-run"], tmp_path, env=ENV)
    assert proc.returncode == 1 and "granularty" in proc.stderr, proc.stderr[-2000:]
    nothing_written(tmp_path)


def test_infra_slurm_without_sbatch_is_refused_before_anything_is_created(shrunk, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a laptop: no SLURM commands
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", overrides=[*shrunk, "infra=slurm"], return_hydra_config=True)
    from studies.launch.sweep import validate_jobs

    with pytest.raises(ValueError, match=r"infra=slurm but this machine has no `sbatch` on PATH"):
        validate_jobs([(("infra=slurm",), cfg)], cwd=tmp_path)
    nothing_written(tmp_path)


def test_a_duplicated_point_in_one_sweep_is_refused_naming_both(shrunk, tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ValueError, match=r"granularity=1 and granularity=null: the same run \(run key"):
            validate_overrides([[*shrunk, "granularity=1"], [*shrunk, "granularity=null"]], cwd=tmp_path)
    nothing_written(tmp_path)


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_moe_jobs_that_is_not_a_positive_integer_is_named(value, monkeypatch):
    from studies.launch.resources import concurrent_jobs

    monkeypatch.setenv("MOE_JOBS", value)
    with pytest.raises(ValueError, match=rf"MOE_JOBS='{value}' must be a positive integer"):
        concurrent_jobs()


@pytest.mark.slow
def test_a_sweep_whose_start_fails_unexpectedly_exits_1_with_one_sentence_and_launches_nothing(
    compose, shrunk, tmp_path
):
    from studies.job.config import load_run_config
    from studies.job.point import build_point

    # a DONE point's status.json cut mid-write: the start hook cannot decide it (Hydra alone would turn
    # the error into a warning, launch the jobs and exit 0)
    point = build_point(load_run_config(compose([*shrunk, "granularity=2"])), cwd=tmp_path)
    point.run_dir.mkdir(parents=True)
    (point.run_dir / "status.json").write_text('{"status": "DO')
    proc = run_study(["-m", *shrunk, "granularity=2", "infra=basic"], tmp_path, env=ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Sweep not started: RunFileError: ") and "status.json is not valid JSON" in line
    assert not (tmp_path / "outputs" / "default" / "multirun").exists()
    assert not (tmp_path / "outputs" / "default" / "mlflow.db").exists()
