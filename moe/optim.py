"""Where a run computes and how it updates: the device a `train.device` setting resolves to, and the
AdamW optimiser with its parameter groups."""

from __future__ import annotations

import torch

from moe.train_plan import Device, OptimConfig


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
