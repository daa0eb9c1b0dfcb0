"""Routed expert compute over a dispatch plan sorted by expert (see moe.model.router.Routing).

Shape legend:
  T = tokens, D = d_model, F = fine expert hidden size (d_expert/G), N = routed experts (E*G),
  A = kept assignments (grouped by expert), C = rows of one slice of them, H = 2F ([w1 | w3]).

Both backends compute out_T = sum over the token's kept assignments a of gate_a * expert_a(x_T):
  reference  gather once, torch.split per expert, one matmul chain per expert, index_add back.
  grouped    one grouped_mm per projection over each slice of the sorted buffer (on CPU slices of
             CPU_CHUNK_ROWS rows, elsewhere and under torch.compile the whole buffer), with a
             hand-written backward (`_GroupedMLP`) that saves only the two input projections (A x F
             each) and regathers x per slice, so peak memory stays near a dense FFN's.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.model.config import GROUPED_ALIGN, Activation, Backend, InitScheme
from moe.model.ffn import hidden, init_weight_
from moe.model.router import Routing


class ExpertDispatch(Protocol):
    """Expert parallelism as the model sees it: experts spread over ranks, handed in by the parallel
    layout (moe.parallel.ep.ExpertShard); the model imports no parallel code."""

    def dispatch_combine(
        self, x_TD: Tensor, gate_A: Tensor, r: Routing, local: Callable[[Tensor, Routing], Tensor]
    ) -> Tensor: ...


# Rows of the sorted (A, D) buffer the grouped backend handles at once on CPU. The gathered inputs,
# expert outputs and their gradients are the layer's largest tensors (k*G rows per token); in slices
# they stay in cache and reuse freed memory, where a fresh full-size buffer costs a page fault per
# 4 KiB (a 512 MB gather took ~0.6 s here, 7x the same rows gathered in 4096-row slices).
# 1024-4096 measured alike in CPU time at d_model 512; smaller adds per-slice Python overhead.
CPU_CHUNK_ROWS = 2048

_grouped_mm_kernel = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# Opaque to torch.compile: grouped_mm's own fake kernel insists on bf16 (a CUDA-only rule), which
# breaks tracing fp32 CPU graphs; this op's fake kernel states the output shape instead.
@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def _grouped_mm_op(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    return _grouped_mm_kernel(mat_a, mat_b, offs=offs)


@_grouped_mm_op.register_fake
def _(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    if mat_b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N)
        return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1])
    return mat_a.new_empty(offs.shape[0], mat_a.shape[0], mat_b.shape[1])  # (K, M) x (M, N) -> (G, K, N)


def _grouped_mm(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    """The custom op while compiling; the kernel itself in eager, where the op's dispatch costs
    ~0.4 ms a call (hundreds of calls a step on CPU slices)."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(mat_a, mat_b, offs)
    return _grouped_mm_kernel(mat_a, mat_b, offs=offs)


def grouped_supported(device: torch.device, dtype: torch.dtype, d_model: int, d_hidden: int) -> bool:
    """Whether `auto` may use grouped_mm: it exists, sizes are aligned, and the device/dtype has a kernel."""
    if _grouped_mm_kernel is None or d_model % GROUPED_ALIGN or d_hidden % GROUPED_ALIGN:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":  # the CUDA kernel is bf16-only and needs sm80+
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def _hidden_and_backward(a13_AH: Tensor, activation: Activation):
    """h = hidden(a1, a3) from the fused projections a13 = [a1 | a3] (swiglu) or a1 (gelu), and a
    function writing d a13 for a given d h; silu(a1) is computed once for both.

    Uses the aten backward kernels autograd itself uses, so both backends round alike.
    """
    if activation == "gelu":
        return F.gelu(a13_AH), lambda dh_AF: torch.ops.aten.gelu_backward(dh_AF, a13_AH)
    a1_AF, a3_AF = a13_AH.chunk(2, dim=-1)
    s_AF = F.silu(a1_AF)

    def backward(dh_AF: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # dynamo rejects strided out=; inductor fuses the cat
            da1 = torch.ops.aten.silu_backward(dh_AF * a3_AF, a1_AF)
            return torch.cat([da1, dh_AF * s_AF], dim=-1)
        da13_AH = torch.empty_like(a13_AH)  # eager: write both halves in place, no extra copy
        da1_AF, da3_AF = da13_AH.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(dh_AF * a3_AF, a1_AF, grad_input=da1_AF)
        torch.mul(dh_AF, s_AF, out=da3_AF)
        return da13_AH

    return s_AF * a3_AF, backward


def row_chunks(counts_N: Tensor, n_rows: int, chunk_rows: int | None) -> list[tuple[int, int, int, int]]:
    """Slices (r0, r1, e0, e1) of a sorted buffer of `n_rows` assignments: rows [r0, r1), owned by
    experts e0..e1-1 (an expert may span slices). One slice, with no host sync, when `chunk_rows` is
    None or covers the buffer."""
    n_experts = counts_N.shape[0]
    if chunk_rows is None or n_rows <= chunk_rows:
        return [(0, n_rows, 0, n_experts)]
    ends = list(itertools.accumulate(counts_N.tolist()))
    chunks = []
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(n_rows, r0 + chunk_rows)
        # first expert ending after r0 .. first ending at or after r1; empty experts between are skipped
        chunks.append(
            (r0, r1, bisect.bisect_right(ends, r0), min(n_experts, bisect.bisect_left(ends, r1) + 1))
        )
    return chunks


def _local_offs(offs_N: Tensor, r0: int, r1: int, e0: int, e1: int) -> Tensor:
    """Group ends of experts e0..e1-1 within rows [r0, r1)."""
    return (offs_N[e0:e1] - r0).clamp(0, r1 - r0)


def _w13(w1: Tensor, w3: Tensor | None, e0: int, e1: int) -> Tensor:
    """[w1 | w3] of experts e0..e1-1, built per slice so no full concatenated copy stays alive."""
    return torch.cat([w1[e0:e1], w3[e0:e1]], dim=-1) if w3 is not None else w1[e0:e1]


class _GroupedMLP(torch.autograd.Function):
    """out_TD = index_add over a of gate_a * w2_e(hidden(w1_e x, w3_e x)), e = expert of a.

    Runs slice by slice over `chunks`, (r0, r1, e0, e1): rows [r0, r1) of the sorted buffer, which
    experts e0..e1-1 own. w1 and w3 run as one grouped matmul against the slice's [w1 | w3] (H = 2F
    columns). Saves x, the weights and the input projections a13 (as the dense FFN saves a1, a3).
    """

    @staticmethod
    def forward(ctx, x_TD, token_A, gate_A, offs_N, w1, w3, w2, activation, gate_hidden, chunks):
        out_TD = x_TD.new_zeros(x_TD.shape)
        a13 = []
        for r0, r1, e0, e1 in chunks:
            tok_C, g_C1, offs_c = (
                token_A[r0:r1],
                gate_A[r0:r1].unsqueeze(1),
                _local_offs(offs_N, r0, r1, e0, e1),
            )
            a13_CH = _grouped_mm(x_TD.index_select(0, tok_C), _w13(w1, w3, e0, e1), offs_c)
            h_CF, _ = _hidden_and_backward(a13_CH, activation)
            # Scale on the narrower side: hidden when F < D (fine experts), output otherwise.
            if gate_hidden:
                y_CD = _grouped_mm(h_CF.mul_(g_C1), w2[e0:e1], offs_c)
            else:
                y_CD = _grouped_mm(h_CF, w2[e0:e1], offs_c).mul_(g_C1)
            out_TD.index_add_(0, tok_C, y_CD)
            a13.append(a13_CH)
        ctx.save_for_backward(x_TD, token_A, gate_A, offs_N, w1, w3, w2, *a13)
        ctx.activation, ctx.chunks = activation, chunks
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, token_A, gate_A, offs_N, w1, w3, w2, *a13 = ctx.saved_tensors
        need = ctx.needs_input_grad
        # grouped_mm's backward fails on an expanded (stride-0) grad_output (torch 2.13): make it contiguous.
        dout_TD = dout_TD.contiguous()
        dx_TD = torch.zeros_like(x_TD) if need[0] else None
        dgate_A = torch.empty_like(gate_A) if need[2] else None
        # Zeros: an expert split across slices sums its parts; one with no rows gets 0.
        dw1 = torch.zeros_like(w1) if need[4] else None
        dw3 = torch.zeros_like(w3) if need[5] else None
        dw2 = torch.zeros_like(w2) if need[6] else None
        F_ = w1.shape[-1]
        for (r0, r1, e0, e1), a13_CH in zip(ctx.chunks, a13, strict=True):
            tok_C, g_C1, offs_c = (
                token_A[r0:r1],
                gate_A[r0:r1].unsqueeze(1),
                _local_offs(offs_N, r0, r1, e0, e1),
            )
            dy_CD = dout_TD.index_select(0, tok_C)
            h_CF, act_backward = _hidden_and_backward(a13_CH, ctx.activation)
            dh_CF = _grouped_mm(dy_CD, w2[e0:e1].transpose(-2, -1), offs_c)  # d/d(gated hidden)
            if dgate_A is not None:  # d gate_a = <dy_a, w2 h_a> = <dh_a, h_a>
                dgate_A[r0:r1] = torch.linalg.vecdot(dh_CF, h_CF)
            if dw2 is not None:
                dw2[e0:e1] += _grouped_mm(h_CF.mul_(g_C1).transpose(0, 1), dy_CD, offs_c)
            del h_CF, dy_CD
            da13_CH = act_backward(dh_CF.mul_(g_C1))
            del dh_CF, act_backward
            if dw1 is not None or dw3 is not None:
                dw13 = _grouped_mm(x_TD.index_select(0, tok_C).transpose(0, 1), da13_CH, offs_c)
                if dw1 is not None:
                    dw1[e0:e1] += dw13[..., :F_]
                if dw3 is not None:
                    dw3[e0:e1] += dw13[..., F_:]
                del dw13
            if dx_TD is not None:
                dx_CD = _grouped_mm(da13_CH, _w13(w1, w3, e0, e1).transpose(-2, -1), offs_c)
                dx_TD.index_add_(0, tok_C, dx_CD)
        return dx_TD, None, dgate_A, None, dw1, dw3, dw2, None, None, None


def reference_experts(
    x_TD: Tensor,
    r: Routing,
    gate_A: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    activation: Activation,
) -> Tensor:
    """Per-expert loop on torch.split views of the sorted buffer (split, not slicing: xs[s:s+c] measured ~4x slower on CPU)."""
    x_AD = x_TD.index_select(0, r.token_A)
    sizes = r.counts_N.tolist()
    w3s = w3.unbind(0) if w3 is not None else [None] * len(sizes)
    ys = []
    for x_cD, w1_DF, w3_DF, w2_FD in zip(x_AD.split(sizes), w1.unbind(0), w3s, w2.unbind(0), strict=True):
        a3 = x_cD @ w3_DF if w3_DF is not None else None
        ys.append(hidden(x_cD @ w1_DF, a3, activation) @ w2_FD)
    y_AD = torch.cat(ys) * gate_A.unsqueeze(1)
    return torch.zeros_like(x_TD).index_add(0, r.token_A, y_AD)


def split_hidden(w_NDF: Tensor, granularity: int) -> Tensor:
    """(N, D, F) -> (N*G, D, F/G): expert n's hidden columns in G consecutive slices, slice g becoming
    expert n*G + g. A w2 (N, F, D) needs no cut: its reshape to (N*G, F/G, D) is the same split."""
    N, D, F_ = w_NDF.shape
    G = granularity
    return w_NDF.reshape(N, D, G, F_ // G).permute(0, 2, 1, 3).reshape(N * G, D, F_ // G).clone()


class Experts(nn.Module):
    """N fine experts stored as stacked weights: w1/w3 (N, D, F), w2 (N, F, D)."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, activation: Activation, backend: Backend):
        super().__init__()
        self.activation, self.backend = activation, backend
        self.d_model, self.d_hidden = d_model, d_hidden
        self.chunk_rows: int | None = CPU_CHUNK_ROWS
        """Grouped backend on CPU: rows of the sorted buffer per slice (None: the whole buffer at once)."""
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.ep: ExpertDispatch | None = None
        """Expert parallelism: the EP group this module holds a share of the experts of (moe.parallel.ep);
        None: all N experts are here."""

    def resolved_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend `forward` uses for inputs on `device` computed in `dtype`."""
        if self.backend != "auto":
            return self.backend
        ok = grouped_supported(device, dtype, self.d_model, self.d_hidden)
        return "grouped" if ok else "reference"

    def forward(self, x_TD: Tensor, r: Routing) -> Tensor:
        dev = x_TD.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_TD.dtype
        with torch.autocast(dev, enabled=False):
            # Explicit casts replace autocast so both backends see identical operand dtypes.
            x_TD, gate_A = x_TD.to(dtype), r.gate_A.to(dtype)
            if self.ep is not None:  # experts spread over an EP group: all-to-all to their ranks
                return self.ep.dispatch_combine(x_TD, gate_A, r, self._local)
            return self._local(x_TD, dataclasses.replace(r, gate_A=gate_A))

    def _local(self, x_TD: Tensor, r: Routing) -> Tensor:
        """The experts held here on x_TD per the plan `r` (gate_A already in x_TD's dtype)."""
        dtype = x_TD.dtype
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        w3 = self.w3.to(dtype) if self.w3 is not None else None
        if self.resolved_backend(x_TD.device, dtype) == "reference":
            return reference_experts(x_TD, r, r.gate_A, w1, w3, w2, self.activation)
        offs_N = torch.cumsum(r.counts_N, 0).to(torch.int32)
        gate_hidden = self.d_hidden < self.d_model
        chunk_rows = self.chunk_rows if x_TD.device.type == "cpu" else None
        if torch.compiler.is_compiling():  # slicing needs host-side counts: one graph, one slice
            chunk_rows = None
        chunks = row_chunks(r.counts_N, r.token_A.shape[0], chunk_rows)
        return _GroupedMLP.apply(
            x_TD, r.token_A, r.gate_A, offs_N, w1, w3, w2, self.activation, gate_hidden, chunks
        )

    def reset_parameters(
        self, init: InitScheme, std: float, out_std: float, out_fan_in: int | None = None
    ) -> None:
        """Input projections N(0, std) (fan-in d_model), output N(0, out_std) (fan-in `out_fan_in`,
        default F). With out_fan_in = G*F (the coarse expert's hidden size) the numbers are drawn in the
        coarse layout and cut by `split_hidden`: from the same generator state a fine layer gets exactly
        the G-split of the coarse layer's experts (w2's layout already is one), each weight still
        distributed as before; paired arms then share their random numbers (docs/method.md §6)."""
        coarse_hidden = out_fan_in or self.d_hidden
        G = coarse_hidden // self.d_hidden
        for w in (self.w1, self.w3):
            if w is None:
                continue
            coarse_NDF = w.new_empty(w.shape[0] // G, self.d_model, coarse_hidden)
            init_weight_(coarse_NDF, init, std, self.d_model)
            with torch.no_grad():
                w.copy_(split_hidden(coarse_NDF, G))
        init_weight_(self.w2, init, out_std, coarse_hidden)
