"""The ranks of one sweep point: a point trained data-parallel by several tasks of one job.

`infra.tasks_per_node` x `infra.nodes` tasks (submitit starts them locally or through srun) each call
`run_point`; `point_process_group` turns submitit's job environment into torch.distributed's variables
(submitit's own TorchDistributedEnvironment) and joins the group. Rank 0 owns the point's records
(status, MLflow, checkpoints) and tells the other ranks what it decided with `share`.

A failed peer (docs/distributed.md, "Rank failures") reaches the records in one of two ways. Usually the
survivors' collective raises (gloo sees the closed connection) and moe.train.loop re-raises it as PeerFailure:
rank 0's PointRecord records FAILED as for any exception. A survivor stuck in a collective that never
returns (NCCL, or a peer that froze without dying) is ended by its heartbeat thread instead, which first
calls `RecordPeerFailure`: rank 0 records FAILED from that thread, then the process exits.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import submitit
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment

from moe.parallel.distributed import DistEnv, PeerFailure, active_world, distributed_env
from records import runfiles
from studies.job.point import Point
from studies.job.record import PointRecord, record_failure_from_another_thread

RECORD_WAIT_S = 10.0  # the longest a stuck rank 0 spends recording a peer failure before it exits


def job_tasks() -> int:
    """Tasks of the submitit job this process belongs to (1 outside a submitit job)."""
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (basic launcher, plain python)
        return 1


@contextlib.contextmanager
def point_process_group(
    device: str = "auto",
    on_peer_failure: Callable[[PeerFailure], None] | None = None,
    peer_timeout_s: float = 30.0,
) -> Iterator[DistEnv]:
    """Join the point's process group when its job has several tasks (or torchrun started it).
    on_peer_failure: called from the heartbeat thread before a rank stuck in a collective exits;
    peer_timeout_s: how long a silent rank's heartbeat is waited for (infra.peer_timeout_s)."""
    if "WORLD_SIZE" not in os.environ and job_tasks() > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    with distributed_env(device, peer_timeout_s=peer_timeout_s, on_peer_failure=on_peer_failure) as env:
        yield env


def share(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (returned as is without a process group)."""
    if active_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def failed_rank_tags(failure: PeerFailure) -> dict[str, str]:
    """The MLflow tag naming the failed rank ("store" when the rendezvous store's host is unknown)."""
    return {"failed_rank": "store" if failure.rank is None else str(failure.rank)}


class RecordPeerFailure:
    """on_peer_failure of a point's ranks, once they train (`watch`): a peer failure that leaves this rank
    stuck in a collective writes the job's point.json FAILED naming the failed rank (studies.run will not
    get to), and on rank 0 also the point's records, as the exception would have (status.json FAILED with
    the rank, summary.json, MLflow FAILED with failure_reason and failed_rank). Before training nothing is
    recorded: no record says RUNNING yet."""

    def __init__(self, job_dir: Path | None):
        self.job_dir = job_dir
        """The Hydra job's folder (point.json), None outside a Hydra job."""
        self.point: Point | None = None
        self.record: PointRecord | None = None

    def watch(self, point: Point, record: PointRecord | None = None) -> None:
        """Record peer failures of `point` from now on; `record`: rank 0's PointRecord."""
        self.point, self.record = point, record

    def __call__(self, failure: PeerFailure) -> None:
        point, record = self.point, self.record
        if point is None:
            return
        error = f"{type(failure).__name__}: {failure}"
        print(
            f"[{point.variant}] {error}: recording FAILED, then ending this stuck rank",
            file=sys.stderr,
            flush=True,
        )
        # the ranks share one job folder: rank 0's account is kept, another rank's only fills a gap
        if self.job_dir is not None and (
            record is not None or not (self.job_dir / runfiles.JOB_RECORD).exists()
        ):
            identity = {"variant": point.variant, "run_key": point.run_key, "tags": point.tags()}
            runfiles.write_job_record(
                self.job_dir, {"status": "FAILED", "error": error, "job": self.job_dir.name, **identity}
            )
        if record is None:  # not rank 0: the point's own records are rank 0's
            return
        record.opened.mlflow.set_tags(failed_rank_tags(failure))
        if not record_failure_from_another_thread(record, failure, RECORD_WAIT_S):
            print(
                f"[{point.variant}] MLflow not told within {RECORD_WAIT_S:.0f} s; status.json says FAILED "
                f"(`python -m studies.sync {point.study_dir}` completes the run)",
                file=sys.stderr,
                flush=True,
            )
