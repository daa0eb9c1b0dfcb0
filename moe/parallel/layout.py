"""How one training run is laid out over ranks: DDP, FSDP2 per block, and expert parallelism (EP).

`ParallelConfig` says what is asked; `resolve_layout` checks it against the world size and the model
before anything is built; `parallelize` applies it to a built model and returns a `Parallel`, the
handle the training loop uses for what differs between layouts (gradient sync, clipping, sharded
state). Every rank sees data: the world is one data-parallel group of `world` ranks, seen as a
(dp, ep) DeviceMesh (rank = dp_index * ep + ep_index, so an EP group is `ep` consecutive ranks).

  ddp   every rank holds every parameter (DistributedDataParallel); today's behaviour.
  fsdp  FSDP2 `fully_shard` on every transformer block and on the root over all ranks: parameters,
        gradients and optimiser state are sharded; bf16 parameters with fp32 gradient reduction on
        CUDA when training in bf16 (MixedPrecisionPolicy). Routed expert weights are sharded on
        moe.parallel.ep.expert_shard_dim (dim 1 where the ranks do not divide the experts).
  ep>1  (fsdp only) the routed experts of every MoE layer are split over the EP group, E*G/ep per
        EP rank; tokens reach their experts by all-to-all (moe.parallel.ep). With dp > 1 each layer's
        experts are one more FSDP unit, over the dp dimension: a rank holds 1/(dp*ep) of the experts'
        parameters, gradients and AdamW state, and gathers its EP group's share for forward/backward.
        Every expert weight gets the average over all ranks' tokens, like the other parameters.

Numerics match one process accumulating the same micro-batches: routing, capacity dropping and the
balancing losses are computed per micro-batch on the rank that holds it, the expert loads for the
bias update are summed over all ranks by the loop, and gradients are averaged over all ranks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from moe.model.config import ModelConfig
from moe.parallel.ep import ExpertShard, expert_shard_dim, shard_experts_
from moe.parallel.state import ensure_adam_state, load_full_, local_part

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

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
        self,
        model: nn.Module,
        net: nn.Module,
        layout: Layout,
        expert_mesh: DeviceMesh | None = None,
        shard: ExpertShard | None = None,
    ):
        self.model, self.net, self.layout, self.shard = model, net, layout, shard
        self.expert_mesh = expert_mesh
        """EP: the (ep, dp) view of the mesh, on which the experts' global DTensors are laid out."""
        self.expert_params = self._expert_params()

    def _expert_params(self) -> list[nn.Parameter]:
        """EP: the routed experts' parameters (the optimiser's own group, moe.train.optim.build_optimizer)."""
        if self.shard is None:
            return []
        return [p for block in self.model.blocks if block.is_moe for p in block.ffn.experts.parameters()]

    @torch.no_grad()
    def materialize_(self, device: torch.device, seed: int, *, init: bool = True) -> None:
        """Allocate a model built on the meta device and sharded, and give it the weights one process
        builds after torch.manual_seed(seed), leaving the generator where that build leaves it. The init
        (Transformer.init_steps) is replayed one submodule at a time on the host at full size, drawing
        the same numbers in the same order, and each rank keeps its shard: host memory peaks at one
        submodule (the largest: an MoE layer's experts), not the model, and no rank ever holds more
        than its shards on the device. init=False only allocates (a resume loads every tensor next)."""
        from moe.model.transformer import Transformer

        self.model.to_empty(device=device)
        self.expert_params = self._expert_params()
        if not init:
            return
        torch.manual_seed(seed)  # sharding may have drawn from the generator (DTensor's RNG set-up)
        with torch.device("meta"):
            reference = Transformer(self.model.cfg)
        targets = self.model_tensors()
        done: set[str] = set()
        for name, draw in reference.init_steps():
            part = copy.deepcopy(reference.get_submodule(name)).to_empty(device="cpu")
            draw(part)
            full = {f"{name}.{k}": v for k, v in part.state_dict().items()}
            load_full_({k: targets[k] for k in full}, full)
            done.update(full)
        if missing := sorted(set(targets) - done):
            raise RuntimeError(f"Transformer.init_steps leaves {missing} uninitialised")

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
        """After the last backward of a step. Pure EP (dp == 1) keeps the experts as plain tensors
        outside FSDP: their gradients hold the sum over the EP group's tokens (the all-to-all's
        backward), which is every rank's; divide by the world as FSDP does for the other parameters.
        With dp > 1 FSDP reduces the experts itself (`parallelize`)."""
        if self.shard is None or self.layout.dp > 1:
            return
        for p in self.expert_params:
            if p.grad is not None:
                p.grad.div_(self.layout.world)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every rank's shards) to max_norm; returns the norm."""
        if not self.layout.sharded:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grads = [local_part(p.grad) for p in self.model.parameters() if p.grad is not None]
        dev = grads[0].device if grads else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for g in grads:
            sq += g.double().square().sum()
        # Every rank's shards are disjoint: FSDP units over the world, experts over ep (and dp).
        dist.all_reduce(sq)
        total = torch.sqrt(sq).float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
        return total

    # --- state with global shapes, for sharded checkpoints -------------------------------------
    def state_tensors(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model": {name: tensor}, "optim": {param name: {exp_avg, exp_avg_sq, step}}}: every tensor
        with its global shape (FSDP shards as DTensors, EP experts as DTensors of all N experts,
        `_global`), sharing storage with the live ones, so DCP can save them or load into them."""
        model = self.model_tensors()
        names = {id(p): n for n, p in self.model.named_parameters()}
        experts = self._expert_names()
        ensure_adam_state(opt)
        optim = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                wrap = self._global if names[id(p)] in experts else (lambda t: t)
                optim[names[id(p)]] = {k: wrap(v) if v.ndim else v for k, v in st.items()}
        return {"model": model, "optim": optim}

    def model_tensors(self) -> dict[str, Any]:
        """The model's part of `state_tensors`: {name: tensor with its global shape}."""
        self.reshard()
        experts = self._expert_names()
        return {k: self._global(v) if k in experts else v for k, v in self.model.state_dict().items()}

    def _expert_names(self) -> set[str]:
        ids = {id(p) for p in self.expert_params}
        return {n for n, p in self.model.named_parameters() if id(p) in ids}

    def reshard(self) -> None:
        """Put every FSDP module back in its sharded state. The root keeps its parameters unsharded
        after a forward (reshard_after_forward=False), and a forward without a backward (the last
        evaluation) leaves them so: its registered parameters are then not the optimiser's."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _global(self, t: torch.Tensor):
        """An EP expert tensor (this EP rank's L experts; with dp > 1 FSDP's DTensor of them, dim d
        chunked over dp as torch.chunk does) as a DTensor of all N = ep*L experts. EP rank e owns
        global experts [e*L, (e+1)*L), so the order is ep-major: on the (ep, dp) mesh that is
        [Shard(0), Shard(d)], dim 0 split over ep first, then each part over dp (uneven chunks too)."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (t.shape[0] * self.layout.ep, *t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        dim = t.placements[0].dim if isinstance(t, DTensor) else 0
        return DTensor.from_local(
            local_part(t),
            self.expert_mesh,
            [Shard(0), Shard(dim)],
            run_check=False,
            shape=shape,
            stride=stride,
        )


def _expert_placements(experts: list[nn.Module], dp: int) -> Callable[[nn.Parameter], Any]:
    """fully_shard's shard_placement_fn: routed expert weights on `expert_shard_dim`, the rest on dim 0."""
    from torch.distributed.tensor import Shard

    dims = {
        id(p): expert_shard_dim(e.w1.shape[0], dp, e.d_model, e.d_hidden)
        for e in experts
        for p in e.parameters()
    }
    return lambda p: Shard(dims[id(p)]) if dims.get(id(p)) else None


def parallelize(
    model: nn.Module, layout: Layout, device: torch.device, *, bf16: bool, find_unused: bool = False
) -> Parallel:
    """Apply `layout` to `model` (built identically on every rank, already on `device`)."""
    if layout.activation_checkpointing:
        _checkpoint_blocks(model)
    if layout.world == 1:
        return Parallel(model, model, layout)
    if layout.mode == "ddp":
        net = DistributedDataParallel(model, find_unused_parameters=find_unused, **_NO_BUFFER_SYNC)
        return Parallel(model, net, layout)

    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (layout.dp, layout.ep), mesh_dim_names=("dp", "ep"))
    world_mesh = mesh._flatten("world") if layout.ep > 1 else mesh["dp"]
    # fp32 reduction of bf16 gradients; inputs are not cast, so the RoPE tables stay fp32.
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    mp = mp if bf16 and device.type == "cuda" else MixedPrecisionPolicy()
    shard = expert_mesh = None
    experts = [block.ffn.experts for block in model.blocks if block.is_moe]
    ignored: set[nn.Parameter] = set()
    if layout.ep > 1:
        ep_group, dp_group = mesh["ep"].get_group(), mesh["dp"].get_group()
        shard = ExpertShard(ep_group, mesh["ep"].get_local_rank(), layout.ep)
        # the same process groups, dims swapped: checkpoints' global expert tensors (Parallel._global)
        expert_mesh = DeviceMesh.from_group(
            [ep_group, dp_group], device.type, mesh=mesh.mesh.t(), mesh_dim_names=("ep", "dp")
        )
        for module in experts:
            kept = shard_experts_(module, shard)
            if layout.dp == 1:  # pure EP: plain tensors outside FSDP (Parallel.finish_gradients)
                ignored.update(kept)
    place = _expert_placements(experts, layout.dp)
    if layout.ep > 1 and layout.dp > 1:  # each layer's EP share of experts: an FSDP unit over dp
        for module in experts:
            fully_shard(
                module,
                mesh=mesh["dp"],
                mp_policy=mp,
                shard_placement_fn=place,
                reshard_after_forward=layout.reshard_after_forward,
            )
            # The reduce-scatter sums over dp gradients that each already sum the EP group's tokens
            # (all-to-all backward): all ranks' tokens, so divide by the world, not by dp, to get
            # the average FSDP gives the other parameters. A plain SUM then a division: gloo has no
            # PREMUL_SUM.
            module.set_gradient_divide_factor(float(layout.world))
            module.set_force_sum_reduction_for_comms(True)
    kwargs = {
        "mesh": world_mesh,
        "ignored_params": ignored or None,
        "mp_policy": mp,
        "shard_placement_fn": place,
    }
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):  # the experts' own FSDP units (dp > 1) are left out of theirs
        # The last block's backward comes right after its forward: resharding it would only gather the
        # same parameters again.
        reshard = layout.reshard_after_forward and i < last
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # root: embed, final norm, head
    return Parallel(model, model, layout, expert_mesh, shard)


def eval_batches_per_rank(n_batches: int, world: int) -> int:
    """Forwards each rank runs in an evaluation when collectives run inside forward (FSDP, EP)."""
    return math.ceil(n_batches / world)
