"""Data-parallel training: real torchrun processes on gloo reproduce the single-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from dist_worker import ListLogger  # tests/ is on sys.path (as for conftest)
from helpers import run_study
from mlflow.tracking import MlflowClient

from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig, MoEConfig
from moe.parallel.distributed import read_env
from moe.parallel.layout import ParallelConfig
from moe.train.loop import train
from moe.train.plan import OptimConfig, TrainConfig, plan_training

ROOT = Path(__file__).resolve().parents[1]
# Bias balancing on: the per-step expert loads must be summed over ranks for the biases to agree.
TINY = ModelConfig(
    vocab_size=512,
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_ff=64,
    seq_len=32,
    moe=MoEConfig(num_experts=4, top_k=1, granularity=2, bias_update_rate=0.01),
)
# 4 sequences per step; micro-batches of 2 sequences: 2 accumulated on 1 rank, or 1 per rank on 2 ranks.
FAST = TrainConfig(
    tokens=128 * 24,
    batch_tokens=128,
    micro_batch_tokens=64,
    eval_every=8,
    eval_tokens=512,
    log_every=1,
    progress_every=0,
    checkpoint_every=0,
)
# 3 experts x G=2: 3 per EP rank of 2, which dp=2 does not divide: sharded on their width (dim 1)
UNEVEN = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, num_experts=3))
FSDP = dataclasses.asdict(ParallelConfig(mode="fsdp"))
EP2 = dataclasses.asdict(ParallelConfig(mode="fsdp", ep=2))


def history(events, key):
    return [(step, m[key]) for step, m in events if key in m]


def assert_same_curve(got_events, ref_events, rel=1e-5):
    got, ref = history(got_events, "train/loss"), history(ref_events, "train/loss")
    assert [s for s, _ in got] == [s for s, _ in ref] and got
    for (_, a), (_, b) in zip(got, ref, strict=True):
        assert a == pytest.approx(b, rel=rel, abs=1e-6)
    got_val, ref_val = history(got_events, "val/loss"), history(ref_events, "val/loss")
    assert [s for s, _ in got_val] == [s for s, _ in ref_val]
    for (_, a), (_, b) in zip(got_val, ref_val, strict=True):
        assert a == pytest.approx(b, rel=rel)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, nproc: int, spec: dict, name: str = "run") -> dict[int, dict]:
    """Run tests/dist_worker.py on `nproc` gloo ranks through torchrun; {rank: its JSON output}."""
    out = tmp_path / name
    out.mkdir()
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(ROOT / "tests" / "dist_worker.py"),
        str(spec_path),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)}


def spec_of(data_cfg, train_cfg=FAST, **extra) -> dict:
    return {
        "model": dataclasses.asdict(TINY),
        "train": dataclasses.asdict(train_cfg),
        "data": dataclasses.asdict(data_cfg),
        **extra,
    }


def single_process(data_cfg, train_cfg=FAST) -> ListLogger:
    logger = ListLogger()
    train(TINY, prepare_data(data_cfg), OptimConfig(), train_cfg, logger, progress=None)
    return logger


def test_env_is_read_from_torchrun_then_slurm_variables():
    assert read_env({}) == (0, 1, 0)
    assert read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    # torchrun inside a SLURM allocation: torchrun's names win
    both = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert read_env(both) == (1, 2, 1)


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "integers"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_NTASKS=0"),
    ],
)
def test_bad_rank_variables_are_rejected_naming_them(environ, match):
    with pytest.raises(ValueError, match=match):
        read_env(environ)


def test_plan_splits_the_global_batch_over_ranks():
    two = plan_training(TINY, OptimConfig(), FAST, world_size=2)
    assert (two.batch_size, two.micro_batch_size, two.accum, two.world_size) == (4, 2, 1, 2)
    no_micro = plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, micro_batch_tokens=None), 4)
    assert (no_micro.micro_batch_size, no_micro.accum) == (1, 1)
    assert plan_training(TINY, OptimConfig(), FAST).steps == two.steps  # same budget, same steps
    with pytest.raises(ValueError, match="train.batch_tokens=128 .* 8 data-parallel ranks"):
        plan_training(TINY, OptimConfig(), FAST, world_size=8)
    with pytest.raises(ValueError, match="train.micro_batch_tokens=64 .* / 3 ranks"):
        plan_training(TINY, OptimConfig(), dataclasses.replace(FAST, batch_tokens=32 * 9), world_size=3)


@pytest.mark.usefixtures("one_thread")
def test_two_ranks_reproduce_the_single_process_loss_curve(data_cfg, tmp_path):
    ranks = torchrun(tmp_path, 2, spec_of(data_cfg))
    one = single_process(data_cfg)
    ref_loss, ref_val = history(one.events, "train/loss"), history(one.events, "val/loss")
    assert len(ref_loss) == 24 and len(ref_val) == 6  # steps 1, 2, 4, 8 (log-spaced), 16, 24
    assert history(ranks[0]["events"], "lr") == history(one.events, "lr")
    for (s1, a), (s2, b) in zip(history(ranks[0]["events"], "train/loss"), ref_loss, strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for (s1, a), (s2, b) in zip(history(ranks[0]["events"], "val/loss"), ref_val, strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    # the curve moved (a frozen model would match trivially), and only rank 0 logs
    assert ref_loss[-1][1] < ref_loss[0][1] - 0.1
    assert ranks[1]["events"] == [] and ranks[1]["world_size"] == 2
    assert ranks[1]["result"]["final_val_loss"] == ranks[0]["result"]["final_val_loss"]


@pytest.mark.usefixtures("one_thread")
def test_a_stop_on_one_rank_checkpoints_every_rank_and_the_resumed_run_ends_where_an_unbroken_one_does(
    data_cfg, tmp_path
):
    cfg = dataclasses.replace(FAST, checkpoint_every=100)
    unbroken = torchrun(tmp_path, 2, spec_of(data_cfg, cfg), "unbroken")
    ckpt = tmp_path / "ckpt"
    stopped = torchrun(tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), stop=[1, 5]), "stopped")
    assert [stopped[r].get("interrupted_at") for r in (0, 1)] == [5, 5]  # rank 1 asked; both stopped
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".pt")  # rank 0 wrote the checkpoint
    resumed = torchrun(tmp_path, 2, spec_of(data_cfg, cfg, checkpoint_dir=str(ckpt), resume=True), "resumed")
    assert resumed[0]["result"]["resumed_from"] == 5
    tail = [e for e in history(unbroken[0]["events"], "train/loss") if e[0] > 5]
    assert history(resumed[0]["events"], "train/loss") == tail
    assert resumed[0]["result"]["final_val_loss"] == unbroken[0]["result"]["final_val_loss"]


@pytest.mark.slow
def test_a_point_with_two_tasks_trains_data_parallel_through_submitit_and_matches_one_task(shrunk, tmp_path):
    # micro-batches of 8 sequences: 2 accumulated by one task, or one on each of two tasks
    common = [o for o in shrunk if not o.startswith("paths.root=")] + [
        "granularity=4",
        "train.micro_batch_tokens=256",
    ]
    finals = {}
    for tasks in (1, 2):
        root = tmp_path / f"tasks{tasks}"
        env = {"MOE_JOBS": "1", "MOE_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = run_study(
            ["-m", *common, f"infra.tasks_per_node={tasks}", f"paths.root={root}"],
            tmp_path,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (summary_path,) = root.glob("default/runs/*/summary.json")
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "DONE" and summary["ranks"] == tasks
        finals[tasks] = summary["final"]
        client = MlflowClient(f"sqlite:///{root / 'default' / 'mlflow.db'}")
        history_ = client.get_metric_history(summary["mlflow_run_id"], "train/loss")
        assert [m.step for m in history_] == list(range(1, 21)), "rank 0 alone logged: each step once"
    assert finals[2]["val/loss"] == pytest.approx(finals[1]["val/loss"], rel=1e-5)
    assert finals[2]["train/loss"] == pytest.approx(finals[1]["train/loss"], rel=1e-5)


def test_basic_launcher_rejects_several_tasks_naming_the_keys(compose):
    from studies.job.config import load_run_config
    from studies.job.point import build_point

    cfg = compose(["infra=basic", "infra.tasks_per_node=2"])
    with pytest.raises(ValueError, match="infra.tasks_per_node=2 .* needs a submitit launcher"):
        build_point(load_run_config(cfg))
