"""Keys that used to be accepted although meaningless (issue #25): each is now refused at compose time,
in-process through the validation every mode runs, with the key and value named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from moe.model.config import ModelConfig, replace
from moe.model.validate import validate_model_config
from studies.job.config import load_run_config, register_configs, study_dir_of
from studies.launch.sweep import CONF_DIR, validate_jobs, validate_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.moe.capacity_factor=inf", "model.moe.capacity_factor=inf must be a finite number"),
        ("model.init_std=inf", "model.init_std=inf must be a finite number"),
        ("model.moe.aux_loss_coef=inf", "model.moe.aux_loss_coef=inf must be a finite number"),
        ("data.val_fraction=nan", "data.val_fraction=nan"),
        ("paths.root=''", "paths.root='' must name a folder"),
        ("paths.root='  '", "paths.root='  ' must name a folder"),
    ],
    ids=["capacity_inf", "init_std_inf", "aux_inf", "val_fraction_nan", "root_empty", "root_blank"],
)
def test_a_non_finite_or_empty_value_is_refused_by_its_key_before_anything_runs(compose, override, message):
    with pytest.raises(ValueError) as info:
        load_run_config(compose([override]))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"moe.capacity_factor": float("inf")},
            "model.moe.capacity_factor=inf must be a positive finite number",
        ),
        ({"init_std": float("inf")}, "model.init_std=inf must be a positive finite number"),
        ({"moe.z_loss_coef": float("inf")}, "model.moe.z_loss_coef=inf must be a non-negative finite number"),
    ],
    ids=["capacity_inf", "init_std_inf", "z_loss_inf"],
)
def test_the_model_library_refuses_an_infinite_value_without_hydra(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_model_config(replace(ModelConfig(), **change))


def test_a_study_root_under_the_home_folder_is_expanded_for_the_study_and_hydras_folders(compose):
    cfg = compose(["paths.root='~/moe-studies'"], hydra=True)
    home = Path.home()
    assert study_dir_of("~/moe-studies", "default", Path("/elsewhere")) == home / "moe-studies" / "default"
    assert cfg.hydra.sweep.dir.startswith(f"{home}/moe-studies/default/multirun/")
    assert cfg.hydra.run.dir.startswith(f"{home}/moe-studies/default/single/")


def test_a_baseline_that_names_no_variant_of_the_sweep_or_study_is_refused_before_any_job(shrunk):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ValueError, match=r"study.baseline='nosuch' is no variant of this sweep or study"):
            validate_overrides([[*shrunk, "granularity=1", "study.baseline=nosuch"]])
        good = validate_overrides(
            [
                [*shrunk, "granularity=1", "study.baseline=moe-E8-k2-G1"],
                [*shrunk, "granularity=8", "study.baseline=moe-E8-k2-G1"],
            ]
        )
    assert [p.variant for p in good] == ["moe-E8-k2-G1", "moe-E8-k2-G8"]
    out = Path(shrunk[-1].split("=", 1)[1])
    assert not out.exists(), "validation writes nothing"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hydra.sweeper.max_batch_size=0"], "hydra.sweeper.max_batch_size=0 must be a whole number >= 1"),
        (["hydra.launcher.timeout_min=0"], "hydra.launcher.timeout_min=0 must be a whole number >= 1"),
        (["infra.nodes=2"], "infra.nodes=2 needs a cluster"),
        (["infra=basic", "infra.nodes=2"], "infra.nodes=2 needs a cluster"),
        (["hydra.sweep.dir=/proc/moe-sweep"], "hydra.sweep.dir='/proc/moe-sweep' is not writable"),
    ],
    ids=["batch_zero", "timeout_zero", "nodes_local", "nodes_basic", "sweep_dir_proc"],
)
def test_launcher_and_sweeper_keys_are_refused_before_anything_is_written(
    compose, shrunk, overrides, message
):
    cfg = compose([*shrunk, *overrides], hydra=True)  # as the sweep's start sees it: with the hydra node
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_jobs([(tuple(overrides), cfg)])
    assert not Path(shrunk[-1].split("=", 1)[1]).exists(), "validation writes nothing"
