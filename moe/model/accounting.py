"""Parameter and FLOP accounting, computed analytically from a `ModelConfig` (no weights allocated).

Parameter conventions (layout: see the docstring of moe/model/config.py; tests compare against `numel()`):
  embedding / lm_head   vocab x d_model each; lm_head is 0 when the embeddings are tied.
  non_embedding         everything except embedding and lm_head (Kaplan et al. 2020 "non-embedding";
                        the "non-vocabulary" parameters of Li et al. 2025). RoPE has no parameters.
  routed_total          all E*G fine experts of every MoE layer.
  routed_active         the k*G fine experts a token is routed to (nominal: dropping is ignored).
  router                routing/gating matrices: router (E*G x d_model) and the shared-expert gate.
  norms                 RMSNorm weights (incl. the per-head-dim q/k norms) and the MoE output LayerNorm
                        (weight + bias).
  active                total - routed_total + routed_active: what one token touches.

FLOP convention (per token, multiply-add = 2 FLOPs), after Kaplan et al. 2020 Table 1 and PaLM
(Chowdhery et al. 2022) Appendix B:
  matmul_forward    2 * (attention + dense_ffn + routed_active + shared FFN weights) + 2 * d_model * vocab
                    for the LM head (counted whether tied or not; the embedding lookup costs nothing).
  attention_forward 4 * n_layers * seq_len * d_attn: QK^T and AV each cost 2 * seq_len * d_attn per token.
                    Counted non-causal, as PaLM does (its training term 12*L*H*Q*T = 3 x this); a causal
                    kernel does about half of it. Kaplan's 2*n_layers*n_ctx*d_attn is the causal average.
  router_forward    2 * d_model * (E*G + num_shared if shared_gate) per MoE layer; kept separate so
                    matched configs can be compared without it, and included in `forward`.
  train             3 * forward (backward = 2 x forward). Norms, softmax and activations are not counted.
Expert choice computes capacity_factor * k*G fine-expert slots per token on average, so its routed
matmul FLOPs are scaled by capacity_factor (None counts as 1.0); token choice counts the nominal k*G.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from moe.model.config import ModelConfig
from moe.model.validate import validate_model_config


def ffn_matrices(activation: str) -> int:
    """Weight matrices in one FFN (or expert): swiglu has w1, w2, w3; gelu has w1, w2."""
    return 3 if activation == "swiglu" else 2


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts of a Transformer built from one ModelConfig."""

    embedding: int
    """Token embedding, vocab x d_model."""
    lm_head: int
    """Output projection, vocab x d_model; 0 when tied to the embedding."""
    attention: int
    """wq, wk, wv, wo of all blocks."""
    dense_ffn: int
    """FFN weights of dense blocks."""
    routed_total: int
    """All routed expert weights (E*G fine experts per MoE block)."""
    routed_active: int
    """Routed expert weights one token uses (k*G fine experts per MoE block)."""
    shared: int
    """Shared expert FFN weights (always active)."""
    router: int
    """Router matrices and shared-expert gates."""
    norms: int
    """RMSNorm weights and MoE output LayerNorm weight + bias."""
    total: int
    """Every parameter, counted once (tied weights once)."""
    active: int
    """Parameters a token touches: total - routed_total + routed_active."""
    non_embedding: int
    """total without embedding and lm_head."""
    active_non_embedding: int
    """active without embedding and lm_head."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per token (convention in the module docstring)."""

    forward: float
    """matmul_forward + attention_forward + router_forward."""
    train: float
    """3 x forward."""
    matmul_forward: float
    """2 x active non-embedding matmul weights + LM head."""
    attention_forward: float
    """QK^T and AV, non-causal."""
    router_forward: float
    """Router and shared-gate matmuls."""

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Layers:
    """Counts shared by params and FLOPs: one source for both."""

    n_moe: int
    n_dense: int
    attention: int
    dense_ffn: int
    routed_total: int
    routed_active: int
    shared: int
    router: int
    norms: int


def _layers(cfg: ModelConfig) -> _Layers:
    validate_model_config(cfg)
    d = cfg.d_model
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    n_dense = cfg.n_layers - n_moe
    per_hidden = ffn_matrices(cfg.activation) * d  # weights per hidden unit of an FFN
    attn = 2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.kv_heads * cfg.head_dim
    norms = (2 * cfg.n_layers + 1) * d + (2 * cfg.n_layers * cfg.head_dim if cfg.qk_norm else 0)
    routed_total = routed_active = shared = router = 0
    m = cfg.moe
    if m is not None and n_moe:
        d_exp = cfg.d_expert
        routed_total = n_moe * m.num_experts * d_exp * per_hidden
        routed_active = n_moe * m.top_k * d_exp * per_hidden
        shared = n_moe * m.num_shared * cfg.d_shared * per_hidden
        router = n_moe * d * (m.n_routed + (m.num_shared if m.shared_gate else 0))
        norms += n_moe * 2 * d if m.output_norm else 0
    return _Layers(
        n_moe=n_moe,
        n_dense=n_dense,
        attention=cfg.n_layers * attn,
        dense_ffn=n_dense * cfg.d_ff * per_hidden,
        routed_total=routed_total,
        routed_active=routed_active,
        shared=shared,
        router=router,
        norms=norms,
    )


def count_params(cfg: ModelConfig) -> ParamBreakdown:
    """Named parameter breakdown of `Transformer(cfg)`, from the config alone."""
    layers = _layers(cfg)
    embedding = cfg.vocab_size * cfg.d_model
    lm_head = 0 if cfg.tie_embeddings else embedding
    non_embedding = (
        layers.attention
        + layers.dense_ffn
        + layers.routed_total
        + layers.shared
        + layers.router
        + layers.norms
    )
    active_non_embedding = non_embedding - layers.routed_total + layers.routed_active
    return ParamBreakdown(
        embedding=embedding,
        lm_head=lm_head,
        attention=layers.attention,
        dense_ffn=layers.dense_ffn,
        routed_total=layers.routed_total,
        routed_active=layers.routed_active,
        shared=layers.shared,
        router=layers.router,
        norms=layers.norms,
        total=embedding + lm_head + non_embedding,
        active=embedding + lm_head + active_non_embedding,
        non_embedding=non_embedding,
        active_non_embedding=active_non_embedding,
    )


def flops_per_token(cfg: ModelConfig) -> FlopsBreakdown:
    """Forward and training FLOPs per token of `Transformer(cfg)` at context cfg.seq_len."""
    layers = _layers(cfg)
    routed = float(layers.routed_active)
    if cfg.moe is not None and cfg.moe.router == "expert_choice":
        routed *= cfg.moe.capacity_factor if cfg.moe.capacity_factor is not None else 1.0
    matmul = 2.0 * (layers.attention + layers.dense_ffn + routed + layers.shared)
    matmul += 2.0 * cfg.d_model * cfg.vocab_size
    attention = 4.0 * cfg.n_layers * cfg.seq_len * cfg.n_heads * cfg.head_dim
    router = 2.0 * layers.router
    forward = matmul + attention + router
    return FlopsBreakdown(
        forward=forward,
        train=3.0 * forward,
        matmul_forward=matmul,
        attention_forward=attention,
        router_forward=router,
    )


def count_params_of_module(model: nn.Module) -> int:
    """sum(p.numel()) over unique parameters (tied weights once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())
