"""Benchmark: forward+backward of one MoE layer vs a dense FFN with equal active FLOPs.

    python -m moe.model.bench [--json] [--tokens 8192 --d-model 512 --d-ff 2048 --experts 8 --top-k 2]

The dense baseline is a SwiGLU FFN of hidden k*d_ff, so it does the same expert FLOPs as the MoE
layer at every G (the MoE adds routing, dispatch and a d_model x E*G router). Both run in one process
and their iterations alternate, so machine noise hits both alike; times are medians of --repeat runs
after --warmup. A step is forward, then backward of the output (and of the MoE's aux loss) with fixed
random output gradients; parameter gradients are reset to None before each step so both allocate them.
`ratio` divides wall times, `cpu_ratio` process CPU times: with --threads 1 on a shared machine the
latter leaves out time spent waiting for a core.

Peak memory is the high-water mark of bytes allocated during one step above what was allocated
before it (parameters and inputs excluded). On CUDA: torch.cuda.max_memory_allocated. On CPU there
is no allocator counter, so one extra step runs under torch.profiler with profile_memory=True and the
peak is the maximum running sum of its allocation (+) and free (-) events, in time order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from moe.model.config import ModelConfig, MoEConfig
from moe.model.ffn import FeedForward
from moe.model.layer import MoELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(module: nn.Module, x_TD: Tensor, dy_TD: Tensor) -> Callable[[], None]:
    """One forward+backward of `module` (a FeedForward or a MoELayer) on fixed input and grads."""

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x = x_TD.detach().requires_grad_()
        out = module(x.unsqueeze(0))
        if isinstance(out, tuple):  # MoELayer: (y, MoEAux); the aux loss trains the router too
            y, aux = out
            torch.autograd.backward([y.squeeze(0), aux.loss], [dy_TD, torch.ones_like(aux.loss)])
        else:
            out.squeeze(0).backward(dy_TD)

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one call of `step`, above the level before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def time_pair(
    steps: dict[str, Callable[[], None]], device, warmup: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per step of each callable, iterations interleaved.

    CPU time leaves out time spent waiting for a core, so with --threads 1 on a shared machine its
    ratio is the steadier one; with more threads it sums them (spin-waits included).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {
        name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
        for name, ts in times.items()
    }


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(args.tokens, args.d_model, generator=gen).to(device, dtype)
        dy = torch.randn(args.tokens, args.d_model, generator=gen).to(device, dtype)
        torch.manual_seed(0)
        dense = FeedForward(args.d_model, args.top_k * args.d_ff, "swiglu").to(device, dtype)
        for G in [int(g) for g in args.granularities.split(",")]:
            cfg = ModelConfig(
                d_model=args.d_model,
                n_heads=1,
                d_ff=args.d_ff,
                activation="swiglu",
                moe=MoEConfig(
                    num_experts=args.experts,
                    granularity=G,
                    top_k=args.top_k,
                    backend=args.backend,
                    routed_scale=args.routed_scale,
                ),
            )
            torch.manual_seed(0)
            moe = MoELayer(cfg).to(device, dtype)
            steps = {"moe": make_step(moe, x, dy), "dense": make_step(dense, x, dy)}
            t = time_pair(steps, device, args.warmup, args.repeat)
            mem = {name: peak_bytes(step, device) for name, step in steps.items()}
            rows.append(
                {
                    "G": G,
                    "dtype": dname,
                    "device": device.type,
                    "backend": moe.experts.resolved_backend(device, dtype),
                    "moe_ms": 1e3 * t["moe"][0],
                    "dense_ms": 1e3 * t["dense"][0],
                    "ratio": t["moe"][0] / t["dense"][0],
                    "cpu_ratio": t["moe"][1] / t["dense"][1],
                    "moe_peak_mb": mem["moe"] / 2**20,
                    "dense_peak_mb": mem["dense"] / 2**20,
                    "mem_ratio": mem["moe"] / mem["dense"],
                }
            )
            if not args.json:
                _print_row(rows[-1], header=len(rows) == 1)
            del moe, steps
    return rows


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'G':>3} {'dtype':>5} {'backend':>9} {'moe ms':>9} {'dense ms':>9} {'ratio':>6} "
            f"{'cpu ratio':>9} {'moe MB':>8} {'dense MB':>8} {'mem ratio':>9}"
        )
    print(
        f"{r['G']:>3} {r['dtype']:>5} {r['backend']:>9} {r['moe_ms']:>9.1f} {r['dense_ms']:>9.1f} "
        f"{r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f} {r['moe_peak_mb']:>8.1f} {r['dense_peak_mb']:>8.1f} {r['mem_ratio']:>9.2f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse `argv`, run the benchmark, print it and return its rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048, help="hidden size of one G=1 expert")
    p.add_argument("--experts", type=int, default=8, help="E, experts at G=1")
    p.add_argument("--top-k", type=int, default=2, help="k at G=1; dense hidden is k*d_ff")
    p.add_argument("--granularities", default="1,2,4,8,16")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "grouped"])
    p.add_argument(
        "--routed-scale",
        type=float,
        default=None,
        help="moe.routed_scale; default: derived from G (1.0 measures the uncompensated layer)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps the default")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
