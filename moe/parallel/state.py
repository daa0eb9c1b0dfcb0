"""Training state across layouts: full (one-process) state_dicts into sharded tensors and back, so a
single-file checkpoint resumes on any layout (moe.parallel.layout.Parallel.state_tensors)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (sharing storage), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def ensure_adam_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state (zeros, step 0) where a step has not made it yet, as
    AdamW's own first step would, so a checkpoint can be loaded into it."""
    fused = opt.defaults.get("fused") or opt.defaults.get("capturable")
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                step_dev = p.device if fused else torch.device("cpu")
                opt.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=step_dev),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def full_state_tensors(model: nn.Module, model_sd: dict, optim_sd: dict) -> dict[str, Any]:
    """A single-file checkpoint's model and optimizer state_dicts in `Parallel.state_tensors` form.
    Optimizer states are numbered in the order moe.train.optim.build_optimizer lists a model's parameters
    without EP: matrices, then vectors."""
    named = list(model.named_parameters())
    order = [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]
    ids = [i for group in optim_sd["param_groups"] for i in group["params"]]
    if len(ids) != len(order):
        raise ValueError(f"checkpoint optimizer has {len(ids)} parameters, the model {len(order)}")
    return {
        "model": dict(model_sd),
        "optim": {n: optim_sd["state"][i] for n, i in zip(order, ids, strict=True) if i in optim_sd["state"]},
    }


@torch.no_grad()
def load_full_(target: dict[str, Any], full: dict[str, Any], prefix: str = "") -> None:
    """Copy full tensors into `target` (Parallel.state_tensors): each DTensor takes its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing = sorted(set(target) - set(full))
    if missing:
        raise ValueError(f"checkpoint lacks {prefix}{missing[0]} (and {len(missing) - 1} more)")
    for key, t in target.items():
        src = full[key]
        if isinstance(t, dict):
            load_full_(t, src, f"{prefix}{key}.")
        elif tuple(t.shape) != tuple(src.shape):
            raise ValueError(f"{prefix}{key}: checkpoint shape {tuple(src.shape)}, this run {tuple(t.shape)}")
        elif isinstance(t, DTensor):
            part = distribute_tensor(
                src.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None
            )
            t.to_local().copy_(part.to_local())
        else:
            t.copy_(src)
