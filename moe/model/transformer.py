"""Decoder-only transformer LM whose FFN layers are dense or (fine-grained) MoE.

block i:  x = x + attn(rmsnorm(x))          causal self-attention, RoPE, optional grouped-query
          x = x + ffn(rmsnorm(x))           FeedForward, or MoELayer when cfg.is_moe_layer(i)
then a final RMSNorm and the LM head (tied to the embedding or not). Parameter names and shapes are
listed in moe/model/config.py; moe/model/accounting.py counts them. The model only computes: the training loop
calls `update_balancing` and logs the per-layer router diagnostics returned in `ModelOutput.router`.

Shapes: B = batch, S = sequence, D = d_model, V = vocab, H = query heads, J = key/value heads,
K = head dim, R = K/2 (rotary frequencies).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.model.config import InitScheme, ModelConfig
from moe.model.ffn import FeedForward, init_weight_
from moe.model.layer import MoEAux, MoELayer
from moe.model.validate import validate_model_config


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin, each (S, R), in fp32; recomputed per forward so meta/to_empty builds need no buffers."""
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angle_SR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_R)
    return angle_SR.cos(), angle_SR.sin()


def apply_rope(x_BHSK: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
    """Rotate the two halves of each head (GPT-NeoX / Llama layout), in fp32 for accuracy."""
    x1, x2 = x_BHSK.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_SR - x2 * sin_SR, x2 * cos_SR + x1 * sin_SR), dim=-1)
    return out.type_as(x_BHSK)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE; n_kv_heads < n_heads gives grouped-query attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        q_BHSK = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k_BJSK = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BJSK = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BHSK, k_BJSK = self.q_norm(q_BHSK), self.k_norm(k_BJSK)
        q_BHSK, k_BJSK = apply_rope(q_BHSK, cos_SR, sin_SR), apply_rope(k_BJSK, cos_SR, sin_SR)
        if self.n_kv_heads != self.n_heads:
            # Explicit repeat rather than enable_gqa: it runs on every backend and under torch.compile.
            rep = self.n_heads // self.n_kv_heads
            k_BJSK, v_BJSK = k_BJSK.repeat_interleave(rep, dim=1), v_BJSK.repeat_interleave(rep, dim=1)
        y_BHSK = F.scaled_dot_product_attention(q_BHSK, k_BJSK, v_BJSK, is_causal=True)
        return self.wo(y_BHSK.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def reset_parameters(self, init: InitScheme, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            init_weight_(lin.weight, init, out_std if lin is self.wo else std, lin.in_features)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is a FeedForward or a MoELayer."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.is_moe = moe
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = MoELayer(cfg) if moe else FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> tuple[Tensor, MoEAux | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR)
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            y_BSD, aux = self.ffn(h_BSD)
        else:
            y_BSD, aux = self.ffn(h_BSD), None
        return x_BSD + y_BSD, aux


@dataclass
class ModelOutput:
    """What one forward pass returns."""

    logits: Tensor
    """(B, S, V) next-token logits, in the compute dtype."""
    loss: Tensor | None
    """Mean LM cross-entropy (fp32) over targets != -100, when targets are given; no auxiliary terms."""
    aux_loss: Tensor
    """The training-only loss terms, 0-dim fp32: the sum over MoE layers of MoEAux.loss
    (coefficient-weighted balancing + router z-loss) plus the output z-loss (model.logit_z_loss) when
    targets are given; 0 for a dense model without them."""
    router: list[MoEAux]
    """One MoEAux per MoE block, in block order (see Transformer.moe_layer_indices)."""


def stream_seed(base: int, name: str) -> int:
    """The seed of submodule `name`'s init stream under run seed `base` (stable across processes)."""
    return (base * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _from_stream(base: int, name: str, draw: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """`draw` on its own stream, leaving the host generator as it was. Two models that differ only in
    G then share every weight but the routers (and their experts as a G-split): paired arms see the
    same random numbers, so their difference is not buried under init noise."""

    def seeded(m: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(base, name))
            draw(m)

    return seeded


class Transformer(nn.Module):
    """The language model. Build on `torch.device("meta")` to plan without allocating weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        device = torch.get_default_device()
        # Submodules are built on meta, so their own default inits draw nothing: the weights are a
        # function of the seed and `init_steps` alone, which a sharded build can replay
        # (moe.parallel.layout.Parallel.materialize_).
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
            self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.moe_layer_indices: list[int] = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        if device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight per cfg.init; call after `to_empty` when built on meta."""
        for name, init in self.init_steps():
            init(self.get_submodule(name))

    def init_steps(self) -> list[tuple[str, Callable[[nn.Module], None]]]:
        """The initialisation as (submodule name, its init), each drawing from its own stream seeded by
        torch.initial_seed() and the name (`stream_seed`): what
        `reset_parameters` runs, and what a sharded build (moe.parallel.layout.Parallel.materialize_) replays
        one submodule at a time to reach the same weights without ever holding the whole model."""
        cfg = self.cfg
        # GPT-2 style: residual-stream output projections (wo, w2) shrink with depth for "normal".
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        steps: list[tuple[str, Callable[[nn.Module], None]]] = [
            ("embed", lambda m: nn.init.normal_(m.weight, mean=0.0, std=std))
        ]
        for i in range(cfg.n_layers):
            steps += [
                (f"blocks.{i}.attn_norm", lambda m: m.reset_parameters()),
                (f"blocks.{i}.ffn_norm", lambda m: m.reset_parameters()),
                (f"blocks.{i}.attn", lambda m: m.reset_parameters(cfg.init, std, out_std)),
                (f"blocks.{i}.ffn", lambda m: m.reset_parameters(cfg.init, std, out_std)),
            ]
        steps.append(("norm", lambda m: m.reset_parameters()))
        if self.lm_head is not None:
            steps.append(("lm_head", lambda m: init_weight_(m.weight, cfg.init, std, cfg.d_model)))
        base = torch.initial_seed()
        return [(name, _from_stream(base, name, draw)) for name, draw in steps]

    def forward(self, idx_BS: Tensor, targets_BS: Tensor | None = None) -> ModelOutput:
        B, S = idx_BS.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"input length {S} exceeds model.seq_len={self.cfg.seq_len}")
        cos_SR, sin_SR = rope_tables(S, self.cfg.head_dim, self.cfg.rope_theta, idx_BS.device)
        x_BSD = self.embed(idx_BS)
        router: list[MoEAux] = []
        for block in self.blocks:
            x_BSD, aux = block(x_BSD, cos_SR, sin_SR)
            if aux is not None:
                router.append(aux)
        x_BSD = self.norm(x_BSD)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BSV = F.linear(x_BSD, head)

        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=-100)
        if router:
            aux_loss = torch.stack([a.loss.float() for a in router]).sum()
        else:
            aux_loss = torch.zeros((), device=idx_BS.device)
        if targets_BS is not None and self.cfg.logit_z_loss:
            lse_BS = torch.logsumexp(logits_BSV.float(), dim=-1)
            aux_loss = aux_loss + self.cfg.logit_z_loss * lse_BS.pow(2).mean()
        return ModelOutput(logits=logits_BSV, loss=loss, aux_loss=aux_loss, router=router)

    @torch.no_grad()
    def update_balancing(self, router: list[MoEAux]) -> None:
        """Aux-loss-free balancing step: pass each MoE layer its tokens_per_expert from the last forward."""
        if len(router) != len(self.moe_layer_indices):
            raise ValueError(f"got {len(router)} router outputs for {len(self.moe_layer_indices)} MoE layers")
        for i, aux in zip(self.moe_layer_indices, router, strict=True):
            self.blocks[i].ffn.update_bias(aux.tokens_per_expert)
