"""Training memory per rank, computed analytically from a `ModelConfig` (no weights allocated).

Bytes per rank = params + grads + optimizer + activations + workspace; a 56B config takes microseconds.
Layouts are moe.parallel.layout's: world = dp_shard * ep; `ddp` replicates everything; `fsdp` shards every
state over the world, experts too (each EP rank's E*G/ep over dp: moe.parallel.ep.expert_share).
T = micro_batch_seqs * seq_len tokens, D = d_model, H = heads, V = vocab, N = E*G, K = k*G, F = d_expert/G,
a = activation bytes (4 fp32, 2 bf16), f = 4 (tensors kept in fp32), i = 8 (int64 indices).

States, bytes per parameter (ZeRO, Rajbhandari et al. 2020 sec. 3.1: mixed-precision Adam = 2+2+12):
  precision       params  grads  optimizer
  fp32              4       4      8       AdamW exp_avg + exp_avg_sq
  bf16-mixed        2       2     12       fp32 master + exp_avg + exp_avg_sq; FSDP2's bf16 policy holds
                                           the same 16 bytes as fp32 shards (params 4, grads 4, AdamW 8)
  bf16-autocast     4       4      8       fp32 weights under torch.autocast (moe.train.loop without FSDP)
  + 4 bytes per parameter tensor: AdamW's fp32 `step` 0-dim tensor (never sharded).

Activations: what autograd saves for backward at one micro-batch, per token (the CPU kernels tensor
for tensor; CUDA's fused RMSNorm saves less, so the estimate errs high there):
  per block     2 RMSNorms: input, normalised x, rstd        2 * (2Da + f)
                wq/wk/wv input, wo input                     2Da
                attention: q, k, v (after RoPE and the GQA repeat), output, logsumexp   4Da + Hf
                FFN input                                    Da
  dense FFN     swiglu a1, a3, silu(a1), product: 4 d_ff a;  gelu a1, gelu(a1): 2 d_ff a
  MoE           router: logits, probs 2Nf; top-k and sort indices 3Ki; gates 2Kf
                experts, grouped backend: the input projections of the K routed copies, K*F*(2|1)a;
                  reference backend: K gathered copies of the token, the K outputs before and after
                  gating (index_add keeps its source), 3KDa + K*F*(4|2)a -- k*G copies grow with G
                ep > 1: the received rows (with their gate) and the returned outputs, K(2D + 1)a
                shared experts: each a dense FFN of d_shared (+ Da + 2f when gated); out_norm Da + 2f
  head          final RMSNorm 2Da + f, LM-head input Da, fp32 log-probabilities Vf (dominant for small
                models), token ids i
  checkpointing each block keeps only its input (Da) and one block is recomputed at a time:
                blocks * Da + the largest block + head.

Workspace (alive beside the saved tensors; c = compute bytes of a weight, 2 under bf16):
  logits        the (B, S, V) logits the caller holds and two fp32 gradients of them in the head's
                backward: T * V * (a + 2f)
  bf16 casts    2 bytes per weight: bf16-autocast, every matmul weight (autocast caches and saves them);
                pure EP (dp_shard = 1), the local experts (outside FSDP's bf16 policy, cast by moe.model.experts)
  fsdp          the root unit (embedding, head, final norm) stays gathered, c per weight; two blocks in
                flight (+ prefetch) and one's unreduced grads, 3c per weight of the largest, with its
                EP rank's experts (gathered over dp; none under pure EP, dp_shard = 1)
  ep > 1        the dispatch rows of one layer, T * K * (D + 1) * a
  ddp           DistributedDataParallel's bucket copy of every gradient (world > 1)
Not counted: allocator fragmentation, the CUDA context, NCCL buffers, kernel scratch space, routing
imbalance (a dropless expert may receive more than its share): see docs/memory.md for the margin.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from moe.model.accounting import count_params, ffn_matrices
from moe.model.config import ModelConfig
from moe.model.experts import grouped_supported
from moe.model.validate import validate_model_config
from moe.parallel.ep import expert_share
from moe.train.optim import MEMORY_PRECISIONS, ExpertDevice, MemoryPrecision, ParallelMode

# (params, grads, optimizer) bytes per parameter and activation bytes, per precision.
_STATE_BYTES = {"fp32": (4, 4, 8), "bf16-mixed": (2, 2, 12), "bf16-autocast": (4, 4, 8)}
_ACT_BYTES = {"fp32": 4, "bf16-mixed": 2, "bf16-autocast": 2}
_F32, _I64 = 4, 8
DEFAULT_MARGIN = 0.15
"""Fraction of the target's memory kept free for what the estimate leaves out (docs/memory.md)."""
GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory of one rank, in bytes (formula in the module docstring)."""

    params: int
    """Parameter tensors held on this rank (bf16 under bf16-mixed, fp32 otherwise), after sharding."""
    grads: int
    """`.grad` tensors, same dtype and sharding as the parameters."""
    optimizer: int
    """AdamW exp_avg and exp_avg_sq (fp32), the fp32 master weights under bf16-mixed, and the `step`
    scalars."""
    activations: int
    """Tensors autograd saves in one micro-batch's forward for its backward (parameters excluded)."""
    workspace: int
    """Transients beside them: held logits and their gradients, bf16 weight casts, FSDP all-gathered
    units, expert-parallel dispatch rows, DDP gradient buckets."""
    total: int
    """Sum of the above: the estimated peak."""

    def describe(self) -> str:
        parts = ("params", "grads", "optimizer", "activations", "workspace")
        terms = " + ".join(f"{name} {getattr(self, name) / GiB:.2f}" for name in parts)
        return f"{terms} = {self.total / GiB:.2f} GiB per rank"


@dataclass(frozen=True)
class MemoryPlan:
    """A moe.parallel.layout layout (mode fsdp) and micro-batch that fits, with its estimate."""

    dp_shard: int
    """parallel.dp_shard: ranks of the data-parallel mesh dimension."""
    ep: int
    """parallel.ep: ranks that share the routed experts (E*G/ep each)."""
    activation_checkpointing: bool
    """parallel.activation_checkpointing: recompute each block in backward."""
    micro_batch_seqs: int
    """Sequences per forward/backward on one rank (train.micro_batch_tokens / model.seq_len)."""
    gpus_per_node: int
    """GPUs on each node of the target."""
    estimate: MemoryEstimate
    """Memory per rank of this layout."""

    @property
    def gpus(self) -> int:
        return self.dp_shard * self.ep

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    def describe(self) -> str:
        return (
            f"{self.nodes} node(s) x {min(self.gpus, self.gpus_per_node)} GPUs: parallel.mode=fsdp "
            f"parallel.dp_shard={self.dp_shard} parallel.ep={self.ep} "
            f"parallel.activation_checkpointing={str(self.activation_checkpointing).lower()}, "
            f"micro-batch {self.micro_batch_seqs} seqs; {self.estimate.describe()}"
        )


def _positive_int(key: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{key}={v!r} must be a positive integer")


def _validate(
    model: ModelConfig, micro_batch_seqs: int, precision: str, dp_shard: int, ep: int, mode: str, device: str
) -> None:
    validate_model_config(model)
    _positive_int("micro_batch_seqs", micro_batch_seqs)
    _positive_int("parallel.dp_shard", dp_shard)
    _positive_int("parallel.ep", ep)
    if precision not in MEMORY_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(MEMORY_PRECISIONS)}")
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"parallel.mode={mode!r} is not one of ddp, fsdp")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not one of cpu, cuda")
    if ep > 1 and (model.moe is None or mode != "fsdp"):
        need = (
            "experts, but model.moe is None" if model.moe is None else f"parallel.mode='fsdp' (got {mode!r})"
        )
        raise ValueError(f"parallel.ep={ep} needs {need}")
    if model.moe is not None and model.moe.n_routed % ep:
        raise ValueError(f"parallel.ep={ep} does not divide moe experts E*G={model.moe.n_routed}")


def _grouped_backend(model: ModelConfig, precision: str, device: str) -> bool:
    """Whether the experts run on the grouped backend, as `Experts.resolved_backend` would decide."""
    m = model.moe
    if m is None or m.backend != "auto":
        return m is not None and m.backend == "grouped"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    d_fine = model.d_expert // m.granularity
    # moe.model.experts: CUDA's kernel is bf16-only (and needs sm80+, assumed); CPU takes fp32 and bf16.
    aligned = grouped_supported(torch.device("cpu"), dtype, model.d_model, d_fine)
    return aligned and (device == "cpu" or dtype == torch.bfloat16)


def _n_param_tensors(model: ModelConfig) -> int:
    """Parameter tensors of `Transformer(model)` (moe/model/config.py), one AdamW `step` each: embed, final norm
    (+ lm_head); per block 2 norms, wq/wk/wv/wo and its FFN (MoE: router, experts, shared, gate, norm)."""
    mats, m, n_moe = ffn_matrices(model.activation), model.moe, _n_moe(model)
    per_moe = 1 + mats * (1 + m.num_shared) + int(m.shared_gate) + 2 * int(m.output_norm) if m else 0
    return (
        3 - int(model.tie_embeddings) + 6 * model.n_layers + mats * (model.n_layers - n_moe) + per_moe * n_moe
    )


def _n_moe(model: ModelConfig) -> int:
    return sum(model.is_moe_layer(i) for i in range(model.n_layers))


def _block_activations(model: ModelConfig, moe: bool, a: int, grouped: bool, ep: int) -> int:
    """Bytes one block saves for backward, per token."""
    D, mats = model.d_model, ffn_matrices(model.activation)
    hidden_saved = 4 if model.activation == "swiglu" else 2  # a1, a3, silu(a1), product | a1, gelu(a1)
    attn = 2 * (2 * D * a + _F32) + 2 * D * a + 4 * D * a + model.n_heads * _F32 + D * a
    m = model.moe
    if not moe or m is None:
        return attn + hidden_saved * model.d_ff * a
    N, K, F = m.n_routed, m.k_routed, model.d_expert // m.granularity
    router = 2 * N * _F32 + 3 * K * _I64 + 2 * K * _F32
    experts = K * F * (mats - 1) * a if grouped else 3 * K * D * a + hidden_saved * K * F * a
    dispatch = K * (2 * D + 1) * a if ep > 1 else 0
    gated = (D * a + 2 * _F32) if m.shared_gate else 0
    shared = m.num_shared * (hidden_saved * model.d_shared * a + gated)
    out_norm = D * a + 2 * _F32 if m.output_norm else 0
    return attn + router + experts + dispatch + shared + out_norm


def _activations(model: ModelConfig, a: int, grouped: bool, ep: int, checkpointing: bool) -> int:
    """Bytes saved for backward per token: blocks (or their inputs and one recomputed block) + head."""
    blocks = [_block_activations(model, model.is_moe_layer(i), a, grouped, ep) for i in range(model.n_layers)]
    head = 2 * model.d_model * a + _F32 + model.d_model * a + model.vocab_size * _F32 + _I64
    body = model.n_layers * model.d_model * a + max(blocks) if checkpointing else sum(blocks)
    return body + head


def _largest_block_params(model: ModelConfig, routed: int) -> int:
    """Parameters of the largest block (an FSDP unit) with `routed` of all layers' experts gathered."""
    p, n_moe = count_params(model), _n_moe(model)
    n_dense = model.n_layers - n_moe
    common = (p.attention + 2 * model.d_model * model.n_layers) // model.n_layers  # attention + 2 norms
    blocks = [common + p.dense_ffn // n_dense] if n_dense else []
    if n_moe:
        rest = p.shared + p.router + p.norms - (2 * model.n_layers + 1) * model.d_model  # + out_norm
        blocks.append(common + (routed + rest) // n_moe)
    return max(blocks)


def estimate_memory(
    model: ModelConfig,
    micro_batch_seqs: int,
    *,
    precision: MemoryPrecision,
    dp_shard: int = 1,
    ep: int = 1,
    activation_checkpointing: bool = False,
    mode: ParallelMode = "fsdp",
    device: ExpertDevice = "cuda",
) -> MemoryEstimate:
    """Peak training memory of one rank for micro-batches of `micro_batch_seqs` x `model.seq_len` tokens.

    dp_shard, ep, activation_checkpointing and mode are moe.parallel.layout's `parallel.*` keys (dp_shard
    resolved: world = dp_shard * ep); with one rank the mode does not matter. device picks the expert
    backend `moe.backend='auto'` resolves to. ValueError naming the key on a bad input."""
    _validate(model, micro_batch_seqs, precision, dp_shard, ep, mode, device)
    p = count_params(model)
    b_param, b_grad, b_opt = _STATE_BYTES[precision]
    a, c = _ACT_BYTES[precision], (4 if precision == "fp32" else 2)
    tokens, world = micro_batch_seqs * model.seq_len, dp_shard * ep
    fsdp, n_moe = mode == "fsdp" and world > 1, _n_moe(model)
    rest, experts, m = p.total - p.routed_total, p.routed_total // ep, model.moe  # experts: this EP rank's
    d_fine = model.d_expert // m.granularity if m else 0
    share = expert_share(m.n_routed // ep, dp_shard, model.d_model, d_fine) if m else 1  # fullest rank's
    local = math.ceil(rest / world) + int(experts * share) if fsdp else p.total
    steps = _n_param_tensors(model) * _F32  # AdamW's `step`
    params, grads, optimizer = local * b_param, local * b_grad, local * b_opt + steps

    grouped = _grouped_backend(model, precision, device)
    activations = tokens * _activations(model, a, grouped, ep, activation_checkpointing)

    workspace = tokens * model.vocab_size * (a + 2 * _F32)
    if precision == "bf16-autocast":
        workspace += 2 * (p.total - p.norms - p.router - p.routed_total + experts)
    elif ep > 1 and dp_shard == 1 and precision == "bf16-mixed":  # per MoE layer; one at a time recomputed
        workspace += 2 * (experts // n_moe if activation_checkpointing else experts)
    if fsdp:
        root = p.embedding + p.lm_head + model.d_model
        workspace += c * root + 3 * c * _largest_block_params(model, experts if dp_shard > 1 else 0)
    if ep > 1 and model.moe is not None:
        workspace += tokens * model.moe.k_routed * (model.d_model + 1) * a
    if mode == "ddp" and world > 1:
        workspace += grads
    total = params + grads + optimizer + activations + workspace
    return MemoryEstimate(params, grads, optimizer, activations, workspace, total)


def fits(estimate: MemoryEstimate, memory_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether the estimate leaves `margin` of `memory_bytes` free."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin} must be in [0, 1)")
    return estimate.total <= (1 - margin) * memory_bytes


def _halvings(n: int) -> list[int]:
    """n, n/2, ... down to 1, kept where they divide n (so gradient accumulation keeps the batch)."""
    return [n >> j for j in range(n.bit_length()) if n % (n >> j) == 0]


def _gpu_counts(gpus_per_node: int, max_nodes: int) -> list[int]:
    """1, 2, 4, ... within one node, then whole nodes: the rank counts a layout may use."""
    within = [g for g in (2**j for j in range(gpus_per_node.bit_length())) if g < gpus_per_node]
    return within + [n * gpus_per_node for n in range(1, max_nodes + 1)]


def find_layout(
    model: ModelConfig,
    micro_batch_seqs: int,
    gpu_memory_bytes: int,
    gpus_per_node: int,
    max_nodes: int,
    *,
    precision: MemoryPrecision = "bf16-mixed",
    margin: float = DEFAULT_MARGIN,
    allow_checkpointing: bool = True,
) -> MemoryPlan | None:
    """The smallest fsdp layout whose estimate fits `gpu_memory_bytes` with `margin` free, or None.

    Order of preference: fewest GPUs; then no activation checkpointing (it costs a recomputed forward);
    then the largest micro-batch (halving `micro_batch_seqs`, so gradient accumulation keeps the batch);
    then the smallest ep. allow_checkpointing=False searches only layouts without recomputation."""
    _positive_int("gpu_memory_bytes", gpu_memory_bytes)
    _positive_int("gpus_per_node", gpus_per_node)
    _positive_int("max_nodes", max_nodes)
    _validate(model, micro_batch_seqs, precision, 1, 1, "fsdp", "cuda")
    n_routed = model.moe.n_routed if model.moe is not None else 1
    candidates = (
        (gpus, ckpt, mb, ep)
        for gpus in _gpu_counts(gpus_per_node, max_nodes)
        for ckpt in ((False, True) if allow_checkpointing else (False,))
        for mb in _halvings(micro_batch_seqs)
        for ep in range(1, gpus + 1)
        if gpus % ep == 0 and n_routed % ep == 0
    )
    for gpus, ckpt, mb, ep in candidates:
        est = estimate_memory(
            model, mb, precision=precision, dp_shard=gpus // ep, ep=ep, activation_checkpointing=ckpt
        )
        if fits(est, gpu_memory_bytes, margin):
            return MemoryPlan(gpus // ep, ep, ckpt, mb, gpus_per_node, est)
    return None


def check_memory(
    model: ModelConfig,
    micro_batch_seqs: int,
    memory_bytes: int,
    *,
    target: str,
    precision: MemoryPrecision,
    dp_shard: int = 1,
    ep: int = 1,
    activation_checkpointing: bool = False,
    mode: ParallelMode = "fsdp",
    device: ExpertDevice = "cuda",
    margin: float = DEFAULT_MARGIN,
    gpus_per_node: int = 1,
    max_nodes: int = 1,
) -> MemoryEstimate:
    """The estimate, or ValueError with its numbers and what to change when it does not fit.

    `target` names the memory in the message ("this machine's RAM", "hydra.launcher.mem_gb=64"). Suggested: on CUDA
    the smallest fsdp layout within gpus_per_node x max_nodes that fits, else the largest micro-batch."""

    def at(mb: int) -> MemoryEstimate:  # the same layout at another micro-batch
        return estimate_memory(
            model,
            mb,
            precision=precision,
            dp_shard=dp_shard,
            ep=ep,
            mode=mode,
            activation_checkpointing=activation_checkpointing,
            device=device,
        )

    est = at(micro_batch_seqs)
    if fits(est, memory_bytes, margin):
        return est
    msg = (
        f"training memory {est.describe()} exceeds {(1 - margin) * memory_bytes / GiB:.2f} GiB "
        f"({1 - margin:.0%} of {target}, {memory_bytes / GiB:.2f} GiB) at micro_batch_seqs={micro_batch_seqs}, "
        f"model.seq_len={model.seq_len}, precision={precision}, parallel.mode={mode}, "
        f"parallel.dp_shard={dp_shard}, parallel.ep={ep}, parallel.activation_checkpointing={activation_checkpointing}"
    )
    if device == "cuda":
        layout = find_layout(
            model,
            micro_batch_seqs,
            memory_bytes,
            gpus_per_node,
            max_nodes,
            precision=precision,
            margin=margin,
        )
        if layout is not None:
            raise ValueError(f"{msg}; a layout that fits: {layout.describe()}")
    for mb in _halvings(micro_batch_seqs)[1:]:
        if fits(cand := at(mb), memory_bytes, margin):
            raise ValueError(
                f"{msg}; micro_batch_seqs={mb} (train.micro_batch_tokens={mb * model.seq_len}) fits: "
                f"{cand.describe()}"
            )
    where = f", nor any layout within {max_nodes} node(s) x {gpus_per_node} GPUs," if device == "cuda" else ""
    raise ValueError(
        f"{msg}; not even micro_batch_seqs=1{where} fits ({at(1).describe()}): shard over more GPUs, "
        "shorten model.seq_len or pick a smaller model"
    )


def local_memory_bytes(device: ExpertDevice) -> int:
    """Total memory of this machine's RAM (cpu) or of the current CUDA device (cuda)."""
    if device == "cuda":  # raises where CUDA is unavailable
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
