"""Training-loop overhead benchmark: `python -m studies.bench [--steps N] [--repeats R] [overrides ...]`.

Measures, in one process on the same model and data:
  bare     a minimal loop (forward/backward, clip, AdamW step; no logging, eval or diagnostics)
  full     `moe.train.loop.train` at the config's cadence (router diagnostics, JSONL + MLflow logging,
           periodic eval on the fixed validation set, progress line)
and reports full/bare - 1 (target <= 5%) and the time spent inside the MLflow logger as a fraction of
the full run (target <= 2%). Runs alternate bare/full `repeats` times and keep each one's fastest, since
other processes on a shared machine only ever add time.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from moe.data.loader import TokenLoader
from moe.data.prepare import prepare_data
from moe.model.transformer import Transformer
from moe.train.loop import train
from moe.train.optim import build_optimizer
from records import runfiles
from records.code_record import project_root
from studies.job.config import load_run_config, register_configs
from studies.job.point import Point, build_point
from studies.track import tracking
from studies.track.mlflow_logger import FanOut, MlflowLogger

CONF_DIR = project_root() / "conf"


class TimedLogger:
    """Forwards to a logger and accumulates the wall time spent inside it."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def log_metrics(self, metrics, step):
        t0 = time.perf_counter()
        self.inner.log_metrics(metrics, step)
        self.seconds += time.perf_counter() - t0

    def flush(self):
        t0 = time.perf_counter()
        self.inner.flush()
        self.seconds += time.perf_counter() - t0


def bare_loop(point: Point, data, steps: int) -> float:
    """Seconds for `steps` optimiser steps with nothing but the math."""
    torch.manual_seed(point.train.seed)
    model = Transformer(point.model)
    opt = build_optimizer(model, point.run.optim)
    loader = TokenLoader(
        data.train_path, point.model.seq_len, point.plan.micro_batch_size, seed=point.train.seed
    )
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(point.plan.accum):
            x_BS, y_BS = loader.next_batch()
            out = model(x_BS, y_BS)
            ((out.loss + out.aux_loss) / point.plan.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), point.run.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balancing(out.router)
    return time.perf_counter() - t0


def full_loop(point: Point, data, steps: int, workdir: Path):
    """(seconds for train(), seconds inside the MLflow logger, TrainResult) over `steps` steps."""
    uri = tracking.default_tracking_uri(workdir)
    run_id = tracking.start_run(uri, "bench", workdir / "artifacts", run_name="bench", tags={"kind": "bench"})
    mlf = TimedLogger(MlflowLogger(uri, run_id, point.run.tracking.flush_every_s))
    jsonl = runfiles.MetricsWriter(workdir / f"{run_id}.jsonl")
    cfg = dataclasses.replace(point.train, tokens=steps * point.plan.batch_tokens)
    t0 = time.perf_counter()
    result = train(point.model, data, point.run.optim, cfg, FanOut(jsonl, mlf), progress=lambda _: None)
    mlf.flush()
    seconds = time.perf_counter() - t0
    jsonl.close()
    tracking.end_run(uri, run_id, ok=True)
    return seconds, mlf.seconds, result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare/full measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=small train.log_every=5")
    args = parser.parse_args(argv)

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run = load_run_config(compose("config", overrides=args.overrides))
    point = build_point(run)
    torch.set_num_threads(args.threads)
    data = prepare_data(run.data)
    print(
        f"model={run.model.name} variant={point.variant} steps={args.steps} batch_tokens={point.plan.batch_tokens} "
        f"log_every={point.train.log_every} eval_every={point.train.eval_every} "
        f"eval_tokens={point.train.eval_tokens} threads={args.threads}"
    )

    bare, full, mlflow_s, inside = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            bare.append(bare_loop(point, data, args.steps))
            seconds, in_mlflow, res = full_loop(point, data, args.steps, Path(tmp))
            full.append(seconds)
            mlflow_s.append(in_mlflow)
            # Timed inside the same run, so machine noise hits numerator and denominator alike.
            inside.append((res.eval_s + res.log_s) / (res.wall_s - res.eval_s - res.log_s))
            print(
                f"repeat {r}: bare {bare[-1]:.2f} s, full {full[-1]:.2f} s (eval {res.eval_s:.2f} s, "
                f"diagnostics+logging {res.log_s:.3f} s; MLflow incl. final flush {in_mlflow:.3f} s)"
            )
    best_bare, best_full = min(bare), min(full)
    result = {
        "bare_s": best_bare,
        "full_s": best_full,
        "overhead_bare_vs_full": best_full / best_bare - 1,
        "overhead_in_run": min(inside),
        "mlflow_frac": min(m / f for m, f in zip(mlflow_s, full, strict=True)),
        "tokens_per_s_bare": args.steps * point.plan.batch_tokens / best_bare,
    }
    print(
        f"loop overhead: {result['overhead_in_run']:+.1%} timed inside the run (eval + diagnostics + logging vs "
        f"the rest), {result['overhead_bare_vs_full']:+.1%} full vs bare loop (noisy on a shared machine); "
        f"target <= 5%.\nMLflow {result['mlflow_frac']:.2%} of the run (target <= 2%). "
        f"Bare throughput {result['tokens_per_s_bare']:,.0f} tokens/s."
    )
    return result


if __name__ == "__main__":
    main()
