"""Checks of the world a point will run in, made before any job starts: writable folders, a usable
MLflow URI, the device, the launcher's scheduler, and the machine's memory. Each raises a ValueError
naming the key and its value; `studies.launch.sweep.validate_point` calls them for sweeps and single runs.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

from moe.parallel.layout import resolve_layout
from moe.parallel.memory import MemoryEstimate, local_memory_bytes
from moe.parallel.memory import check_memory as memory_check
from moe.train.optim import train_precision
from studies.job.point import Point
from studies.track import tracking

HEALTH_TIMEOUT_S = 5.0


def check_writable(key: str, value: str, path: Path) -> None:
    """`path` exists as a folder we can write in, or can be created: tried with a temporary file in its
    nearest existing ancestor, which is removed again (os.access says yes to root on read-only mounts)."""
    ancestor = Path(path).resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{key}={value!r} is not writable: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".moe-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(
            f"{key}={value!r} is not writable: cannot create files in {ancestor} ({exc})"
        ) from None


def check_tracking_uri(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """An explicitly given tracking.uri answers (http(s): GET /health) or can be written (sqlite with an
    absolute path). Any other scheme is refused: MLflow would accept some and write somewhere unexpected."""
    if tracking.is_server(uri):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        raise ValueError(
            f"tracking.uri={uri!r} is unreachable (GET /health: {problem}); start the server "
            "(python -m studies.server) or fix the URI"
        )
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if not path.startswith("/"):
            raise ValueError(
                f"tracking.uri={uri!r} is a relative path, which would put the store wherever the command "
                "runs: use sqlite:////abs/path/mlflow.db, or leave tracking.uri unset for <study dir>/mlflow.db"
            )
        db = Path(path)
        if db.is_dir():
            raise ValueError(f"tracking.uri={uri!r} names a folder; use sqlite:///<folder>/mlflow.db")
        check_writable("tracking.uri", uri, db.parent)
        return
    raise ValueError(
        f"tracking.uri={uri!r} is not usable: use http://host:port (a tracking server), "
        "sqlite:////abs/path/mlflow.db, or leave it unset for <study dir>/mlflow.db"
    )


def check_device(device: str) -> None:
    """train.device=cuda needs CUDA here; refused before a job would start and fail."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device='cuda' but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False): use train.device=auto or cpu"
        )


def _whole(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_launch(hydra: dict) -> None:
    """The launcher's and sweeper's keys and Hydra's output folders, before any of them is used."""
    launcher, sweeper = hydra.get("launcher", {}), hydra.get("sweeper", {})
    batch = sweeper.get("max_batch_size")
    if batch is not None and not _whole(batch, 1):
        raise ValueError(
            f"hydra.sweeper.max_batch_size={batch!r} must be a whole number >= 1 (null: one batch)"
        )
    for key in ("timeout_min", "nodes", "tasks_per_node", "cpus_per_task"):
        if key in launcher and launcher[key] is not None and not _whole(launcher[key], 1):
            raise ValueError(f"hydra.launcher.{key}={launcher[key]!r} must be a whole number >= 1")
    for mode in ("run", "sweep"):
        folder = hydra.get(mode, {}).get("dir")
        if folder:
            check_writable(f"hydra.{mode}.dir", folder, Path(folder))


def check_nodes(nodes: int, launcher_target: str) -> None:
    """Several nodes per point need a cluster's launcher: the others run every task on this machine."""
    if nodes > 1 and launcher_target and not launcher_target.endswith("SlurmLauncher"):
        raise ValueError(
            f"infra.nodes={nodes} needs a cluster: this launcher runs every task on this machine "
            "(use infra.tasks_per_node for several ranks here, or infra=slurm)"
        )


def check_scheduler(launcher_target: str) -> None:
    """infra=slurm needs SLURM's commands; checked before the sweep creates anything."""
    if launcher_target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        raise ValueError(
            "infra=slurm but this machine has no `sbatch` on PATH (not a SLURM login node?): "
            "use infra=local here, or run the command where SLURM is installed"
        )


def check_point_memory(point: Point, launcher: dict) -> MemoryEstimate | None:
    """Refuse a point whose estimated training memory per rank (moe.parallel.memory, docs/memory.md) exceeds
    what a rank can have: this machine's memory locally, hydra.launcher.mem_gb per node on SLURM."""
    train = point.train
    device = (
        "cuda" if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    layout = resolve_layout(point.run.parallel, point.world_size, point.model)
    precision = train_precision(device, train.precision, mode=layout.mode, world=point.world_size)
    shape = {
        "dp_shard": layout.dp,
        "ep": layout.ep,
        "activation_checkpointing": layout.activation_checkpointing,
        "mode": layout.mode,
    }
    tasks = point.run.infra.tasks_per_node
    if str(launcher.get("_target_", "")).endswith("SlurmLauncher") and device == "cpu":
        mem_gb = launcher.get("mem_gb")
        if not mem_gb:  # nothing stated to check against
            return None
        limit, target = int(float(mem_gb) * 2**30) // tasks, f"hydra.launcher.mem_gb={mem_gb}"
    else:
        limit = local_memory_bytes(device) // (tasks if device == "cpu" else 1)
        target = "this machine's memory" if device == "cpu" else f"{torch.cuda.get_device_name()}'s memory"
    if tasks > 1 and device == "cpu":
        target += f" / infra.tasks_per_node={tasks}"
    return memory_check(
        point.model,
        point.plan.micro_batch_size,
        limit,
        target=target,
        precision=precision,
        device=device,
        **shape,
    )
