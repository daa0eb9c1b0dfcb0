"""The ranks of one sweep point: a point trained data-parallel by several tasks of one job.

`infra.tasks_per_node` x `infra.nodes` tasks (submitit starts them locally or through srun) each call
`run_point`; `point_process_group` turns submitit's job environment into torch.distributed's variables
(submitit's own TorchDistributedEnvironment) and joins the group. Rank 0 owns the point's records
(status, MLflow, checkpoints) and tells the other ranks what it decided with `share`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import submitit
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment

from moe.distributed import DistEnv, active_world, distributed_env


def job_tasks() -> int:
    """Tasks of the submitit job this process belongs to (1 outside a submitit job)."""
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (basic launcher, plain python)
        return 1


@contextlib.contextmanager
def point_process_group(device: str = "auto") -> Iterator[DistEnv]:
    """Join the point's process group when its job has several tasks (or torchrun started it)."""
    if "WORLD_SIZE" not in os.environ and job_tasks() > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    with distributed_env(device) as env:
        yield env


def share(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (returned as is without a process group)."""
    if active_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
