"""Where a run computes and how it updates: the device a `train.device` setting resolves to, the
precision it computes in (the one place that decides it), and the AdamW optimiser with its groups."""

from __future__ import annotations

from typing import Literal

import torch

from moe.train.plan import Device, OptimConfig

MemoryPrecision = Literal["fp32", "bf16-mixed", "bf16-autocast"]
MEMORY_PRECISIONS = ("fp32", "bf16-mixed", "bf16-autocast")
ParallelMode = Literal["ddp", "fsdp"]
ExpertDevice = Literal["cpu", "cuda"]


def resolve_device(device: Device) -> torch.device:
    """cpu, or the current CUDA device (distributed_env sets it to cuda:LOCAL_RANK)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, own_group: list | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (decaying norm gains and biases only hurts); the fused
    kernel on CUDA. `own_group` (EP experts: plain tensors among FSDP's DTensors) gets a group of its
    own, as a foreach/fused step cannot mix the two."""
    separate = {id(p) for p in own_group or []}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in separate]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if own_group:
        groups.append({"params": list(own_group), "weight_decay": optim.weight_decay})
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
    )


def train_precision(
    device: ExpertDevice, precision: str, mode: ParallelMode = "ddp", world: int = 1
) -> MemoryPrecision:
    """moe.train.loop's precision for its device, `train.precision` and layout: bf16 is autocast over fp32
    weights, except fsdp on CUDA (world > 1), whose bf16 policy gathers bf16 from fp32 shards."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision={precision!r} is not one of auto, fp32, bf16")
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        return "fp32"
    return "bf16-mixed" if mode == "fsdp" and world > 1 and device == "cuda" else "bf16-autocast"
