"""Benchmark: training step time of the parallel layouts (moe.parallel.layout) against DDP, on gloo CPU ranks.

    python -m moe.parallel.bench [--nproc 2] [--steps 12] [--rounds 2] [--threads 1] [--batch-tokens 8192] [--json]

Trains the `small` preset of arXiv 2402.07871 (d_model 256, 4 blocks, 8 experts, top-2; conf/model/
small.yaml) with `moe.train.loop.train` itself on `--nproc` local ranks, once per layout: ddp, fsdp, fsdp keeping
the gathered parameters from forward to backward (fsdp_keep), fsdp with ep = nproc (pure EP), and with
more than 2 ranks fsdp with ep = 2 (dp = nproc/2: experts FSDP-sharded over dp too). A step is
`--batch-tokens` tokens, by default the project's (train.batch_tokens = 8192: 16 sequences of 256 per
rank on 2 ranks, one micro-batch each); `--batch-tokens 512` (one sequence per rank) is the
communication-bound extreme, where FSDP's all-gathers weigh most against the compute. A step's time is read from
the loop's own `tokens_per_s` (logged every 2 steps, which excludes evaluation); the first window
(warm-up) is dropped and the median of the rest taken. Layouts run one after the other and the whole
sequence repeats `--rounds` times in alternating order, so a busy machine slows all alike; `ratio` is
the layout's median step time over DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.data.config import DataConfig
from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig, MoEConfig
from moe.parallel.layout import ParallelConfig
from moe.train.loop import train
from moe.train.plan import OptimConfig, TrainConfig

SMALL = ModelConfig(
    vocab_size=2048,
    d_model=256,
    n_layers=4,
    n_heads=4,
    d_ff=1024,
    seq_len=256,
    moe=MoEConfig(num_experts=8, top_k=2),
)
LOG_EVERY = 2


class _Rates:
    def __init__(self):
        self.tok_s: list[float] = []

    def log_metrics(self, metrics, step):
        if "tokens_per_s" in metrics:
            self.tok_s.append(metrics["tokens_per_s"])


def _rank(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    torch.set_num_threads(spec["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(
            tokens=spec["batch_tokens"] * spec["steps"],
            batch_tokens=spec["batch_tokens"],
            eval_every=0,
            eval_tokens=SMALL.seq_len,
            log_every=LOG_EVERY,
            progress_every=0,
            checkpoint_every=0,
            device="cpu",
        )
        rates = _Rates()
        train(
            SMALL,
            prepare_data(DataConfig(**spec["data"])),
            OptimConfig(),
            cfg,
            rates,
            progress=None,
            parallel=ParallelConfig(**spec["parallel"]),
        )
        if rank == 0:
            Path(out).write_text(json.dumps(rates.tok_s))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_seconds(
    parallel: ParallelConfig, nproc: int, steps: int, threads: int, data: DataConfig, batch_tokens: int
) -> list[float]:
    """Seconds per step of each logged window after the first."""
    spec = {
        "parallel": asdict(parallel),
        "steps": steps,
        "threads": threads,
        "batch_tokens": batch_tokens,
        "data": asdict(data),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rates.json")
        # ranks fork from a server that imported torch and this module once: no re-import per rank and layout
        mp.set_forkserver_preload(["torch", "torch.distributed", __name__])
        mp.start_processes(
            _rank, args=(nproc, _free_port(), spec, out), nprocs=nproc, start_method="forkserver"
        )
        rates = json.loads(Path(out).read_text())
    return [batch_tokens / r for r in rates[1:]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=TrainConfig.batch_tokens,
        help="tokens per step over all ranks (default: train.batch_tokens)",
    )
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "moe-parallel-bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for flag, value, least in (
        ("--nproc", args.nproc, 1),
        ("--rounds", args.rounds, 1),
        ("--threads", args.threads, 1),
        ("--steps", args.steps, 2 * LOG_EVERY),
    ):
        if value < least:  # --steps: the first logged window is warm-up, so at least two
            ap.error(f"{flag}={value} must be at least {least}")
    per_rank = args.batch_tokens // args.nproc
    if args.batch_tokens < 1 or args.batch_tokens % args.nproc or per_rank % SMALL.seq_len or not per_rank:
        ap.error(
            f"--batch-tokens={args.batch_tokens} must split into whole {SMALL.seq_len}-token sequences "
            f"over --nproc={args.nproc} ranks"
        )
    data = DataConfig(vocab_size=SMALL.vocab_size, max_chars=2_000_000, cache_dir=args.cache_dir)
    prepare_data(data)  # once, before the ranks start
    layouts = {
        "ddp": ParallelConfig(),
        "fsdp": ParallelConfig(mode="fsdp"),
        "fsdp_keep": ParallelConfig(mode="fsdp", reshard_after_forward=False),
        f"fsdp_ep{args.nproc}": ParallelConfig(mode="fsdp", ep=args.nproc),
    }
    if args.nproc > 2 and args.nproc % 2 == 0:  # experts FSDP-sharded over dp as well
        layouts[f"fsdp_dp{args.nproc // 2}_ep2"] = ParallelConfig(mode="fsdp", ep=2)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for round_ in range(args.rounds):
        order = list(layouts) if round_ % 2 == 0 else list(reversed(layouts))
        for name in order:
            times[name] += step_seconds(
                layouts[name], args.nproc, args.steps, args.threads, data, args.batch_tokens
            )
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        name: {"step_s": med[name], "ratio": med[name] / med["ddp"], "windows": len(times[name])}
        for name in layouts
    }
    report = {
        "nproc": args.nproc,
        "threads": args.threads,
        "batch_tokens": args.batch_tokens,
        "layouts": result,
    }
    if args.json:
        print(json.dumps(report))
        return report
    print(
        f"small preset, {args.nproc} gloo ranks x {args.threads} thread(s), "
        f"{per_rank // SMALL.seq_len} sequence(s) of {SMALL.seq_len} per rank per step"
    )
    for name, r in result.items():
        print(
            f"{name:>10}: {r['step_s'] * 1e3:8.1f} ms/step  {r['ratio']:.2f}x ddp  ({r['windows']} windows)"
        )
    return report


if __name__ == "__main__":
    main()
