"""Derive matched configs from a base config, so that studies never hand-edit expert sizes.

  granularity=G'  same E, k and d_expert; E*G' experts of d_expert/G', k*G' per token. Active params and
                  matmul FLOPs are unchanged; only the router (d_model x E*G') grows (arXiv 2402.07871).
  top_k=k'        d_expert' = d_expert*k/k', E' = E*k'/k: active (k*d_expert) and total (E*d_expert)
                  expert widths are unchanged; the router changes with E'*G.
  dense="active"  dense model whose FFN hidden equals the routed active width plus the shared experts
                  (k*d_expert + num_shared*d_shared): same active params and matmul FLOPs, router excluded.
  dense="total"   dense model with the same total non-embedding params, router excluded
                  (E*d_expert + num_shared*d_shared), as in the equal-total-params comparisons of
                  arXiv 2506.12119 (see docs/method.md §3).
A dense model has one d_ff for all blocks, so with first_dense_layers > 0 the matched d_ff is the mean
FFN width over blocks, which must be an integer. The MoE output LayerNorm (2*d_model per MoE block,
when moe.output_norm) and the shared-expert gate have no dense counterpart and are not matched.
"""

from __future__ import annotations

from typing import Literal

from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.experts import split_hidden
from moe.model.validate import validate_model_config


def derive(
    base: ModelConfig,
    *,
    granularity: int | None = None,
    top_k: int | None = None,
    dense: Literal["active", "total"] | None = None,
) -> ModelConfig:
    """Return a new config matched to `base` in one respect (see the module docstring); base is untouched."""
    chosen = [
        name
        for name, v in (("granularity", granularity), ("top_k", top_k), ("dense", dense))
        if v is not None
    ]
    if len(chosen) != 1:
        raise ValueError(f"derive() takes exactly one of granularity, top_k, dense; got {chosen or 'none'}")
    validate_model_config(base)
    if base.moe is None:
        raise ValueError(f"derive({chosen[0]}=...) needs a MoE base config, but model.moe is None")
    d_expert = base.d_expert
    d_key = "model.moe.d_expert" if base.moe.d_expert is not None else "model.d_ff"
    if granularity is not None:
        if not isinstance(granularity, int) or granularity < 1:
            raise ValueError(f"granularity={granularity!r} must be a positive integer")
        if d_expert % granularity:
            raise ValueError(
                f"granularity={granularity} does not divide the expert size {d_key}={d_expert}: "
                f"choose G among the divisors of {d_expert}"
            )
        out = replace(base, **{"moe.granularity": granularity})
    elif top_k is not None:
        out = replace(base, **_top_k_changes(base, base.moe, d_expert, top_k))
    else:
        out = _dense(base, base.moe, d_expert, dense)
    validate_model_config(out)
    return out


def _top_k_changes(base: ModelConfig, m: MoEConfig, d_expert: int, top_k: int) -> dict[str, int | None]:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive integer")
    if (d_expert * m.top_k) % top_k:
        raise ValueError(
            f"top_k={top_k}: the matched expert size model.moe.d_expert*k/k'={d_expert}*{m.top_k}/{top_k} "
            "is not an integer"
        )
    if (m.num_experts * top_k) % m.top_k:
        raise ValueError(
            f"top_k={top_k}: the matched expert count model.moe.num_experts*k'/k={m.num_experts}*{top_k}/"
            f"{m.top_k} is not an integer"
        )
    new_d_expert = d_expert * m.top_k // top_k
    if new_d_expert % m.granularity:
        raise ValueError(
            f"top_k={top_k}: granularity={m.granularity} does not divide the matched "
            f"model.moe.d_expert={new_d_expert}"
        )
    return {
        "moe.top_k": top_k,
        "moe.num_experts": m.num_experts * top_k // m.top_k,
        # Set explicitly: model.d_ff stays the width of the dense blocks (first_dense_layers).
        "moe.d_expert": new_d_expert,
        # Pin the shared width: its default (k*d_expert) is invariant here, but explicit is clearer.
        "moe.d_shared": base.d_shared if m.num_shared else None,
    }


def _dense(base: ModelConfig, m: MoEConfig, d_expert: int, dense: str | None) -> ModelConfig:
    if dense not in ("active", "total"):
        raise ValueError(f"dense={dense!r} is not one of active, total")
    routed = m.top_k * d_expert if dense == "active" else m.num_experts * d_expert
    moe_hidden = routed + m.num_shared * (base.d_shared if m.num_shared else 0)
    n_moe = base.n_layers - base.first_dense_layers
    hidden_sum = base.first_dense_layers * base.d_ff + n_moe * moe_hidden
    if hidden_sum % base.n_layers:
        raise ValueError(
            f"dense={dense!r}: the matched model.d_ff is the mean FFN width over blocks, "
            f"({base.first_dense_layers}*{base.d_ff} + {n_moe}*{moe_hidden})/{base.n_layers}, "
            "which is not an integer; change model.first_dense_layers or the sizes"
        )
    return replace(base, d_ff=hidden_sum // base.n_layers, first_dense_layers=0, moe=None)


def split_state_dict(state: dict, base: ModelConfig, granularity: int) -> dict:
    """Weights of `derive(base, granularity=G)` cut from a G=1 model's state dict `state`.

    Coarse expert e becomes fine experts e*G .. e*G+G-1: w1/w3 columns and w2 rows in G hidden slices, its
    router row (and selection bias) repeated G times; every other tensor is copied. With the default
    model.moe.routed_scale the split model computes the G=1 model's function (docs/method.md §6), which
    tests/test_fair_granularity.py checks for the logits and gradients of whole models.
    """
    if base.moe is None or base.moe.granularity != 1:
        raise ValueError("split_state_dict needs a G=1 MoE base config (model.moe.granularity=1)")
    derive(base, granularity=granularity)  # validates G against the sizes
    G, out = granularity, {}
    for name, t in state.items():
        leaf = name.rsplit(".", 2)
        if name.endswith(("ffn.experts.w1", "ffn.experts.w3")):  # (E, D, F) -> (E*G, D, F/G)
            out[name] = split_hidden(t, G)
        elif name.endswith("ffn.experts.w2"):  # (E, F, D) -> (E*G, F/G, D)
            E, F_, D = t.shape
            out[name] = t.reshape(E * G, F_ // G, D).clone()
        elif leaf[-2:] == ["router", "weight"] or leaf[-2:] == ["router", "expert_bias"]:
            out[name] = t.repeat_interleave(G, dim=0)
        else:
            out[name] = t.clone()
    return out
