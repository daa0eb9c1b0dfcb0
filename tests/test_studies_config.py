"""Every config file composes and validates; study presets resolve to matched configs; bad input fails
with a clear error before anything trains."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ValidationError

from moe.data.corpus import FORMAT_VERSION
from moe.model.accounting import count_params, flops_per_token
from moe.model.config import ModelConfig
from moe.model.matched import derive
from studies.job.config import RunConfig, load_run_config, register_configs, schema_of, to_library
from studies.job.execute import run_point
from studies.job.point import build_point
from studies.launch.sweep import jobs_of, sweep_overrides, validate_jobs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUP_FILES = sorted(p.relative_to(CONF_DIR) for p in CONF_DIR.glob("*/*.yaml"))
NEEDS_PATH = {"data/text.yaml", "data/tokens.yaml"}


def point_of(compose, overrides):
    return build_point(load_run_config(compose(overrides)))


@pytest.mark.parametrize("path", GROUP_FILES, ids=str)
def test_every_config_file_composes_and_validates(path, compose, tmp_path):
    group, name = path.parent.name, path.stem
    overrides = [f"{group}={name}"]
    if str(path) in NEEDS_PATH:
        overrides.append(f"data.path={tmp_path}")
        (tmp_path / "meta.json").write_text(
            json.dumps({"version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 512})
        )
    preset = yaml.safe_load((CONF_DIR / path).read_text()) if group == "model" else {}
    pinned = preset.get("vocab_size") or (preset.get("model") or {}).get("vocab_size")
    if pinned:  # a published architecture pins its vocabulary: data with that vocabulary fits it
        overrides.append(f"data.vocab_size={pinned}")
    point = point_of(compose, overrides)
    assert point.plan.steps >= 1
    assert point.model.vocab_size == (512 if name == "tokens" else point.run.data.vocab_size)


@pytest.mark.parametrize("preset", ["mixtral_8x7b", "olmoe_1b_7b"])
def test_a_pinned_vocabulary_that_disagrees_with_the_data_is_refused_not_overwritten(preset, compose):
    with pytest.raises(
        ValueError,
        match=rf"model.vocab_size=\d+ \(model={preset}\) disagrees with the data's vocabulary 2048",
    ):
        point_of(compose, [f"model={preset}", "data.vocab_size=2048"])


def test_a_set_model_vocab_size_is_used_or_refused_never_silently_replaced(compose):
    assert point_of(compose, ["model.vocab_size=2048", "data.vocab_size=2048"]).model.vocab_size == 2048
    with pytest.raises(ValueError, match=r"model.vocab_size=4096 \(model=tiny\) disagrees"):
        point_of(compose, ["model.vocab_size=4096"])


def test_library_dataclasses_round_trip_through_their_schemas():
    for cls in (ModelConfig, RunConfig):
        node = OmegaConf.structured(schema_of(cls))
        assert to_library(cls, node) == cls()


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("model.d_modl=64", ConfigAttributeError),  # misspelt key
        ("tokens=lots", ValidationError),  # wrong type
        ("model.moe.router=expert_chioce", ValidationError),  # value outside a Literal
        ("variant=sparse", ValidationError),
    ],
)
def test_bad_key_type_or_choice_fails_at_compose_time(override, error, compose):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert isinstance(info.value.__cause__, error)


def test_misspelt_key_in_a_yaml_file_fails_at_compose_time(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "model" / "typo.yaml").write_text("name: typo\nd_modle: 64\n")
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match=r"(?s)ConfigKeyError.*Key 'd_modle' not in"):
            hydra_compose("config", overrides=["model=typo"])


def test_unknown_axis_fails_at_compose_time(compose):
    with pytest.raises(ConfigCompositionException, match="granularty"):
        compose(["granularty=8"])


def test_granularity_that_does_not_divide_d_ff_names_the_keys(compose):
    with pytest.raises(ValueError, match=r"granularity=3 does not divide the expert size model.d_ff=256"):
        point_of(compose, ["granularity=3"])


def test_budget_smaller_than_one_batch_is_rejected(compose):
    with pytest.raises(ValueError, match=r"tokens=1000 is smaller than one batch"):
        point_of(compose, ["tokens=1000"])


@pytest.mark.parametrize("override", ["train.tokens=5", "train.seed=1", "model.moe.granularity=8"])
def test_a_value_with_an_axis_has_no_second_key(override, compose):
    with pytest.raises(ConfigCompositionException, match=rf"Could not override '{override.split('=')[0]}'"):
        point_of(compose, [override])


def test_moe_axes_on_a_dense_preset_are_rejected(compose):
    with pytest.raises(ValueError, match=r"is dense"):
        point_of(compose, ["model.moe=null", "granularity=2", "variant=dense"])


@pytest.mark.parametrize("setup", ["missing", "empty_folder", "empty_files"])
def test_bad_data_folder_fails_before_any_output_is_written(setup, compose, shrunk, tmp_path):
    folder = tmp_path / "corpus"
    if setup != "missing":
        folder.mkdir()
    if setup == "empty_files":
        (folder / "a.txt").write_text("")
        (folder / "b.md").write_text("   \n")
    cfg = compose([*shrunk, "data=text", f"data.path={folder}", "data.vocab_size=512"])
    with pytest.raises(ValueError, match=r"data.path"):
        run_point(cfg)
    assert not (tmp_path / "outputs").exists()


def test_granularity_axis_derives_matched_models_with_equal_active_params(compose):
    points = [point_of(compose, [f"granularity={g}"]) for g in (1, 2, 4, 8, 16)]
    base = points[0].model
    for p in points:
        m = p.model.moe
        assert (m.num_experts, m.top_k, m.n_routed, m.k_routed) == (
            8,
            2,
            8 * m.granularity,
            2 * m.granularity,
        )
        assert p.model == derive(base, granularity=m.granularity)
        params = count_params(p.model)
        assert params.active - params.router == count_params(base).active - count_params(base).router
        assert p.variant == f"moe-E8-k2-G{m.granularity}"
    assert len({p.run_key for p in points}) == len(points)


def test_top_k_axis_keeps_active_and_total_expert_width(compose):
    base, k4 = point_of(compose, []).model, point_of(compose, ["top_k=4"]).model
    assert (k4.moe.top_k, k4.moe.num_experts, k4.moe.d_expert) == (4, 16, 128)
    assert count_params(k4).routed_active == count_params(base).routed_active
    assert count_params(k4).routed_total == count_params(base).routed_total


@pytest.mark.parametrize("study", ["granularity", "router_order", "token_budget", "equal_resources"])
def test_every_study_preset_expands_to_valid_points(study, compose):
    cfg = compose([f"study={study}"], hydra=True)
    jobs = sweep_overrides(cfg)
    assert len(jobs) >= 4
    points = [point_of(compose, [f"study={study}", *job]) for job in jobs]
    assert len({p.run_key for p in points}) == len(points), "two sweep points would share a run dir"
    assert {p.run.study.name for p in points} == {study}
    if cfg.study.baseline:
        assert cfg.study.baseline in {p.variant for p in points}


def test_equal_resources_pairs_dense_and_moe_at_equal_total_params_and_compute(compose):
    cfg = compose(["study=equal_resources"], hydra=True)
    points = [point_of(compose, ["study=equal_resources", *job]) for job in sweep_overrides(cfg)]
    for experts in (4, 8, 16):
        pair = {p.variant.split("-")[0]: p for p in points if p.run.experts == experts}
        dense, moe = pair["dense"], pair["moe"]
        pd, pm = count_params(dense.model), count_params(moe.model)
        assert pd.non_embedding == pm.non_embedding - pm.router
        compute_d = flops_per_token(dense.model).train * dense.train.tokens
        compute_m = flops_per_token(moe.model).train * moe.train.tokens
        assert compute_m == pytest.approx(compute_d, rel=moe.train.batch_tokens / moe.train.tokens)
        assert moe.train.tokens > dense.train.tokens == 1_000_000


def test_variant_labels_name_the_router_differences(compose):
    assert point_of(compose, ["variant=dense"]).variant == "dense"
    assert (
        point_of(compose, ["granularity=8", "model.moe.order=before_topk"]).variant
        == "moe-E8-k2-G8-before_topk"
    ), "the presets route with softmax after top-k; the other order is named"
    assert point_of(compose, ["granularity=8"]).variant == "moe-E8-k2-G8"
    assert point_of(compose, ["moe=shared"]).variant == "moe-E8-k2-G1-shared1-1dense"


def test_run_key_ignores_logging_cadence_but_not_the_seed(compose):
    key = point_of(compose, []).run_key
    assert point_of(compose, ["train.log_every=1", "train.progress_every=1"]).run_key == key
    assert point_of(compose, ["seed=1"]).run_key != key


def test_sweep_validation_lists_every_bad_point(compose):
    cfg = compose(hydra=True)
    with read_write(cfg), open_dict(cfg):  # what `-m granularity=1,3,5` puts there
        cfg.hydra.overrides.task = ["granularity=1,3,5"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ValueError, match=r"2 of 3 sweep points are invalid") as info:
            validate_jobs(jobs_of(cfg))
    assert "granularity=3" in str(info.value) and "granularity=5" in str(info.value)


def test_model_presets_grow_from_tiny_to_large(compose):
    sizes = [
        count_params(point_of(compose, [f"model={m}"]).model).total
        for m in ("tiny", "small", "medium", "large")
    ]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    large = point_of(compose, ["model=large"]).model
    assert (large.d_model, large.n_layers) == (768, 12)
    assert dataclasses.asdict(point_of(compose, ["model=small"]).model)["d_model"] == 256
