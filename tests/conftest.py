"""Shared fixtures: the real conf/ composed by Hydra and shrunk to seconds, small corpora, a SLURM cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import slurm_script, slurm_unavailable, small_cfg
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from moe.data.config import DataConfig, PreparedData
from moe.data.prepare import prepare_data
from studies.job.config import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Small but real: 2 blocks of width 32 (d_ff 64 splits up to G=8 with 8-aligned fine experts), a
# 512-token BPE on a 200k-character slice of the stdlib corpus, 20 steps of 512 tokens.
SHRINK = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.seq_len=32",
    "data.vocab_size=512",
    "data.max_chars=800000",  # ~280k training tokens: the longest test budget (204,800) fits one epoch
    "data.val_fraction=0.2",
    "train.batch_tokens=512",
    "train.eval_tokens=1024",
    "train.eval_every=10",
    "train.log_every=2",
    "train.progress_every=10",
    "tokens=10240",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A data cache shared by every test of the session, prepared once."""
    cache = tmp_path_factory.mktemp("data-cache")
    prepare_data(DataConfig(vocab_size=512, max_chars=800_000, val_fraction=0.2, cache_dir=str(cache)))
    return cache


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> tuple[PreparedData, Path]:
    """The SMALL corpus (helpers.small_cfg) prepared once for the session: (prepared data, its cache)."""
    cache = tmp_path_factory.mktemp("cache")
    return prepare_data(small_cfg(cache)), cache


@pytest.fixture(scope="module")
def data_cfg(data_cache) -> DataConfig:
    """The data config of the gloo-rank tests (tests/dist_worker.py), on the session's data cache."""
    return DataConfig(vocab_size=512, max_chars=200_000, val_fraction=0.2, cache_dir=str(data_cache))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running SLURM cluster for the module; SLURM_CONF points sbatch/sacct (and submitit) at it."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    up = slurm_script("up.sh", state)
    if up.returncode != 0:
        slurm_script("down.sh", state)
        pytest.fail(f"up.sh failed:\n{up.stdout}\n{up.stderr}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(state / "etc" / "slurm.conf"))
        yield state
    slurm_script("down.sh", state)


@pytest.fixture
def shrunk(data_cache, tmp_path) -> list[str]:
    """Overrides that shrink any config to seconds and send its outputs and MLflow store to tmp_path."""
    return [*SHRINK, f"data.cache_dir={data_cache}", f"paths.root={tmp_path / 'outputs'}"]


def compose_config(overrides: list[str] | None = None, *, hydra: bool = False) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python -m studies.run` would."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=hydra)


@pytest.fixture
def compose():
    """compose(overrides, hydra=False) -> DictConfig of the real conf/."""
    return compose_config


@pytest.fixture
def one_thread():
    """Tiny shapes on a shared 2-core machine: one torch thread avoids spin-wait oversubscription
    (measured ~30x faster steps than 2 threads under load). Restores the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
