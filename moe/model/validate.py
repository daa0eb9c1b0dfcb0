"""Build-time validation of a `ModelConfig`.

`validate_model_config` raises `ValueError` naming the dotted key and its value; it never mutates the
config and never runs inside `forward`. Keys are spelt as in the Hydra config: `model.<field>` for
`ModelConfig` and `moe.<field>` for its nested `MoEConfig`.
"""

from __future__ import annotations

import math

from moe.model.config import (
    ACTIVATIONS,
    BACKENDS,
    EXPERT_CHOICE_SCOPES,
    GROUPED_ALIGN,
    INIT_SCHEMES,
    ROUTER_KINDS,
    ROUTER_ORDERS,
    SCORE_FNS,
    ModelConfig,
    MoEConfig,
)


def _is_int(v: object) -> bool:
    # bool is an int subclass; a YAML `true` must not pass as a size.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(key: str, v: object) -> None:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{key}={v!r} must be a positive integer")


def _non_negative_int(key: str, v: object) -> None:
    if not _is_int(v) or v < 0:
        raise ValueError(f"{key}={v!r} must be a non-negative integer")


def _positive_real(key: str, v: object) -> None:
    if not _is_real(v) or not 0 < v < math.inf:  # the comparisons also reject NaN
        raise ValueError(f"{key}={v!r} must be a positive finite number")


def _non_negative_real(key: str, v: object) -> None:
    if not _is_real(v) or not 0 <= v < math.inf:
        raise ValueError(f"{key}={v!r} must be a non-negative finite number")


def _one_of(key: str, v: object, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ValueError(f"{key}={v!r} is not one of {', '.join(allowed)}")


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError on the first inconsistent or out-of-range setting of `cfg`."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"model must be a ModelConfig, got {type(cfg).__name__}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len"):
        _positive_int(f"model.{name}", getattr(cfg, name))
    if cfg.n_kv_heads is not None:
        _positive_int("model.n_kv_heads", cfg.n_kv_heads)
    for name in ("rope_theta", "norm_eps", "init_std"):
        _positive_real(f"model.{name}", getattr(cfg, name))
    _one_of("model.activation", cfg.activation, ACTIVATIONS)
    _one_of("model.init", cfg.init, INIT_SCHEMES)
    for name in ("tie_embeddings", "qk_norm"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"model.{name}={getattr(cfg, name)!r} must be a bool")
    _non_negative_real("model.logit_z_loss", cfg.logit_z_loss)
    if cfg.logit_z_loss == float("inf"):
        raise ValueError(f"model.logit_z_loss={cfg.logit_z_loss!r} must be finite")

    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}")
    if cfg.head_dim % 2:
        raise ValueError(
            f"head dim model.d_model/model.n_heads={cfg.d_model}/{cfg.n_heads}={cfg.head_dim} "
            "must be even for RoPE"
        )
    if cfg.n_heads % cfg.kv_heads:
        raise ValueError(f"model.n_kv_heads={cfg.kv_heads} does not divide model.n_heads={cfg.n_heads}")

    _non_negative_int("model.first_dense_layers", cfg.first_dense_layers)
    if cfg.first_dense_layers > cfg.n_layers:
        raise ValueError(
            f"model.first_dense_layers={cfg.first_dense_layers} exceeds model.n_layers={cfg.n_layers}"
        )
    if cfg.moe is not None:
        if not isinstance(cfg.moe, MoEConfig):
            raise ValueError(f"model.moe must be a MoEConfig or None, got {type(cfg.moe).__name__}")
        _validate_moe(cfg.moe, cfg)


def _validate_moe(m: MoEConfig, cfg: ModelConfig) -> None:
    _positive_int("model.moe.num_experts", m.num_experts)
    _positive_int("model.moe.granularity", m.granularity)
    _positive_int("model.moe.top_k", m.top_k)
    if m.top_k > m.num_experts:
        raise ValueError(
            f"model.moe.top_k={m.top_k} exceeds model.moe.num_experts={m.num_experts} "
            f"(k*G={m.k_routed} routed of E*G={m.n_routed} experts)"
        )
    if m.d_expert is not None:
        _positive_int("model.moe.d_expert", m.d_expert)
    d_expert, d_key = cfg.d_expert, "model.moe.d_expert" if m.d_expert is not None else "model.d_ff"
    if d_expert % m.granularity:
        raise ValueError(
            f"model.moe.granularity={m.granularity} does not divide model.moe.d_expert={d_expert} ({d_key})"
        )
    d_fine = d_expert // m.granularity

    _one_of("model.moe.router", m.router, ROUTER_KINDS)
    _one_of("model.moe.score", m.score, SCORE_FNS)
    _one_of("model.moe.order", m.order, ROUTER_ORDERS)
    _one_of("model.moe.backend", m.backend, BACKENDS)
    _one_of("model.moe.expert_choice_scope", m.expert_choice_scope, EXPERT_CHOICE_SCOPES)
    _positive_real("model.moe.output_norm_eps", m.output_norm_eps)
    if m.routed_scale is not None:
        _positive_real("model.moe.routed_scale", m.routed_scale)
        if m.routed_scale == float("inf"):
            raise ValueError(f"model.moe.routed_scale={m.routed_scale!r} must be finite")
    if m.backend == "grouped" and d_fine % GROUPED_ALIGN:
        raise ValueError(
            f"model.moe.backend='grouped' needs the fine expert size model.moe.d_expert/model.moe.granularity="
            f"{d_expert}/{m.granularity}={d_fine} to be a multiple of {GROUPED_ALIGN}; "
            "use backend 'auto' or 'reference', or change the sizes"
        )

    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "jitter"):
        _non_negative_real(f"model.moe.{name}", getattr(m, name))
    if m.jitter >= 1:
        raise ValueError(f"model.moe.jitter={m.jitter} must be < 1 (router input is scaled by 1 +- jitter)")
    if m.capacity_factor is not None:
        _positive_real("model.moe.capacity_factor", m.capacity_factor)
    for name in ("allow_no_router_grad", "shared_gate", "output_norm"):
        if not isinstance(getattr(m, name), bool):
            raise ValueError(f"model.moe.{name}={getattr(m, name)!r} must be a bool")

    _non_negative_int("model.moe.num_shared", m.num_shared)
    if m.d_shared is not None:
        _positive_int("model.moe.d_shared", m.d_shared)
        if m.num_shared == 0:
            raise ValueError(f"model.moe.d_shared={m.d_shared} is set but model.moe.num_shared=0")
    if m.shared_gate and m.num_shared == 0:
        raise ValueError("model.moe.shared_gate=True needs shared experts, but model.moe.num_shared=0")

    if m.router == "token_choice":
        if m.order == "after_topk" and m.k_routed == 1 and not m.allow_no_router_grad:
            raise ValueError(
                f"model.moe.order='after_topk' with model.moe.top_k*model.moe.granularity={m.top_k}*{m.granularity}=1: "
                "the normalisation runs over a single logit, so every gate is 1 and the router would "
                "receive no gradient from the LM loss; use order 'before_topk', k*G > 1, or set "
                "model.moe.allow_no_router_grad=True"
            )
    else:  # expert_choice: experts pick tokens, so token-side top-k options have no meaning
        if m.order != "before_topk":
            raise ValueError(
                f"model.moe.order={m.order!r} applies to token_choice only; model.moe.router='expert_choice' scores "
                "all experts before experts pick their tokens: use model.moe.order='before_topk'"
            )
        if m.bias_update_rate > 0:
            raise ValueError(
                f"model.moe.bias_update_rate={m.bias_update_rate} with model.moe.router='expert_choice': expert choice "
                "is balanced by construction (fixed capacity per expert); set it to 0"
            )
        if m.allow_no_router_grad:
            raise ValueError(
                "model.moe.allow_no_router_grad=True has no meaning with model.moe.router='expert_choice'"
            )

    if cfg.first_dense_layers == cfg.n_layers:
        raise ValueError(
            f"model.first_dense_layers={cfg.first_dense_layers} == model.n_layers={cfg.n_layers} leaves "
            "no MoE layer although model.moe is set; set model.moe=None for a dense model"
        )
