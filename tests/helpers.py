"""Helpers shared by the test modules: the project's commands run as a user runs them, metrics read
without their wall-clock numbers, a tracking server's health probe, small prepared corpora, and the
SLURM test cluster.

tests/ is not a package: pytest puts this folder on sys.path (as for conftest), so `from helpers import ...`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import submitit

from moe.data.config import DataConfig, PreparedData

REPO = Path(__file__).resolve().parents[1]


# The project's commands ------------------------------------------------------------------------------


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, then `extra` on top of both."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_module(
    module: str,
    args: Sequence[str],
    cwd: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` to its end and capture its text output; `env` is set on top of
    repo_env() (a PYTHONPATH in it replaces the repository's)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=repo_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_study(
    args: Sequence[str], cwd: Path, *, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python -m studies.run args` to its end (a sweep: "-m" first in `args`), as run_module does."""
    return run_module("studies.run", args, cwd, env=env, timeout=timeout)


def start_study(
    args: Sequence[str], cwd: Path, *, env: Mapping[str, str] | None = None, **popen: Any
) -> subprocess.Popen:
    """Start `python -m studies.run args` without waiting for it; `env` is set on top of repo_env() and
    `popen` (stdout, stderr, text, start_new_session, ...) goes to subprocess.Popen."""
    command = [sys.executable, "-m", "studies.run", *args]
    return subprocess.Popen(command, cwd=cwd, env=repo_env(**(env or {})), **popen)


# Metrics and the tracking server --------------------------------------------------------------------


def without_wall_clock(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One metrics event less its wall-clock numbers (WALL_CLOCK_METRICS), which no two runs share."""
    # Imported here, not above: test_concurrency's job processes import this module and must not wait
    # for torch before their synchronised start.
    from moe.train.evaluation import WALL_CLOCK_METRICS

    return {k: v for k, v in metrics.items() if k not in WALL_CLOCK_METRICS}


def metrics_without_wall_clock(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl file, each less its wall-clock numbers: what a resumed or repeated
    run must reproduce bitwise."""
    return [without_wall_clock(json.loads(line)) for line in path.read_text().splitlines()]


def healthy(url: str) -> bool:
    """Whether the MLflow tracking server at `url` answers its /health endpoint within 2 s."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# Prepared corpora ----------------------------------------------------------------------------------

# Small but real: a 300k-character hash-spread subset of the stdlib corpus with a 512-token BPE.
SMALL = dict(vocab_size=512, val_fraction=0.3, max_chars=300_000)


def small_cfg(cache: Path, **changes: Any) -> DataConfig:
    """The SMALL data config on the cache folder `cache`, with `changes` on top."""
    return DataConfig(cache_dir=str(cache), **{**SMALL, **changes})


def read_meta(prepared: PreparedData) -> dict[str, Any]:
    """The meta.json of a prepared corpus's cache entry."""
    return json.loads((prepared.train_path.parent / "meta.json").read_text())


def shard(prepared: PreparedData, which: str = "val") -> np.ndarray:
    """The token ids of a prepared corpus's val (or "train") shard."""
    path = prepared.val_path if which == "val" else prepared.train_path
    return np.fromfile(path, dtype=np.dtype(prepared.dtype).newbyteorder("<"))


def write_token_folder(folder: Path, train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> None:
    """The docs/data.md recipe for bringing your own tokens, line for line."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    np.asarray(train_ids, dtype=np.dtype(dtype).newbyteorder("<")).tofile(folder / "train.bin")
    np.asarray(val_ids, dtype=np.dtype(dtype).newbyteorder("<")).tofile(folder / "val.bin")
    Path(folder / "meta.json").write_text(
        json.dumps({"version": 1, "dtype": dtype, "vocab_size": vocab_size})
    )


# A real single-node SLURM cluster (scripts/slurm/up.sh) ----------------------------------------------

SLURM_SCRIPTS = REPO / "scripts" / "slurm"


def slurm_unavailable() -> str | None:
    """Why the test cluster cannot run here, or None where it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the test cluster needs root (daemons and jobs run as root)"
    if not (shutil.which("slurmctld") or (shutil.which("apt-get") and shutil.which("dpkg-query"))):
        return "neither SLURM nor apt-get to install it is available"
    return None


def free_port_base(count: int = 4) -> int:
    """First of `count` consecutive free TCP ports on 127.0.0.1 (slurmctld, slurmd, slurmdbd, mariadb)."""
    for base in range(20000 + os.getpid() % 1000 * 20, 60000, 20):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def slurm_script(name: str, state: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run scripts/slurm/`name` (up.sh, down.sh) on the cluster whose state lives in `state`."""
    env = {**os.environ, "MOE_SLURM_PORT": str(free_port_base())}
    return subprocess.run(
        [SLURM_SCRIPTS / name, str(state)], env=env, capture_output=True, text=True, timeout=timeout
    )


def sacct_states(job_id: str, attempts: bool = False) -> list[str]:
    """Accounting states of a job's allocation (every attempt with `attempts`), oldest first."""
    args = ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id] + (["--duplicates"] if attempts else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for_sacct(
    job_id: str, expected: list[str], attempts: bool = False, timeout: float = 30
) -> list[str]:
    """sacct records a job's end a moment after submitit sees its result: poll until it shows `expected`."""
    deadline = time.monotonic() + timeout
    while (states := sacct_states(job_id, attempts)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return states


def slurm_executor(folder: Path, **params: Any) -> submitit.AutoExecutor:
    """A submitit executor for small jobs (1 CPU, 1 GB, an hour) with `params` on top."""
    executor = submitit.AutoExecutor(folder=folder)
    executor.update_parameters(timeout_min=60, cpus_per_task=1, mem_gb=1, **params)
    return executor


# Ranks of a gloo group in local processes ------------------------------------------------------------


def start_ranks(fn: Any, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.start_processes(fn, args, nprocs) with each rank forked from a server that
    imported torch and fn's module once (forkserver): a rank starts in a fraction of a second instead
    of re-importing torch and the test module as spawn does (about 3 s of CPU each)."""
    import torch.multiprocessing as mp

    mp.set_forkserver_preload(["torch", "torch.distributed", fn.__module__])
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")
