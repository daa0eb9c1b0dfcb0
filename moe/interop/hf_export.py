"""The project's Transformer as a Hugging Face transformers Qwen2-MoE model (`Qwen2MoeForCausalLM`).

Why Qwen2-MoE: of the MoE architectures in transformers it is the one that expresses this model exactly.
Both are pre-norm decoders with RMSNorm (same eps), rotary embeddings in the half-split (GPT-NeoX) layout
with the same base, grouped-query SDPA attention with head_dim = d_model / n_heads, SwiGLU FFNs, a
softmax top-k router with or without renormalisation (`norm_topk_prob`), leading dense layers
(`mlp_only_layers`) and an optional tied LM head. Where they differ the export adapts:

  - Qwen2-MoE has q/k/v biases: they are written as zeros.
  - Qwen2-MoE always has one shared expert with a sigmoid gate. Our shared experts (each a SwiGLU FFN)
    are concatenated along the hidden dimension into that one expert. Our gate per shared expert maps
    only when there is one shared expert; ungated shared experts get a zero gate (sigmoid(0) = 0.5
    exactly) and a down-projection doubled; no shared expert is a 1-wide expert of zeros.
  - The routed scale s (moe.routed_scale_used, G by default) multiplies every gate; it is folded into
    the experts' down-projections. A fine-grained layer is simply E*G experts of width d_expert/G.

What Qwen2-MoE cannot express is refused by `unsupported_features` with the key at fault: expert-choice
routing, sigmoid scores, capacity dropping, the MoE output LayerNorm, a GELU FFN, several gated shared
experts, and a non-zero selection bias (aux-loss-free balancing shifts which experts are chosen).

Shapes: N = routed experts (E*G), D = d_model, F = fine expert width, V = vocab.
`transformers` is imported lazily, inside the functions that need it (the `hf` extra).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.model.config import ModelConfig

ARCHITECTURE = "Qwen2MoeForCausalLM"


def unsupported_features(cfg: ModelConfig, state: dict[str, Tensor] | None = None) -> list[str]:
    """The features of `cfg` (and of trained `state`) that Qwen2-MoE cannot express, as `key=value`."""
    out = []
    if cfg.activation != "swiglu":
        out.append(f"model.activation={cfg.activation} (Qwen2-MoE FFNs are gated: act(gate) * up)")
    if cfg.d_model % cfg.n_heads:
        out.append(f"model.d_model={cfg.d_model} not a multiple of model.n_heads={cfg.n_heads}")
    if cfg.qk_norm:
        out.append("model.qk_norm=true (Qwen2-MoE has no query/key norm)")
    m = cfg.moe
    if m is None:
        return out
    if m.router != "token_choice":
        out.append(f"moe.router={m.router} (Qwen2-MoE routes by token choice)")
    if m.score != "softmax":
        out.append(f"moe.score={m.score} (Qwen2-MoE scores with a softmax)")
    if m.capacity_factor is not None:
        out.append(f"moe.capacity_factor={m.capacity_factor} (Qwen2-MoE never drops tokens)")
    if m.output_norm:
        out.append("moe.output_norm=true (Qwen2-MoE has no LayerNorm on the MoE output)")
    if m.num_shared > 1 and m.shared_gate:
        out.append(
            f"moe.shared_gate=true with moe.num_shared={m.num_shared} (Qwen2-MoE gates one shared expert)"
        )
    if state is not None and m.bias_update_rate > 0:
        if any(bool(v.abs().max() > 0) for k, v in state.items() if k.endswith("router.expert_bias")):
            out.append(
                f"moe.bias_update_rate={m.bias_update_rate} with a non-zero router.expert_bias "
                "(Qwen2-MoE selects experts by score alone)"
            )
    return out


def check_exportable(cfg: ModelConfig, state: dict[str, Tensor] | None = None) -> None:
    bad = unsupported_features(cfg, state)
    if bad:
        raise ValueError(
            f"cannot export to {ARCHITECTURE}: no transformers architecture expresses " + "; ".join(bad)
        )


def _widths(cfg: ModelConfig) -> tuple[int, int]:
    """(fine expert width F, summed shared width) of an MoE config."""
    return cfg.d_fine, cfg.d_shared * cfg.moe.num_shared


def qwen2_moe_config(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    """The Qwen2MoeConfig keyword arguments of `cfg` (a dense model: every layer in mlp_only_layers)."""
    check_exportable(cfg)
    m = cfg.moe
    d_fine, shared = _widths(cfg) if m is not None else (cfg.d_ff, 0)
    dense_layers = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "decoder_sparse_step": 1,
        "moe_intermediate_size": d_fine,
        "shared_expert_intermediate_size": max(shared, 1),
        "num_experts_per_tok": m.k_routed if m is not None else 1,
        "num_experts": m.n_routed if m is not None else 1,
        "norm_topk_prob": m is not None and m.order != "before_topk",
        "mlp_only_layers": dense_layers,
        "qkv_bias": True,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,  # training never pads; EOD is the tokenizer's pad_token too
        # the router losses' weights; Qwen2-MoE applies the first when output_router_logits is set and
        # has no z-loss, so router_z_loss_coef is carried for the record only
        "router_aux_loss_coef": m.aux_loss_coef if m is not None else 0.0,
        "router_z_loss_coef": m.z_loss_coef if m is not None else 0.0,
        "architectures": [ARCHITECTURE],
    }


def qwen2_moe_state_dict(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our `Transformer.state_dict()` renamed and reshaped into Qwen2MoeForCausalLM's parameters."""
    check_exportable(cfg, state)
    out: dict[str, Tensor] = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    out["lm_head.weight"] = state["embed.weight"] if cfg.tie_embeddings else state["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        for ours, theirs, width in (
            ("wq", "q_proj", cfg.n_heads),
            ("wk", "k_proj", cfg.kv_heads),
            ("wv", "v_proj", cfg.kv_heads),
        ):
            out[dst + f"self_attn.{theirs}.weight"] = state[src + f"attn.{ours}.weight"]
            out[dst + f"self_attn.{theirs}.bias"] = torch.zeros(
                width * cfg.head_dim, dtype=state["embed.weight"].dtype
            )
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.wo.weight"]
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[dst + f"mlp.{theirs}.weight"] = state[src + f"ffn.{ours}.weight"]
            continue
        out.update({dst + k: v for k, v in _moe_layer(cfg, state, src + "ffn.").items()})
    return out


def _moe_layer(cfg: ModelConfig, state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    m = cfg.moe
    w1_NDF, w3_NDF, w2_NFD = (state[src + f"experts.{w}"] for w in ("w1", "w3", "w2"))
    scale = m.routed_scale_used
    out = {
        "mlp.gate.weight": state[src + "router.weight"],
        # gate_up_proj (N, 2F, D): x @ gate_up.T, chunked into [gate | up]; down_proj (N, D, F).
        "mlp.experts.gate_up_proj": torch.cat(
            [w1_NDF.transpose(1, 2), w3_NDF.transpose(1, 2)], dim=1
        ).contiguous(),
        "mlp.experts.down_proj": (w2_NFD.transpose(1, 2) * scale).contiguous(),
    }
    dtype, D = w1_NDF.dtype, cfg.d_model
    if m.num_shared == 0:  # a 1-wide shared expert of zeros adds exactly 0
        out["mlp.shared_expert.gate_proj.weight"] = torch.zeros(1, D, dtype=dtype)
        out["mlp.shared_expert.up_proj.weight"] = torch.zeros(1, D, dtype=dtype)
        out["mlp.shared_expert.down_proj.weight"] = torch.zeros(D, 1, dtype=dtype)
        out["mlp.shared_expert_gate.weight"] = torch.zeros(1, D, dtype=dtype)
        return out
    shared = [f"{src}shared.{j}." for j in range(m.num_shared)]
    out["mlp.shared_expert.gate_proj.weight"] = torch.cat([state[s + "w1.weight"] for s in shared], dim=0)
    out["mlp.shared_expert.up_proj.weight"] = torch.cat([state[s + "w3.weight"] for s in shared], dim=0)
    down_DH = torch.cat([state[s + "w2.weight"] for s in shared], dim=1)
    if m.shared_gate:
        out["mlp.shared_expert_gate.weight"] = state[src + "shared_gate.weight"]
        out["mlp.shared_expert.down_proj.weight"] = down_DH
    else:  # sigmoid(0) = 0.5 exactly; doubling the down-projection cancels it
        out["mlp.shared_expert_gate.weight"] = torch.zeros(1, D, dtype=dtype)
        out["mlp.shared_expert.down_proj.weight"] = down_DH * 2.0
    return out


def to_transformers(cfg: ModelConfig, state: dict[str, Tensor], eos_token_id: int | None = None):
    """A float32 Qwen2MoeForCausalLM in eval mode holding the weights of `state` (strict load)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hf_cfg = Qwen2MoeConfig(**qwen2_moe_config(cfg, eos_token_id))
    model = Qwen2MoeForCausalLM(hf_cfg)
    weights = {k: v.detach().to("cpu", torch.float32) for k, v in qwen2_moe_state_dict(cfg, state).items()}
    model.load_state_dict(weights, strict=True)
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()
