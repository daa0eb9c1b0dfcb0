"""Routed expert compute over a dispatch plan sorted by expert (see moe.router.Routing).

Shape legend:
  T = tokens, D = d_model, F = fine expert hidden size (d_expert/G), N = routed experts (E*G),
  A = kept assignments (grouped by expert).

Both backends compute out_T = sum over the token's kept assignments a of gate_a * expert_a(x_T):
  reference  gather once, torch.split per expert, one matmul chain per expert, index_add back.
  grouped    one grouped_mm per projection over the whole sorted buffer, with a hand-written
             backward (`_GroupedMLP`) that saves only the two input projections (A x F each) and
             regathers x in backward, so peak memory stays near a dense FFN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import GROUPED_ALIGN, Activation, Backend, InitScheme
from moe.ffn import hidden, init_weight_
from moe.router import Routing

_grouped_mm_kernel = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# Opaque to torch.compile: grouped_mm's own fake kernel insists on bf16 (a CUDA-only rule), which
# breaks tracing fp32 CPU graphs; this op's fake kernel states the output shape instead.
@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def _grouped_mm(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    return _grouped_mm_kernel(mat_a, mat_b, offs=offs)


@_grouped_mm.register_fake
def _(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    if mat_b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N)
        return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1])
    return mat_a.new_empty(offs.shape[0], mat_a.shape[0], mat_b.shape[1])  # (K, M) x (M, N) -> (G, K, N)


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


class _GroupedMLP(torch.autograd.Function):
    """out_TD = index_add over a of gate_a * w2_e(hidden(w1_e x, w3_e x)), e = expert of a.

    w1 and w3 run as one grouped matmul against [w1 | w3] (H = 2F columns): every pass over the
    gathered (A, D) activations costs memory bandwidth, and there are k*G of them per token.
    """

    @staticmethod
    def forward(ctx, x_TD, token_A, gate_A, offs_N, w1, w3, w2, activation, gate_hidden):
        w13 = torch.cat([w1, w3], dim=-1) if w3 is not None else w1
        a13_AH = _grouped_mm(x_TD.index_select(0, token_A), w13, offs_N)
        h_AF, _ = _hidden_and_backward(a13_AH, activation)
        g_A1 = gate_A.unsqueeze(1)
        # Scale on the narrower side: hidden when F < D (fine experts), output otherwise.
        if gate_hidden:
            y_AD = _grouped_mm(h_AF.mul_(g_A1), w2, offs_N)
        else:
            y_AD = _grouped_mm(h_AF, w2, offs_N).mul_(g_A1)
        del h_AF
        out_TD = x_TD.new_zeros(x_TD.shape).index_add_(0, token_A, y_AD)
        ctx.save_for_backward(x_TD, token_A, gate_A, offs_N, w13, w2, a13_AH)
        ctx.activation, ctx.fused = activation, w3 is not None
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, token_A, gate_A, offs_N, w13, w2, a13_AH = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_A1 = gate_A.unsqueeze(1)
        # grouped_mm's kernels reject stride-0 (expanded) operands: see ENVIRONMENT.md.
        dy_AD = dout_TD.contiguous().index_select(0, token_A)
        h_AF, act_backward = _hidden_and_backward(a13_AH, ctx.activation)
        dh_AF = _grouped_mm(dy_AD, w2.transpose(-2, -1), offs_N)  # d/d(gated hidden)
        # d gate_a = <dy_a, w2 h_a> = <dh_a, h_a>
        dgate_A = torch.linalg.vecdot(dh_AF, h_AF) if need[2] else None
        dw2 = _grouped_mm(h_AF.mul_(g_A1).transpose(0, 1), dy_AD, offs_N) if need[6] else None
        del h_AF, dy_AD
        da13_AH = act_backward(dh_AF.mul_(g_A1))
        del dh_AF, act_backward
        dw1 = dw3 = dx_TD = None
        if need[4] or need[5]:
            dw13 = _grouped_mm(x_TD.index_select(0, token_A).transpose(0, 1), da13_AH, offs_N)
            dw1, dw3 = dw13.chunk(2, dim=-1) if ctx.fused else (dw13, None)
        if need[0]:
            dx_AD = _grouped_mm(da13_AH, w13.transpose(-2, -1), offs_N)
            dx_TD = torch.zeros_like(x_TD).index_add_(0, token_A, dx_AD)
        return dx_TD, None, dgate_A, None, dw1, dw3, dw2, None, None


def reference_experts(
    x_TD: Tensor,
    r: Routing,
    gate_A: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    activation: Activation,
) -> Tensor:
    """Per-expert loop on torch.split views of the sorted buffer (split, not slicing: see ENVIRONMENT.md)."""
    x_AD = x_TD.index_select(0, r.token_A)
    sizes = r.counts_N.tolist()
    w3s = w3.unbind(0) if w3 is not None else [None] * len(sizes)
    ys = []
    for x_cD, w1_DF, w3_DF, w2_FD in zip(x_AD.split(sizes), w1.unbind(0), w3s, w2.unbind(0), strict=True):
        a3 = x_cD @ w3_DF if w3_DF is not None else None
        ys.append(hidden(x_cD @ w1_DF, a3, activation) @ w2_FD)
    y_AD = torch.cat(ys) * gate_A.unsqueeze(1)
    return torch.zeros_like(x_TD).index_add(0, r.token_A, y_AD)


class Experts(nn.Module):
    """N fine experts stored as stacked weights: w1/w3 (N, D, F), w2 (N, F, D)."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, activation: Activation, backend: Backend):
        super().__init__()
        self.activation, self.backend = activation, backend
        self.d_model, self.d_hidden = d_model, d_hidden
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))

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
            w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
            w3 = self.w3.to(dtype) if self.w3 is not None else None
            if self.resolved_backend(x_TD.device, dtype) == "reference":
                return reference_experts(x_TD, r, gate_A, w1, w3, w2, self.activation)
            offs_N = torch.cumsum(r.counts_N, 0).to(torch.int32)
            gate_hidden = self.d_hidden < self.d_model
            return _GroupedMLP.apply(
                x_TD, r.token_A, gate_A, offs_N, w1, w3, w2, self.activation, gate_hidden
            )

    def reset_parameters(self, init: InitScheme, std: float, out_std: float) -> None:
        """Input projections N(0, std) (fan-in d_model), output N(0, out_std) (fan-in F)."""
        init_weight_(self.w1, init, std, self.d_model)
        if self.w3 is not None:
            init_weight_(self.w3, init, std, self.d_model)
        init_weight_(self.w2, init, out_std, self.d_hidden)
