"""One rank of the data-parallel tests: `torchrun --nproc-per-node N tests/dist_worker.py SPEC OUT`.

SPEC is a JSON file {"model": asdict(ModelConfig), "train": asdict(TrainConfig), "data": asdict(DataConfig),
"checkpoint_dir": str | null, "resume": bool, "stop": [rank, step] | null, "parallel": asdict(ParallelConfig)
| null, "die": [rank, step] | null, "peer_timeout_s": float}; each rank writes OUT/rank<r>.json with its logged
events and its result, the step it was interrupted at, or the error it ended with. "stop" makes that rank
alone request a stop (as a preempted task would) after that step; "die" makes that rank SIGKILL itself
after that step; "resume" continues from the latest checkpoint. Also runs without torchrun, from the
RANK/WORLD_SIZE/MASTER_* variables alone (as under srun).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from moe.data.config import DataConfig
from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig, MoEConfig
from moe.parallel.distributed import PeerFailure, distributed_env
from moe.parallel.layout import ParallelConfig
from moe.train.checkpoint import load_latest
from moe.train.loop import train
from moe.train.outcome import TrainingInterrupted
from moe.train.plan import OptimConfig, TrainConfig


class ListLogger:
    def __init__(self):
        self.events: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.events.append((step, dict(metrics)))


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    model = dict(spec["model"])
    model_cfg = ModelConfig(**{**model, "moe": MoEConfig(**model["moe"]) if model["moe"] else None})
    torch.set_num_threads(1)
    parallel = ParallelConfig(**spec["parallel"]) if spec.get("parallel") else None
    with distributed_env(device="cpu", peer_timeout_s=spec.get("peer_timeout_s", 30.0)) as env:
        data = prepare_data(DataConfig(**spec["data"]))
        logger = ListLogger()
        ckpt = Path(spec["checkpoint_dir"]) if spec.get("checkpoint_dir") else None
        state = load_latest(ckpt) if ckpt and spec.get("resume") else None
        calls = [0]

        def stop_requested() -> bool:
            calls[0] += 1
            start = state["step"] if state else 0
            if spec.get("die") == [env.rank, start + calls[0]]:
                os.kill(os.getpid(), signal.SIGKILL)
            return spec.get("stop") is not None and spec["stop"] == [env.rank, start + calls[0]]

        out = {"rank": env.rank, "world_size": env.world_size}
        try:
            result = train(
                model_cfg,
                data,
                OptimConfig(),
                TrainConfig(**spec["train"]),
                logger,
                progress=None,
                checkpoint_dir=ckpt,
                resume=state,
                stop_requested=stop_requested,
                parallel=parallel,
            )
            out["result"] = dataclasses.asdict(result)
        except TrainingInterrupted as exc:
            out["interrupted_at"] = exc.step
        except PeerFailure as exc:
            out.update(error=str(exc), failed_rank=exc.rank, ended_at=time.time())
            Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(out))
            raise
        out["events"] = logger.events
        Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
