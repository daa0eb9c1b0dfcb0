"""Data parallelism: the process group as a context manager, and the rank facts training needs.

The environment comes from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or from SLURM tasks (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, e.g. `srun python ...`); under submitit, studies export submitit's
TorchDistributedEnvironment first, which sets the torchrun names. MASTER_ADDR/MASTER_PORT name the
rendezvous (127.0.0.1:29500 when unset, i.e. one node). World size 1 creates no process group at all,
so single-process training runs exactly the code it ran before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes; 1 means no process group."""
    local_rank: int
    """Rank on this node; picks the CUDA device."""
    device: torch.device
    """Device this rank trains on."""

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes checkpoints."""
        return self.rank == 0


def read_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return 0, 1, 0
    try:
        rank, world, local = (int(env.get(k, "0")) for k in keys)
    except ValueError as exc:
        raise ValueError(f"{'/'.join(keys)} must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{keys[0]}={rank} must be in [0, {keys[1]}={world})")
    return rank, world, local


@contextlib.contextmanager
def distributed_env(device: str = "auto", timeout_s: float = 600.0) -> Iterator[DistEnv]:
    """Join the process group described by the environment (nccl on CUDA, gloo on CPU); leave it on exit.

    device: auto (cuda when available), cpu or cuda; each rank takes cuda:LOCAL_RANK. Inside, `train`
    sees the group and trains data-parallel."""
    rank, world, local = read_env()
    # cuda asked for on a machine without it: train() raises the config error, recorded like any failure
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1 or dist.is_initialized():  # a caller that already joined keeps its group
        yield DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        yield DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)
    finally:
        dist.destroy_process_group()


def active_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (a no-op without a process group); returns `t`."""
    if active_world()[1] > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if active_world()[1] > 1:
        dist.barrier()
