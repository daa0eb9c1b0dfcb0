"""Typed architecture configs for the transformer and its MoE layers.

Definitions follow Krajewski et al. 2024 ("Scaling Laws for Fine-Grained MoE", arXiv 2402.07871):
  E = expansion rate = number of experts at granularity 1 (`MoEConfig.num_experts`)
  G = granularity = d_expert / d_fine                   (`MoEConfig.granularity`)
  k = base top-k, the number of G=1 experts per token   (`MoEConfig.top_k`)
A fine-grained layer has E*G experts of hidden size d_expert/G and routes each token to k*G of them,
so active parameters and FLOPs do not depend on G; only the router (d_model x E*G) grows.

Parameter layout of a built `moe.model.transformer.Transformer` (no biases anywhere except the MoE output
LayerNorm); `moe.model.accounting` counts exactly these and tests compare against `numel()`:
  embed.weight                      (vocab, d_model)
  lm_head.weight                    (vocab, d_model)          absent when tie_embeddings
  blocks.{i}.attn_norm.weight       (d_model,)                RMSNorm
  blocks.{i}.attn.wq/wk/wv/wo       d_model x n_heads*hd, d_model x n_kv_heads*hd (x2), n_heads*hd x d_model
  blocks.{i}.attn.q_norm/k_norm     (hd,) each                RMSNorm gains, when qk_norm
  blocks.{i}.ffn_norm.weight        (d_model,)
  dense FFN  blocks.{i}.ffn.w1, w2 (+ w3 for swiglu)          d_model x d_ff, d_ff x d_model
  MoE FFN    blocks.{i}.ffn.router.weight   (E*G, d_model)
             blocks.{i}.ffn.experts.w1/w3   (E*G, d_model, d_fine), w2 (E*G, d_fine, d_model)
             blocks.{i}.ffn.shared.{j}.w1/w2(/w3)            one dense FFN of hidden d_shared each
             blocks.{i}.ffn.shared_gate.weight (num_shared, d_model)   when shared_gate
             blocks.{i}.ffn.out_norm.weight/.bias (d_model,)           when output_norm
  norm.weight                       (d_model,)
The bias-balancing offsets (`router.expert_bias`) are a buffer, not a parameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

RouterKind = Literal["token_choice", "expert_choice"]
ScoreFn = Literal["softmax", "sigmoid"]
# Where the score normalisation sits relative to top-k selection (paper 2, see docs/method.md §2):
#   before_topk        softmax over all experts, keep top-k weights as they are (sum < 1)
#   before_topk_renorm softmax over all experts, renormalise the kept weights to sum to 1
#   after_topk         pick top-k logits, softmax over those k (== before_topk_renorm for softmax)
RouterOrder = Literal["before_topk", "before_topk_renorm", "after_topk"]
Backend = Literal["auto", "reference", "grouped"]
Activation = Literal["swiglu", "gelu"]
InitScheme = Literal["normal", "fan_in"]
ExpertChoiceScope = Literal["position", "batch"]

# The allowed values, for validation: read off the Literals so each choice is declared once.
ROUTER_KINDS = get_args(RouterKind)
SCORE_FNS = get_args(ScoreFn)
ROUTER_ORDERS = get_args(RouterOrder)
BACKENDS = get_args(Backend)
ACTIVATIONS = get_args(Activation)
INIT_SCHEMES = get_args(InitScheme)
EXPERT_CHOICE_SCOPES = get_args(ExpertChoiceScope)

# grouped_mm wants 16-byte aligned strides: hidden sizes a multiple of 8 cover fp32 and bf16.
GROUPED_ALIGN = 8


@dataclass
class MoEConfig:
    num_experts: int = 8
    """E: expansion rate, the number of experts at granularity 1."""
    granularity: int = 1
    """G: each coarse expert is cut into G fine experts of hidden d_expert / G."""
    top_k: int = 2
    """k: base top-k at G=1; each token is routed to k*G fine experts."""
    d_expert: int | None = None
    """Hidden size of one coarse (G=1) expert; None means model.d_ff."""
    router: RouterKind = "token_choice"
    """token_choice (each token picks experts) or expert_choice (each expert picks tokens)."""
    expert_choice_scope: ExpertChoiceScope = "position"
    """Which tokens an expert-choice expert ranks. position: the tokens at one position across the
    micro-batch's sequences (as llm-random does), so no token's routing depends on later tokens of its own
    sequence and the loss is a causal LM loss. batch: all tokens of the micro-batch at once, which lets a
    token's routing see its sequence's future (kept for ablations; reports flag it)."""
    score: ScoreFn = "softmax"
    """Score function over router logits."""
    order: RouterOrder = "before_topk"
    """Where normalisation sits relative to top-k (token choice only)."""
    allow_no_router_grad: bool = False
    """Permit after_topk with k*G == 1, where the router gets no gradient from the LM loss."""
    aux_loss_coef: float = 0.01
    """Switch load-balancing loss coefficient (E * sum f_i P_i), computed in fp32."""
    z_loss_coef: float = 0.001
    """Router z-loss coefficient (mean logsumexp(logits)^2), computed in fp32."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing: per-expert selection bias moved by this rate each step; 0 disables."""
    capacity_factor: float | None = None
    """Token choice: None is dropless; otherwise each expert keeps at most cf*T*k*G/(E*G) tokens.
    Expert choice: capacity per expert is cf*T*k*G/(E*G) (None means 1.0)."""
    jitter: float = 0.0
    """Multiplicative uniform noise (1 +- jitter) on router input while training; 0 disables."""
    num_shared: int = 0
    """Number of always-active shared experts."""
    d_shared: int | None = None
    """Hidden size of each shared expert; None means k*G*d_fine (= k*d_expert)."""
    shared_gate: bool = False
    """Scale each shared expert's output by sigmoid(x . w_j)."""
    output_norm: bool = False
    """LayerNorm on the MoE output (reported crucial for G > 1 in 2402.07871)."""
    output_norm_eps: float = 1e-12
    """eps of the output LayerNorm. The MoE output's variance at init is ~1e-7..1e-9 for the presets, so
    torch's default 1e-5 would dominate it and the "norm" would act as a fixed gain (docs/method.md §6)."""
    routed_scale: float | None = None
    """Multiplier on the gated sum of routed expert outputs. None: `routed_scale_used`, which makes a
    fine-grained layer built by splitting a G=1 layer compute the G=1 function (docs/method.md §6). 1.0 turns
    the compensation off (an ablation)."""
    backend: Backend = "auto"
    """Expert compute: reference (per-expert loop), grouped (grouped_mm) or auto."""

    # Derived sizes -------------------------------------------------------------------------
    @property
    def n_routed(self) -> int:
        """Number of fine experts, E*G."""
        return self.num_experts * self.granularity

    @property
    def k_routed(self) -> int:
        """Fine experts per token, k*G."""
        return self.top_k * self.granularity

    @property
    def routed_scale_used(self) -> float:
        """The routed-output scale in effect: `routed_scale`, or by default G, except 1 for unnormalised
        sigmoid scores.

        Cutting a G=1 expert into G hidden slices with its router row repeated G times gives each slice
        1/G of the coarse gate for softmax scores (before or after top-k, renormalised or not: the
        probability mass of one coarse expert is shared by G equal logits) and for renormalised sigmoid
        scores (G equal scores share the normalisation). Sigmoid before top-k gives each slice the coarse
        gate unchanged. Multiplying by G in the first cases restores the G=1 output exactly, the same role
        as DeepSeek-V3's routed_scaling_factor and Megatron-Core's moe_router_topk_scaling_factor."""
        if self.routed_scale is not None:
            return float(self.routed_scale)
        unnormalised_sigmoid = self.score == "sigmoid" and (
            self.router == "expert_choice" or self.order == "before_topk"
        )
        return 1.0 if unnormalised_sigmoid else float(self.granularity)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Tokenizer vocabulary size."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads."""
    d_ff: int = 1024
    """Hidden size of a dense FFN (and of a coarse expert unless moe.d_expert is set)."""
    seq_len: int = 256
    """Context length."""
    activation: Activation = "swiglu"
    """FFN activation: swiglu (3 matrices) or gelu (2 matrices)."""
    tie_embeddings: bool = True
    """Share the input embedding and the LM head."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init: InitScheme = "normal"
    """normal: N(0, init_std); fan_in: truncated normal with std 1/sqrt(fan_in)."""
    init_std: float = 0.02
    """Std of the normal init (embeddings always use it)."""
    qk_norm: bool = False
    """RMSNorm (a learned gain per head dim, shared by the heads) on queries and keys before RoPE, as in
    OLMo 2 and Qwen3: attention logits cannot grow without bound, so the early escape from the unigram
    plateau depends less on the seed."""
    logit_z_loss: float = 0.0
    """Coefficient of the output z-loss mean(logsumexp(logits)^2) (PaLM), in fp32; added to the training
    loss with the router losses (ModelOutput.aux_loss), never to the reported LM loss; 0 disables."""
    first_dense_layers: int = 0
    """Keep this many leading blocks dense when moe is set (the "1dense" design)."""
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    """MoE settings for the FFN layers; None builds a dense model."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    # Derived expert sizes: the one place "moe.d_expert, else d_ff" and the shared default are written.
    @property
    def d_expert(self) -> int:
        """Hidden size of one coarse (G=1) expert: moe.d_expert, else d_ff."""
        if self.moe is None:
            raise ValueError("model.moe is None: a dense model has no experts")
        return self.moe.d_expert if self.moe.d_expert is not None else self.d_ff

    @property
    def d_fine(self) -> int:
        """Hidden size of one fine-grained expert: d_expert / G."""
        return self.d_expert // self.moe.granularity

    @property
    def d_shared(self) -> int:
        """Hidden size of one shared expert: moe.d_shared, else k*d_expert (= k*G*d_fine, the routed
        active width)."""
        if self.moe is None:
            raise ValueError("model.moe is None: a dense model has no shared experts")
        return self.moe.d_shared if self.moe.d_shared is not None else self.moe.top_k * self.d_expert

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i >= self.first_dense_layers


def replace(cfg, **changes):
    """dataclasses.replace that also accepts dotted keys for the nested moe config."""
    nested = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("moe.")}
    flat = {k: v for k, v in changes.items() if not k.startswith("moe.")}
    if nested:
        if cfg.moe is None:
            raise ValueError(f"cannot set {sorted(nested)} on a dense model (model.moe is None)")
        flat["moe"] = dataclasses.replace(cfg.moe, **nested)
    return dataclasses.replace(cfg, **flat)
