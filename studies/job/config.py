"""Structured config of one sweep point, registered in Hydra's ConfigStore.

The library's dataclasses (moe.model.config, moe.data.prepare, moe.train.loop) stay the single source of truth. OmegaConf
cannot check `Literal[...]` fields, so `schema_of(cls)` builds an OmegaConf twin of each one, with every
Literal turned into an Enum of the same strings: a misspelt key, a wrong type or a value outside a
Literal fails at compose time. `to_library(cls, node)` turns a composed node back into the library type.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.data.config import DataConfig
from moe.model.config import ModelConfig, MoEConfig
from moe.parallel.layout import ParallelConfig
from moe.train.plan import OptimConfig, TrainConfig

Variant = Literal["moe", "dense"]
DenseMatch = Literal["active", "total"]
BudgetFrom = Literal["tokens", "dense_flops"]


def _omegaconf_type(tp: Any, where: str) -> Any:
    """The OmegaConf-checkable equivalent of an annotation (Literal -> Enum, dataclass -> twin)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = typing.get_args(tp)
        return enum.Enum(where.replace(".", "_"), {str(v): str(v) for v in values})
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"{where}: only Optional[X] unions are supported, got {tp}")
        return Optional[_omegaconf_type(args[0], where)]  # noqa: UP045 - OmegaConf wants typing.Optional
    if dataclasses.is_dataclass(tp):
        return schema_of(tp)
    return tp


# Library fields a sweep axis owns: left out of the schema, so each value has one key (the axis) and
# `train.tokens=...` fails at compose time instead of silently disagreeing with `tokens=...`.
AXIS_OWNED: dict[type, dict[str, str]] = {
    TrainConfig: {"tokens": "tokens", "seed": "seed", "branch_from": "branch_from"},
    MoEConfig: {"granularity": "granularity"},
}


@functools.cache
def schema_of(cls: type, extra: tuple[tuple[str, type, Any], ...] = ()) -> type:
    """OmegaConf twin of dataclass `cls` (same fields and defaults, less AXIS_OWNED), plus `extra`
    (name, type, default)."""
    hints = typing.get_type_hints(cls)
    fields = []
    owned = AXIS_OWNED.get(cls, {})
    for f in dataclasses.fields(cls):
        if f.name in owned:
            continue
        tp = _omegaconf_type(hints[f.name], f"{cls.__name__}.{f.name}")
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                twin = schema_of(type(default))
                fields.append((f.name, tp, field(default_factory=twin)))
                continue
            fields.append((f.name, tp, field(default_factory=f.default_factory)))
        else:
            enum_type = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
            default = f.default
            if isinstance(enum_type, type) and issubclass(enum_type, enum.Enum) and default is not None:
                default = enum_type[str(default)]
            fields.append((f.name, tp, field(default=default)))
    fields.extend((name, tp, field(default=default)) for name, tp, default in extra)
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def to_library(cls: type, node: Any, *, ignore: tuple[str, ...] = ()) -> Any:
    """Build library dataclass `cls` from a composed (Dict)Config or dict; enums become their strings."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in node:
            continue
        value = node[f.name]
        target = hints[f.name]
        inner = [a for a in typing.get_args(target) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(target):
            inner = [target]
        if inner and isinstance(value, dict):
            value = to_library(inner[0], value)
        kwargs[f.name] = value
    unknown = set(node) - set(kwargs) - set(ignore)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**kwargs)


# Orchestration-only concerns --------------------------------------------------------------------


@dataclass
class StudyConfig:
    name: str = "default"
    """Study name: MLflow experiment name and the folder under paths.root."""
    description: str = ""
    """What the study asks, shown in reports."""
    baseline: str | None = None
    """Variant label the analysis measures savings against (e.g. moe-E8-k2-G1); None: no savings."""
    best_lr: bool | None = None
    """Compare each variant at its own best optim.lr (analysis.tuning). None: when a variant has several
    learning rates; true with a one-point grid is refused."""
    holdout: list[str] = field(default_factory=list)
    """Points held out of the scaling-law fit, as key=value (e.g. model=tiny_d128): they train last, after
    the study has written report/forecast.json for them from the other points (studies.launch.holdout)."""

    def __post_init__(self) -> None:
        name = self.name
        if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
            raise ValueError(
                f"study.name={name!r} must be a plain folder name (no '/', '\\', '..' or surrounding "
                "spaces): it names the study's folder under paths.root"
            )
        for entry in self.holdout:
            key, eq, value = str(entry).partition("=")
            if not eq or not key.strip() or not value.strip():
                raise ValueError(f"study.holdout entry {entry!r} must be key=value, e.g. model=tiny_d128")


@dataclass
class InfraConfig:
    name: str = "local"
    """Profile name (local, basic, ...)."""
    threads: int = 1
    """torch intra-op threads per task (conf/infra/local.yaml derives it from the machine)."""
    nodes: int = 1
    """Nodes per point; with tasks_per_node, the point's data-parallel ranks (docs/distributed.md)."""
    tasks_per_node: int = 1
    """Tasks (data-parallel ranks) per node; one GPU each on a GPU cluster."""
    peer_timeout_s: float = 30.0
    """Seconds a rank's heartbeat may stay silent before its peers count it failed and end the point,
    naming it (docs/distributed.md, "Rank failures"); raise it where ranks stall that long (slow I/O)."""

    @property
    def world_size(self) -> int:
        """The point's data-parallel ranks: nodes x tasks_per_node."""
        return self.nodes * self.tasks_per_node

    def __post_init__(self) -> None:
        for key in ("threads", "nodes", "tasks_per_node"):
            if getattr(self, key) < 1:
                raise ValueError(f"infra.{key}={getattr(self, key)} must be >= 1")
        if not self.peer_timeout_s > 0:
            raise ValueError(f"infra.peer_timeout_s={self.peer_timeout_s} must be > 0 (seconds)")


@dataclass
class PathsConfig:
    root: str = "outputs"
    """Parent of every study directory; a relative path is taken from the directory the command ran in,
    and `~` is the home folder (as the submitit logs under it take it)."""

    def __post_init__(self) -> None:
        if not str(self.root).strip():
            raise ValueError(f"paths.root={self.root!r} must name a folder (e.g. outputs)")


def study_dir_of(root: str, study: str, cwd: Path | None = None) -> Path:
    """<paths.root>/<study.name>, a relative root taken from `cwd` (default: where the command ran)."""
    return Path(cwd or os.getcwd()) / Path(root).expanduser() / study


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; None means sqlite:///<study dir>/mlflow.db."""
    flush_every_s: float = 15.0
    """Buffered metrics go to MLflow in one log_batch at most this often (and at the end)."""


@dataclass
class LaunchConfig:
    """How this invocation treats existing points; never part of a point's identity."""

    dry_run: bool = False
    """Print what each point would do (start / resume / skip / not retried) and launch nothing."""
    retry_failed: bool = False
    """Retry FAILED points (from their latest checkpoint); without it they are reported, not rerun."""
    progress: Literal["auto", "live", "lines", "off"] = "auto"
    """Sweep progress in the launching terminal: live (a table redrawn in place), lines (plain lines, for
    logs), auto (live on a terminal, else lines) or off."""
    progress_every_s: float = 30.0
    """lines mode: a point's line is repeated at most this often (state changes print at once)."""
    detach: bool = False
    """Submit the sweep's jobs and return without waiting (`--detach`); the end-of-sweep work runs as a
    SLURM job after the array (afterany), or by hand with `python -m studies.launch.finish <sweep dir>`."""
    parent_wait_s: float = 86400.0
    """How long a cooldown branch waits for its parent to write the checkpoint it starts from before
    its job fails, saying so (docs/branches.md)."""

    def __post_init__(self) -> None:
        if not self.parent_wait_s >= 0:
            raise ValueError(f"launch.parent_wait_s={self.parent_wait_s} must be >= 0")


@dataclass
class ModelPreset(ModelConfig):
    name: str = "custom"
    """Name of the size preset (conf/model/<name>.yaml); logged as the `model` tag."""
    vocab_size: int | None = None  # type: ignore[assignment]
    """None: the data's vocabulary (data.vocab_size, or a tokens folder's meta.json). A preset that pins
    its real vocabulary (mixtral_8x7b: 32000) needs data with that vocabulary: a mismatch is an error."""

    def library(self, vocab_size: int) -> ModelConfig:
        """The plain moe.model.config.ModelConfig (without the preset name) at `vocab_size`."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**fields, "vocab_size": vocab_size})


@dataclass
class RunConfig:
    """One sweep point: the library configs plus the short sweep axes."""

    model: ModelPreset = field(default_factory=ModelPreset)
    """Size preset (conf/model/); the top-level axes below derive the point's model from it."""
    data: DataConfig = field(default_factory=DataConfig)
    """moe.data.config.DataConfig; the model's vocabulary comes from the data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """moe.train.plan.OptimConfig."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """moe.train.plan.TrainConfig without tokens and seed: the axes `tokens` and `seed` are their only keys."""
    study: StudyConfig = field(default_factory=StudyConfig)
    """Study identity (conf/study/)."""
    infra: InfraConfig = field(default_factory=InfraConfig)
    """Launcher profile (conf/infra/)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """moe.parallel.layout.ParallelConfig: how a point's ranks share the model (ddp, fsdp, expert parallel);
    not part of the run key (a sharded checkpoint resumes on another layout, docs/distributed.md)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Where outputs go."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow settings."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """dry_run / retry_failed for this invocation (`--dry-run`, `--retry-failed` are short for them)."""

    # Sweep axes ----------------------------------------------------------------------------------
    variant: Variant = "moe"
    """moe, or dense: a dense model matched to the MoE (see dense_match)."""
    dense_match: DenseMatch = "active"
    """variant=dense matches the MoE's active params (same compute) or total params (moe.model.matched)."""
    granularity: int | None = None
    """G: splits each of the preset's experts into G (moe.model.matched.derive, same params, FLOPs and function
    at init); the only key for it (presets are G=1). None: G=1."""
    top_k: int | None = None
    """Base k: derives the matched config (same active and total expert width); None keeps the preset's."""
    experts: int | None = None
    """E (expansion rate) at the preset's expert size: total params grow with E, active ones do not."""
    tokens: int = 2_000_000
    """Training budget in tokens: the only key for it (the point's train.tokens is derived from it)."""
    budget_from: BudgetFrom = "tokens"
    """tokens: every point trains on `tokens`; dense_flops: `tokens` is the budget of the dense model
    with the same total params, and a MoE gets the tokens that cost the same training FLOPs."""
    seed: int = 0
    """Seed for initialisation and data order (train.seed follows it)."""
    branch_from: int | None = None
    """Cooldown branches (docs/branches.md; needs optim.schedule=wsd): the budget of the parent run, the
    point of the same config with tokens=branch_from, trained in full; a point with a smaller `tokens`
    starts from the parent's checkpoint at its branch point and decays over its own last
    optim.decay_frac. None: every point trains from scratch."""


RunSchema = schema_of(RunConfig)


def load_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """Typed RunConfig from a composed config (the `hydra` node, if present, is ignored)."""
    if isinstance(cfg, RunConfig):
        return cfg
    keys = [k for k in cfg.keys() if k != "hydra"]
    container = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, enum_to_str=True)
    run = to_library(RunConfig, container)
    check_finite(run)
    return run


def check_finite(node: Any, prefix: str = "") -> None:
    """Every number of the config is finite: a NaN or infinite value is refused by its key, whatever the
    section (the sections' own checks then test the ranges)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} must be a finite number")


def register_configs() -> None:
    """Register the run schema; conf/config.yaml extends it via `defaults: [run_schema, ...]`."""
    ConfigStore.instance().store(name="run_schema", node=RunSchema)
