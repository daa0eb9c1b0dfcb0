"""How one training run is laid out over ranks: DDP, FSDP2 per block, and expert parallelism (EP).

`ParallelConfig` says what is asked; `resolve_layout` checks it against the world size and the model
before anything is built; `parallelize` applies it to a built model and returns a `Parallel`, the
handle the training loop uses for what differs between layouts (gradient sync, clipping, sharded
state). Every rank sees data: the world is one data-parallel group of `world` ranks, seen as a
(dp, ep) DeviceMesh (rank = dp_index * ep + ep_index, so an EP group is `ep` consecutive ranks).

  ddp   every rank holds every parameter (DistributedDataParallel); today's behaviour.
  fsdp  FSDP2 `fully_shard` on every transformer block and on the root over all ranks: parameters,
        gradients and optimiser state are sharded; bf16 parameters with fp32 gradient reduction on
        CUDA when training in bf16 (MixedPrecisionPolicy).
  ep>1  (fsdp only) the routed experts of every MoE layer are split over the EP group, E*G/ep per
        rank; tokens reach their experts by all-to-all (moe.parallel_ep). Expert weights are
        replicated over the dp dimension, and their gradients averaged over it by hand, so every
        expert weight still gets the average over all ranks' tokens.

Numerics match one process accumulating the same micro-batches: routing, capacity dropping and the
balancing losses are computed per micro-batch on the rank that holds it, the expert loads for the
bias update are summed over all ranks by the loop, and gradients are averaged over all ranks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from moe.config import ModelConfig
from moe.parallel_ep import ExpertShard, shard_experts_

# Buffers (RoPE tables, balancing biases) agree on every rank by construction: no per-forward broadcast.
# torch 2.13 renamed the switch; older releases only know broadcast_buffers.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)

Mode = Literal["ddp", "fsdp"]
MODES = get_args(Mode)


@dataclass
class ParallelConfig:
    mode: Mode = "ddp"
    """ddp: every rank holds the whole model; fsdp: FSDP2 shards parameters, gradients and optimiser
    state over the ranks (one fully_shard per transformer block)."""
    ep: int = 1
    """Expert-parallel size: ranks that share the routed experts of each MoE layer (fsdp only); must
    divide the world size and moe.num_experts * moe.granularity."""
    dp_shard: int = -1
    """Ranks of the data-parallel (dp) mesh dimension; -1: world size / ep. dp_shard * ep must equal
    the world size."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (less memory, ~1/3
    more compute)."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward (ZeRO-3); False keeps them to
    backward (ZeRO-2-like: more memory, one all-gather less per block)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"parallel.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(self.ep, int) or self.ep < 1:
            raise ValueError(f"parallel.ep={self.ep!r} must be an integer >= 1")
        if not isinstance(self.dp_shard, int) or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(
                f"parallel.dp_shard={self.dp_shard!r} must be an integer >= 1, or -1 (world / ep)"
            )
        if self.ep > 1 and self.mode != "fsdp":
            raise ValueError(f"parallel.ep={self.ep} needs parallel.mode='fsdp' (got {self.mode!r})")


@dataclass(frozen=True)
class Layout:
    """A ParallelConfig resolved against the world: what `parallelize` builds."""

    mode: Mode
    dp: int
    ep: int
    activation_checkpointing: bool
    reshard_after_forward: bool

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def sharded(self) -> bool:
        """Parameters differ between ranks: checkpoints are written by every rank (DCP)."""
        return self.mode == "fsdp" and self.world > 1


def resolve_layout(cfg: ParallelConfig | None, world: int, model_cfg: ModelConfig) -> Layout:
    """Check the layout against the world size and the model; ValueError naming `parallel.<key>`."""
    cfg = cfg or ParallelConfig()
    if cfg.ep > 1:
        if model_cfg.moe is None:
            raise ValueError(f"parallel.ep={cfg.ep} needs an MoE model (model.moe is None)")
        n = model_cfg.moe.n_routed
        if n % cfg.ep:
            raise ValueError(
                f"parallel.ep={cfg.ep} does not divide the routed experts moe.num_experts * "
                f"moe.granularity = {model_cfg.moe.num_experts} * {model_cfg.moe.granularity} = {n}"
            )
    if world % cfg.ep:
        raise ValueError(f"parallel.ep={cfg.ep} does not divide the world size {world}")
    dp = world // cfg.ep if cfg.dp_shard == -1 else cfg.dp_shard
    if dp * cfg.ep != world:
        raise ValueError(
            f"parallel.dp_shard={cfg.dp_shard} x parallel.ep={cfg.ep} = {dp * cfg.ep} ranks, "
            f"but the world size is {world}"
        )
    return Layout(cfg.mode, dp, cfg.ep, cfg.activation_checkpointing, cfg.reshard_after_forward)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every block in backward: the forward is replaced on the instance, so parameter names
    (and checkpoints) do not change."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


class Parallel:
    """What the training loop asks of a layout. `net` is what to call for forward."""

    def __init__(
        self, model: nn.Module, net: nn.Module, layout: Layout, mesh=None, shard: ExpertShard | None = None
    ):
        self.model, self.net, self.layout, self.mesh, self.shard = model, net, layout, mesh, shard
        self.expert_params: list[nn.Parameter] = [
            p for block in model.blocks if block.is_moe and shard is not None
            for p in block.ffn.experts.parameters()
        ]  # fmt: skip
        self._dp_group = mesh["dp"].get_group() if mesh is not None and layout.dp > 1 and shard else None

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward/backward: reduce gradients over ranks only on the last."""
        if self.layout.world == 1:
            yield
        elif self.layout.mode == "ddp":
            with contextlib.nullcontext() if last else self.net.no_sync():
                yield
        else:
            self.model.set_requires_gradient_sync(last)
            yield

    def finish_gradients(self) -> None:
        """After the last backward of a step: expert gradients (EP) hold the sum over this EP group's
        tokens; average them over all ranks as FSDP does for the other parameters."""
        if self.shard is None:
            return
        grads = [p.grad for p in self.expert_params if p.grad is not None]
        if self._dp_group is not None and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self._dp_group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))
        for g in grads:
            g.div_(self.layout.world)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every rank's shards) to max_norm; returns the norm."""
        if not self.layout.sharded:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        experts = {id(p) for p in self.expert_params}
        grads = [(p.grad, id(p) in experts) for p in self.model.parameters() if p.grad is not None]
        dev = grads[0][0].device if grads else torch.device("cpu")
        sq = torch.zeros(2, dtype=torch.float64, device=dev)  # [FSDP shards, expert shards]
        for g, is_expert in grads:
            local = g.to_local() if hasattr(g, "to_local") else g
            sq[int(is_expert)] += local.double().square().sum()
        dist.all_reduce(sq)
        # FSDP shards are disjoint over all ranks; expert shards repeat on every dp row
        total = torch.sqrt(sq[0] + sq[1] / self.layout.dp).float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g, _ in grads:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.device))
        return total

    # --- state with global shapes, for sharded checkpoints -------------------------------------
    def state_tensors(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model": {name: tensor}, "optim": {param name: {exp_avg, exp_avg_sq, step}}}: every tensor
        with its global shape (FSDP shards as DTensors, EP experts wrapped as DTensors sharded over
        the EP dimension), sharing storage with the live ones, so DCP can save them or load into them."""
        self.reshard()
        names = {id(p): n for n, p in self.model.named_parameters()}
        experts = {names[id(p)] for p in self.expert_params}
        ensure_adam_state(opt)
        model = {k: self._global(v) if k in experts else v for k, v in self.model.state_dict().items()}
        optim = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                wrap = self._global if names[id(p)] in experts else (lambda t: t)
                optim[names[id(p)]] = {k: wrap(v) if v.ndim else v for k, v in st.items()}
        return {"model": model, "optim": optim}

    def reshard(self) -> None:
        """Put every FSDP module back in its sharded state. The root keeps its parameters unsharded
        after a forward (reshard_after_forward=False), and a forward without a backward (the last
        evaluation) leaves them so: its registered parameters are then not the optimiser's."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _global(self, local: torch.Tensor):
        """An EP expert tensor (this rank's L experts) as a DTensor of all N: Replicate over dp,
        Shard(0) over ep."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        shape = (local.shape[0] * self.layout.ep, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False,
                                  shape=shape, stride=stride)  # fmt: skip


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
    Optimizer states are numbered in the order moe.train.build_optimizer lists a model's parameters
    without EP: matrices, then vectors."""
    named = list(model.named_parameters())
    order = [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]
    ids = [i for group in optim_sd["param_groups"] for i in group["params"]]
    if len(ids) != len(order):
        raise ValueError(f"checkpoint optimizer has {len(ids)} parameters, the model {len(order)}")
    return {"model": dict(model_sd), "optim": {n: optim_sd["state"][i] for n, i in zip(order, ids, strict=True)
                                               if i in optim_sd["state"]}}  # fmt: skip


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


def parallelize(model: nn.Module, layout: Layout, device: torch.device, *, bf16: bool,
                find_unused: bool = False) -> Parallel:  # fmt: skip
    """Apply `layout` to `model` (built identically on every rank, already on `device`)."""
    if layout.activation_checkpointing:
        _checkpoint_blocks(model)
    if layout.world == 1:
        return Parallel(model, model, layout)
    if layout.mode == "ddp":
        net = DistributedDataParallel(model, find_unused_parameters=find_unused, **_NO_BUFFER_SYNC)
        return Parallel(model, net, layout)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (layout.dp, layout.ep), mesh_dim_names=("dp", "ep"))
    world_mesh = mesh._flatten("world") if layout.ep > 1 else mesh["dp"]
    shard = None
    ignored: set[nn.Parameter] = set()
    if layout.ep > 1:
        ep_mesh = mesh["ep"]
        shard = ExpertShard(ep_mesh.get_group(), ep_mesh.get_local_rank(), layout.ep)
        for block in model.blocks:
            if block.is_moe:
                ignored.update(shard_experts_(block.ffn.experts, shard))
    # fp32 reduction of bf16 gradients; inputs are not cast, so the RoPE tables stay fp32.
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    kwargs = {"mesh": world_mesh, "ignored_params": ignored or None,
              "mp_policy": mp if bf16 and device.type == "cuda" else MixedPrecisionPolicy()}  # fmt: skip
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=layout.reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # root: embed, final norm, head
    return Parallel(model, model, layout, mesh, shard)


def eval_batches_per_rank(n_batches: int, world: int) -> int:
    """Forwards each rank runs in an evaluation when collectives run inside forward (FSDP, EP)."""
    return math.ceil(n_batches / world)
