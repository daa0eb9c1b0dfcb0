"""One sweep point's identity: its model, budget, training plan and run key, derived from the composed
config by pure functions (no data files are read, nothing is written).

The walk of an axis: `granularity=8` on the command line -> RunConfig.granularity (studies.job.config) ->
`derive_model` -> moe.model.matched.derive, which splits the preset's experts -> moe.model.config.MoEConfig.d_fine.

The run key hashes what a point computes and nothing else: INFRA_KEYS (where files live, on which
device, how often progress is printed or checkpoints written) are left out, so re-running a finished
sweep with any of them changed skips its DONE points (docs/lifecycle.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.data.corpus import read_meta
from moe.model.accounting import count_params, flops_per_token
from moe.model.config import ModelConfig, MoEConfig, replace
from moe.model.matched import derive
from moe.model.validate import validate_model_config
from moe.parallel.layout import resolve_layout
from moe.train.plan import TrainConfig, TrainPlan, plan_training
from records.code_record import git_sha
from studies.job.config import RunConfig, study_dir_of
from studies.track import tracking

AXES = (
    "variant",
    "dense_match",
    "granularity",
    "top_k",
    "experts",
    "tokens",
    "budget_from",
    "seed",
    "branch_from",
)
# Keys that change where or how a point runs, or how often it reports, but not what it computes: left
# out of the run key. Everything else in model, data, optim and train is in it.
INFRA_KEYS = {
    "data": ("cache_dir", "workers"),
    "train": ("device", "compile", "log_every", "progress_every", "checkpoint_every", "keep_last"),
}
# Keys added after runs were recorded, hashed only away from the value that computes what runs did
# before them, so those runs keep their keys (and a re-run skips them).
ADDED_KEYS = {"optim": {"decay_shape": "linear"}, "train": {"branch_from": None}}


def data_vocab(run: RunConfig) -> int:
    """The vocabulary the data brings without preparing it: a tokens folder's meta.json, else the
    size the tokenizer is trained to (data.vocab_size)."""
    if run.data.source == "tokens" and run.data.path:
        return int(read_meta(Path(run.data.path).expanduser())["vocab_size"])
    return run.data.vocab_size


def _axis(key: str, value: Any, derive_it):
    """Apply one axis; a library error is prefixed with the override that caused it."""
    try:
        return derive_it()
    except ValueError as exc:
        if str(exc).startswith(f"{key}="):
            raise
        raise ValueError(f"{key}={value}: {exc}") from None


def derive_model(run: RunConfig, vocab_size: int) -> ModelConfig:
    """The point's model: the preset at the data's vocabulary, then the axes top_k, experts,
    granularity, variant (in that order). model.vocab_size, when a preset pins it, must match."""
    if run.model.vocab_size is not None and run.model.vocab_size != vocab_size:
        raise ValueError(
            f"model.vocab_size={run.model.vocab_size} (model={run.model.name}) disagrees with the data's "
            f"vocabulary {vocab_size} (data.source={run.data.source}, data.vocab_size={run.data.vocab_size}): "
            "use data whose tokenizer has that vocabulary, or leave model.vocab_size unset"
        )
    model = run.model.library(vocab_size)
    axes = {k: getattr(run, k) for k in ("top_k", "experts", "granularity") if getattr(run, k) is not None}
    if model.moe is None:
        if axes or run.variant == "moe":
            raise ValueError(
                f"model={run.model.name} is dense (model.moe is null): it takes no MoE axes "
                f"({sorted(axes) or 'variant=moe'}); use variant=dense or a MoE preset"
            )
        validate_model_config(model)
        return model
    validate_model_config(model)
    if run.top_k is not None:
        model = _axis("top_k", run.top_k, lambda: derive(model, top_k=run.top_k))
    if run.experts is not None:
        experts = run.experts
        model = _axis("experts", experts, lambda: _checked(replace(model, **{"moe.num_experts": experts})))
    if run.granularity is not None:
        model = _axis("granularity", run.granularity, lambda: derive(model, granularity=run.granularity))
    if run.variant == "dense":
        model = derive(model, dense=run.dense_match)
    return model


def _checked(model: ModelConfig) -> ModelConfig:
    validate_model_config(model)
    return model


# The router a label leaves unnamed: the presets' recipe, softmax after top-k (arXiv 2506.02890), so a
# before_topk arm is the one named; at k*G = 1, where after top-k gives the router no gradient, before.
LABEL_DEFAULT = MoEConfig(order="after_topk")
LABEL_DEFAULT_K1 = MoEConfig(order="before_topk")


def variant_label(model: ModelConfig) -> str:
    """dense, or moe-E<E>-k<k>-G<G> plus what differs from the default router (docs/outputs.md)."""
    m = model.moe
    if m is None:
        return "dense"
    parts = [f"moe-E{m.num_experts}-k{m.top_k}-G{m.granularity}"]
    default = LABEL_DEFAULT_K1 if m.k_routed == 1 else LABEL_DEFAULT
    keys = ("router", "score", "order") if m.router == "token_choice" else ("router", "score")
    parts += [getattr(m, key) for key in keys if getattr(m, key) != getattr(default, key)]
    if m.num_shared:
        parts.append(f"shared{m.num_shared}")
    if model.first_dense_layers:
        parts.append(f"{model.first_dense_layers}dense")
    return "-".join(parts)


def training_tokens(run: RunConfig, model: ModelConfig) -> int:
    """The point's budget; with budget_from=dense_flops, the tokens costing what the dense model of
    the same total params spends on `tokens` (paper 3's equal compute, by our FLOP accounting)."""
    if run.budget_from == "tokens" or model.moe is None:
        return run.tokens
    dense = derive(model, dense="total")
    ratio = flops_per_token(dense).train / flops_per_token(model).train
    batches = max(1, round(run.tokens * ratio / run.train.batch_tokens))
    return batches * run.train.batch_tokens


def run_key_of(model: ModelConfig, run: RunConfig, train: TrainConfig) -> str:
    """Short hash of what the point computes: model, data, optim and train less INFRA_KEYS."""
    identity = {
        "model": dataclasses.asdict(model),
        "data": dataclasses.asdict(run.data),
        "optim": dataclasses.asdict(run.optim),
        "train": dataclasses.asdict(train),
    }
    for section, keys in INFRA_KEYS.items():
        for key in keys:
            identity[section].pop(key)
    for section, added in ADDED_KEYS.items():
        for key, before in added.items():
            if identity[section][key] == before:
                identity[section].pop(key)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Parent:
    """The run a cooldown branch starts from: the point of the same config with tokens=branch_from."""

    run_key: str
    """Its run key (its folder is runs/<run_key> of the same study)."""
    tokens: int
    """Its training budget."""
    plan: TrainPlan
    """Its steps and batch shapes."""


def _parent(run: RunConfig, model: ModelConfig, train: TrainConfig, world: int) -> Parent | None:
    """The parent of a branch (None for any other point); ValueError naming the axes if impossible."""
    if run.branch_from is None:
        return None
    if run.optim.schedule != "wsd":
        raise ValueError(
            f"branch_from={run.branch_from} needs optim.schedule=wsd (optim=wsd), not "
            f"{run.optim.schedule}: branches cool down from a constant-LR phase"
        )
    if run.tokens == run.branch_from:
        return None  # the parent itself: an ordinary warmup-stable-decay run
    if run.tokens > run.branch_from:
        raise ValueError(
            f"tokens={run.tokens} is not below branch_from={run.branch_from}: a branch is "
            "shorter than its parent (the point with tokens=branch_from)"
        )
    parent_run = dataclasses.replace(run, tokens=run.branch_from)
    parent_train = dataclasses.replace(train, tokens=training_tokens(parent_run, model))
    plan = plan_training(model, run.optim, parent_train, world_size=world)
    return Parent(run_key_of(model, parent_run, parent_train), parent_train.tokens, plan)


@dataclass(frozen=True)
class Point:
    run: RunConfig
    """The composed config."""
    model: ModelConfig
    """Derived model."""
    train: TrainConfig
    """Training config with the point's budget and seed."""
    plan: TrainPlan
    """Steps and batch shapes."""
    variant: str
    """Readable label (tag `variant`)."""
    run_key: str
    """Short hash of what the point computes (run_key_of)."""
    study_dir: Path
    """<paths.root>/<study.name>."""
    parent: Parent | None = None
    """A cooldown branch's parent run (docs/branches.md); None for any other point."""

    @property
    def run_dir(self) -> Path:
        return self.study_dir / "runs" / self.run_key

    @property
    def role(self) -> str | None:
        """Its part in cooldown branching: "branch", "parent" (the point with tokens=branch_from) or None."""
        if self.parent is not None:
            return "branch"
        return "parent" if self.run.branch_from is not None else None

    @property
    def world_size(self) -> int:
        return self.run.infra.world_size

    @property
    def tracking_uri(self) -> str:
        return tracking.tracking_uri_of(self.run.tracking.uri, self.study_dir)

    def resolved(self) -> dict[str, Any]:
        """The point's config with the derived model and budget in place (written as config.yaml)."""
        tree = dataclasses.asdict(self.run)
        tree.pop("launch")
        tree["parallel"] = dataclasses.asdict(self.run.parallel)
        tree["model"] = {"name": self.run.model.name, **dataclasses.asdict(self.model)}
        tree["train"] = dataclasses.asdict(self.train)
        return tree

    def tags(self) -> dict[str, str]:
        m = self.model.moe
        return {
            "kind": "point",
            "study": self.run.study.name,
            "variant": self.variant,
            "model": self.run.model.name,
            "granularity": str(m.granularity) if m else "none",
            "top_k": str(m.top_k) if m else "none",
            "experts": str(m.num_experts) if m else "none",
            "tokens": str(self.train.tokens),
            "budget_tokens": str(self.run.tokens),
            "seed": str(self.run.seed),
            "run_key": self.run_key,
            "git_sha": git_sha(),
            **self.branch_tags(),
        }

    def branch_tags(self) -> dict[str, str]:
        """branch (parent / branch) and, on a branch, branch_of (its parent's run key) and branch_step."""
        if self.role is None:
            return {}
        if self.parent is None:
            return {"branch": "parent"}
        return {
            "branch": "branch",
            "branch_of": self.parent.run_key,
            "branch_step": str(self.plan.branch_step),
        }

    def accounting(self) -> dict[str, float]:
        params = count_params(self.model)
        return {
            "acct.params_total": params.total,
            "acct.params_active": params.active,
            "acct.params_non_embedding": params.non_embedding,
            "acct.params_active_non_embedding": params.active_non_embedding,
            "acct.flops_per_token_train": flops_per_token(self.model).train,
            # The routed-output scale in effect (moe.routed_scale is None when derived from G).
            "moe.routed_scale_used": self.model.moe.routed_scale_used if self.model.moe else 1.0,
            "acct.steps": self.plan.steps,
            "acct.batch_tokens": self.plan.batch_tokens,
        }

    def params(self) -> dict[str, Any]:
        """Flattened resolved config (model.moe.* as moe.*) plus accounting: the MLflow params.

        The top-level sweep axes go under `axis.` (axis.granularity, axis.tokens, ...): bare, they would
        shadow the same-named tags, which hold the derived values (e.g. tag granularity=8 where the axis
        was left null, tag tokens = the budget actually trained)."""
        return {**tracking.config_params(self.resolved(), AXES), **self.accounting()}


def build_point(run: RunConfig, *, cwd: Path | None = None, vocab_size: int | None = None) -> Point:
    """Derive and validate everything about a point that needs no data files; ValueError naming the key.
    vocab_size: the prepared data's vocabulary (studies.job.execute passes it); None: data_vocab(run)."""
    world = run.infra.world_size
    if world > 1 and run.infra.name == "basic":
        raise ValueError(
            f"infra.tasks_per_node={run.infra.tasks_per_node} x infra.nodes={run.infra.nodes} needs a "
            "submitit launcher (infra=local or infra=slurm); infra=basic runs each point in this process"
        )
    model = derive_model(run, data_vocab(run) if vocab_size is None else vocab_size)
    tokens = training_tokens(run, model)
    if tokens < run.train.batch_tokens:
        raise ValueError(
            f"tokens={tokens} is smaller than one batch (train.batch_tokens={run.train.batch_tokens})"
        )
    train_cfg = dataclasses.replace(run.train, tokens=tokens, seed=run.seed)
    parent = _parent(run, model, train_cfg, world)
    if parent is not None:
        train_cfg = dataclasses.replace(train_cfg, branch_from=parent.tokens)

    def plan_it():
        return plan_training(model, run.optim, train_cfg, world_size=world)

    plan = plan_it() if parent is None else _axis("branch_from", run.branch_from, plan_it)
    resolve_layout(run.parallel, world, model)  # parallel.* against the ranks and the experts
    study_dir = study_dir_of(run.paths.root, run.study.name, cwd)
    key = run_key_of(model, run, train_cfg)
    return Point(run, model, train_cfg, plan, variant_label(model), key, study_dir, parent)
