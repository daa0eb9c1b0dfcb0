"""Shared fixtures: the real conf/ composed by Hydra and shrunk to seconds, small corpora, a SLURM cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from helpers import run_study, slurm_script, slurm_unavailable, small_cfg
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from moe.data.config import DataConfig, PreparedData
from moe.data.prepare import prepare_data
from studies.job.config import register_configs
from studies.server import ServerSettings, free_port, group_alive, running_server

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
    "train.final_eval_tokens=4096",  # the whole val split by default: most of a tiny point's time
    "train.log_every=2",
    "train.progress_every=10",
    "tokens=10240",
]


def shared_dir(tmp_path_factory, worker_id: str, name: str) -> Path:
    """A folder every xdist worker of this run sees (the session's own under plain pytest): what goes in
    is built once, by whichever worker gets there first, behind moe.data's cache lock."""
    base = tmp_path_factory.getbasetemp()
    folder = (base if worker_id == "master" else base.parent) / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory, worker_id) -> Path:
    """A data cache shared by every test of the run (every worker), prepared once."""
    cache = shared_dir(tmp_path_factory, worker_id, "data-cache")
    prepare_data(DataConfig(vocab_size=512, max_chars=800_000, val_fraction=0.2, cache_dir=str(cache)))
    return cache


def default_data_config(cache: Path) -> DataConfig:
    """The data config of conf/data/stdlib.yaml (the default corpus) on `cache`."""
    fields = yaml.safe_load((CONF_DIR / "data" / "stdlib.yaml").read_text())
    return DataConfig(**{**fields, "cache_dir": str(cache)})


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory, worker_id) -> PreparedData:
    """The default corpus (12M tokens, ~25 s to build), built once for the whole run (every worker)."""
    return prepare_data(default_data_config(shared_dir(tmp_path_factory, worker_id, "default-corpus")))


class ServedSweep(NamedTuple):
    url: str
    """The MLflow server's URL (the sweep's tracking.uri)."""
    tmp: Path
    """The folder the sweep ran in (its outputs under outputs/default)."""
    experiment_id: str
    args: list[str]
    """`python -m studies.run` arguments of the sweep, to run it again from `tmp`."""


@pytest.fixture(scope="session")
def served_sweep(tmp_path_factory, data_cache) -> Iterator[ServedSweep]:
    """A real MLflow server and one finished `granularity=1,8` sweep logged to it, with its report: shared
    by the tests that only read such a sweep (test_server, test_mlflow_ui: xdist group "served_sweep",
    so one worker trains it once; test_ownership reruns it). At the end the server's whole process group
    must be gone."""
    tmp = tmp_path_factory.mktemp("served")
    settings = ServerSettings(
        f"sqlite:///{tmp}/server/mlflow.db", str(tmp / "artifacts"), port=free_port(), workers=1
    )
    with open(tmp / "server.log", "w") as log, running_server(settings, log=log) as server:
        overrides = [
            *SHRINK,
            f"data.cache_dir={data_cache}",
            f"paths.root={tmp / 'outputs'}",
            "granularity=1,8",
            "infra=basic",
            f"tracking.uri={server.url}",
        ]
        proc = run_study(["-m", *overrides], tmp, env={"MOE_THREADS": "1"}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        experiment = MlflowClient(server.url).get_experiment_by_name("default")
        yield ServedSweep(server.url, tmp, experiment.experiment_id, ["-m", *overrides])
    assert not group_alive(server.process.pid), "mlflow server processes survived"


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
