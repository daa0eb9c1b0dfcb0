"""`python -m studies.plan [-m] <overrides>`: what a sweep would cost, without building a model.

Takes the same overrides as `studies.run`, expands the sweep exactly as Hydra's basic sweeper would
(study presets' hydra.sweeper.params plus the command line, via studies.launch.sweep.compose_jobs), turns
each point into its model and budget with the code `studies.run` uses (studies.job.point.build_point), and
prints per point: total / active / non-embedding params, training FLOPs per token, tokens, steps, total
training FLOPs and GPU-hours at a stated MFU and GPU peak. Counts are analytic (moe.model.accounting), so a 56B
config plans in well under a second; `--check-meta` also builds each model on the meta device (no
storage) and checks that its numel equals the analytic total.

Vocabulary: studies.run sizes the model to the tokenizer of its data (data.vocab_size, or the meta.json
of data=tokens) and refuses a preset whose pinned model.vocab_size disagrees. The planner plans without
data, with the pinned vocabulary where a published-architecture preset has one (train those with
data=tokens shards of that tokenizer), else data.vocab_size; such points are flagged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from moe.model.accounting import count_params, flops_per_token
from moe.parallel.memory import find_layout
from studies.job.config import load_run_config
from studies.job.point import build_point
from studies.launch.sweep import check_meta_numel, compose_jobs, varying

# Dense (no structured sparsity) peak FLOP/s per GPU at bf16, from the vendors' datasheets
# (H100/H200 SXM: 989.4 TFLOP/s; A100: 312 TFLOP/s).
GPU_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
GPU_MEMORY_BYTES = {"h100": 80 * 10**9, "h200": 141 * 10**9, "a100": 80 * 10**9}


@dataclass(frozen=True)
class Hardware:
    """The assumptions behind GPU-hours: hours = train_flops / (mfu * peak_flops) / 3600."""

    gpu: str
    """Name of the GPU (a key of GPU_PEAK_FLOPS, or "custom" for --peak-flops)."""
    peak_flops: float
    """Peak FLOP/s of one GPU."""
    mfu: float
    """Model FLOPs utilisation: achieved / peak, in (0, 1]."""

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu={self.mfu} must be in (0, 1]")
        if not self.peak_flops > 0:
            raise ValueError(f"--peak-flops={self.peak_flops} must be > 0")

    def describe(self) -> str:
        return f"MFU {self.mfu:.2f} of {self.gpu} peak {self.peak_flops / 1e12:g} TFLOP/s per GPU"


def hardware(gpu: str = "h100", mfu: float = 0.4, peak_flops: float | None = None) -> Hardware:
    """Hardware from a named GPU, or from an explicit peak (which wins and is called "custom")."""
    if peak_flops is not None:
        return Hardware("custom", peak_flops, mfu)
    if gpu not in GPU_PEAK_FLOPS:
        raise ValueError(f"--gpu={gpu!r} is not one of {sorted(GPU_PEAK_FLOPS)}; or give --peak-flops")
    return Hardware(gpu, GPU_PEAK_FLOPS[gpu], mfu)


@dataclass(frozen=True)
class PointPlan:
    """The planned cost of one sweep point."""

    overrides: tuple[str, ...]
    """The job's overrides, as Hydra would launch it."""
    variant: str
    """Readable label (docs/outputs.md), e.g. moe-E8-k2-G8."""
    model: str
    """Size preset name."""
    vocab_size: int
    """Vocabulary the point was planned with."""
    data_vocab_size: int
    """data.vocab_size, what studies.run uses unless data=tokens brings its own."""
    params_total: int
    """Every parameter (tied weights once)."""
    params_active: int
    """Parameters one token touches."""
    params_non_embedding: int
    """Total without embedding and LM head."""
    params_active_non_embedding: int
    """Active without embedding and LM head."""
    flops_per_token_forward: float
    """Forward FLOPs per token (moe.model.accounting convention)."""
    flops_per_token_train: float
    """Training FLOPs per token, 3 x forward."""
    tokens: int
    """Training tokens seen: steps * batch_tokens."""
    steps: int
    """Optimiser steps."""
    batch_tokens: int
    """Tokens per optimiser step."""
    train_flops: float
    """flops_per_token_train * tokens."""
    gpu_hours: float
    """train_flops / (mfu * peak_flops) / 3600."""
    meta_numel: int | None = None
    """sum(numel) of the model built on the meta device (--check-meta), else None."""
    layout: str | None = None
    """The smallest feasible FSDP/EP layout on the GPUs asked for (--layout, moe.parallel.memory.find_layout)."""


def plan_point(
    cfg: DictConfig,
    hw: Hardware,
    *,
    overrides: Sequence[str] = (),
    check_meta: bool = False,
    nodes: tuple[int, int] | None = None,
) -> PointPlan:
    """Plan one composed config with the same derivation as studies.run (build_point); no weights."""
    run = load_run_config(cfg)
    point = build_point(run, vocab_size=run.model.vocab_size or run.data.vocab_size)
    params = count_params(point.model)
    flops = flops_per_token(point.model)
    tokens = point.plan.steps * point.plan.batch_tokens
    train_flops = flops.train * tokens
    meta_numel = check_meta_numel(point) if check_meta else None
    layout = None
    if nodes is not None:  # (GPUs per node, most nodes): bf16-mixed FSDP, docs/memory.md
        memory = GPU_MEMORY_BYTES.get(hw.gpu)
        if memory is None:
            raise ValueError(
                f"--layout needs the memory of --gpu={hw.gpu}: one of {sorted(GPU_MEMORY_BYTES)}"
            )
        found = find_layout(point.model, point.plan.micro_batch_size, memory, nodes[0], nodes[1])
        layout = found.describe() if found else f"none fits on {nodes[1]} nodes x {nodes[0]} {hw.gpu}"
    return PointPlan(
        overrides=tuple(overrides),
        variant=point.variant,
        model=run.model.name,
        vocab_size=point.model.vocab_size,
        data_vocab_size=run.data.vocab_size,
        params_total=params.total,
        params_active=params.active,
        params_non_embedding=params.non_embedding,
        params_active_non_embedding=params.active_non_embedding,
        flops_per_token_forward=flops.forward,
        flops_per_token_train=flops.train,
        tokens=tokens,
        steps=point.plan.steps,
        batch_tokens=point.plan.batch_tokens,
        train_flops=train_flops,
        gpu_hours=train_flops / (hw.mfu * hw.peak_flops) / 3600.0,
        meta_numel=meta_numel,
        layout=layout,
    )


def plan_sweep(
    overrides: Sequence[str] = (),
    *,
    multirun: bool = False,
    hw: Hardware | None = None,
    check_meta: bool = False,
    nodes: tuple[int, int] | None = None,
) -> list[PointPlan]:
    """Plan every point of `studies.run [-m] overrides`; one ValueError lists every invalid point."""
    hw = hw or hardware()
    jobs = compose_jobs(overrides, multirun)
    plans, errors = [], []
    for (job, cfg), label in zip(jobs, varying([job for job, _ in jobs]), strict=True):
        try:
            if isinstance(cfg, Exception):
                raise cfg
            plans.append(plan_point(cfg, hw, overrides=job, check_meta=check_meta, nodes=nodes))
        except (ValueError, HydraException, OmegaConfBaseException) as exc:
            errors.append(f"  {label if len(jobs) > 1 else ' '.join(job) or '(no overrides)'}: {exc}")
    if errors:
        raise ValueError(f"{len(errors)} of {len(jobs)} sweep points are invalid:\n" + "\n".join(errors))
    return plans


# Output -------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    """3 significant figures with a K/M/B/T suffix (params, tokens)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def format_plan(plans: Sequence[PointPlan], hw: Hardware) -> str:
    header = (
        "point",
        "variant",
        "total",
        "active",
        "non-emb",
        "act non-emb",
        "train FLOP/tok",
        "tokens",
        "steps",
        "train FLOPs",
        "GPU-h",
    )
    rows = [header]
    for label, p in zip(varying([p.overrides for p in plans]), plans, strict=True):
        rows.append(
            (
                label,
                p.variant,
                _si(p.params_total),
                _si(p.params_active),
                _si(p.params_non_embedding),
                _si(p.params_active_non_embedding),
                f"{p.flops_per_token_train:.3g}",
                _si(p.tokens),
                f"{p.steps:,}",
                f"{p.train_flops:.3g}",
                _hours(p.gpu_hours),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total_flops = sum(p.train_flops for p in plans)
    lines += [
        "",
        f"{len(plans)} point(s): {total_flops:.3g} training FLOPs, {_hours(sum(p.gpu_hours for p in plans))} "
        f"GPU-hours at {hw.describe()}.",
        "FLOPs per token: moe.model.accounting convention (matmuls x2, attention QK^T and AV non-causal at "
        "model.seq_len, router included, training = 3 x forward).",
        "Router: 6 FLOPs per router parameter per token, as for any matmul weight (the real cost of the "
        "router matmul); arXiv 2402.07871's compute model uses c_r = 14, which analysis.compute_optimal uses for "
        "compute-optimal planning (ComputeModel.router_flops='matmul' switches it to 6).",
    ]
    pinned = sorted(
        {(p.model, p.vocab_size, p.data_vocab_size) for p in plans if p.vocab_size != p.data_vocab_size}
    )
    for model, vocab, data_vocab in pinned:
        lines.append(
            f"note: model={model} pins its vocabulary {vocab}: studies.run needs data with that vocabulary "
            f"(data=tokens shards of its tokenizer); with data.vocab_size={data_vocab} it is refused."
        )
    for label, p in zip(varying([p.overrides for p in plans]), plans, strict=True):
        if p.layout:
            lines.append(f"layout {label}: {p.layout}")
    checked = [p for p in plans if p.meta_numel is not None]
    if checked:
        lines.append(f"meta-device build: numel == analytic total for {len(checked)} point(s).")
    return "\n".join(lines)


def plan_json(plans: Sequence[PointPlan], hw: Hardware) -> dict[str, Any]:
    return {
        "assumptions": {**dataclasses.asdict(hw), "seconds_per_hour": 3600},
        "points": [dataclasses.asdict(p) for p in plans],
        "total": {
            "train_flops": sum(p.train_flops for p in plans),
            "gpu_hours": sum(p.gpu_hours for p in plans),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studies.plan",
        description="Params, FLOPs, steps and GPU-hours of every point of a studies.run sweep; "
        "nothing is trained or allocated.",
    )
    parser.add_argument(
        "-m", "--multirun", action="store_true", help="expand the sweep as studies.run -m would"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    parser.add_argument(
        "--gpu", default="h100", help=f"GPU peak from {sorted(GPU_PEAK_FLOPS)} (default h100)"
    )
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per GPU; overrides --gpu")
    parser.add_argument(
        "--check-meta",
        action="store_true",
        help="also build each model on the meta device and check its numel",
    )
    parser.add_argument(
        "--layout",
        nargs=2,
        type=int,
        metavar=("GPUS_PER_NODE", "MAX_NODES"),
        default=None,
        help="also print the smallest FSDP/EP layout that fits each point on --gpu GPUs",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for studies.run")
    args = parser.parse_args(argv)
    try:
        hw = hardware(args.gpu, args.mfu, args.peak_flops)
        if args.layout and min(args.layout) < 1:
            raise ValueError(f"--layout {args.layout[0]} {args.layout[1]}: both must be >= 1")
        plans = plan_sweep(
            args.overrides,
            multirun=args.multirun,
            hw=hw,
            check_meta=args.check_meta,
            nodes=tuple(args.layout) if args.layout else None,
        )
    except (ValueError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_json(plans, hw), indent=2))
    else:
        print(format_plan(plans, hw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
