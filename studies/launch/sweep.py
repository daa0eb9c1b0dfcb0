"""A sweep: its points, expanded from the overrides exactly as Hydra's basic sweeper does, and their
validation, the one path every mode takes before any job starts (`studies.run` with and without `-m`,
`--dry-run`, `studies.plan`).

    expand      jobs_of(master config) -> [(overrides, composed config)]; compose_jobs for the CLIs;
                cooldown branches after the other points (ordered_jobs, which the sweeper launches by)
    label       varying(override lists): per point, only what differs between the points
    validate    validate_jobs(jobs) -> points, or one ValueError listing every bad point by its overrides
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from analysis.tuning import lr_grid_errors
from moe.data.config import PreparedData, cache_root
from moe.data.loader import check_budget
from moe.data.prepare import prepare_data
from moe.model.accounting import count_params_of_module
from moe.model.transformer import Transformer
from records import runfiles
from records.code_record import project_root
from studies.job.config import RunConfig, load_run_config, register_configs
from studies.job.point import Point, build_point
from studies.launch import branches, checks, holdout

CONF_DIR = project_root() / "conf"
CONFIG_NAME = "config"

Job = tuple[tuple[str, ...], "DictConfig | Exception"]
"""(overrides, composed config), or the composition error of a job (a misspelt key, a bad value),
raised where the point is validated so that it is listed with the others."""


def sweep_overrides(master: DictConfig) -> list[list[str]]:
    """The override lists of every job a multirun of `master` launches (study params + command line),
    expanded as Hydra's basic sweeper does."""
    sweeper = master.hydra.sweeper.get("_target_", "")
    if not str(sweeper).endswith(("BasicSweeper", "ParentsFirstSweeper")):
        raise ValueError(f"hydra.sweeper._target_={sweeper} is not Hydra's BasicSweeper: cannot expand it")
    node = master.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    task = list(master.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def jobs_of(master: DictConfig) -> list[Job]:
    """(overrides, composed config) of every job of a multirun, composed by the config loader the
    launcher uses (Hydra must be initialised: inside a Hydra app or compose_jobs), in launch order."""
    return ordered_jobs(master, sweep_overrides(master), GlobalHydra.instance().config_loader())


def ordered_jobs(master: DictConfig, override_lists: Sequence[Sequence[str]], loader) -> list[Job]:
    """The jobs of `override_lists` composed, in the order the sweep launches them: every cooldown branch
    after the other points (studies.launch.branches.parents_first; hydra_plugins.moe_scaling.sweeper), and the
    held-out points of a forecast (study.holdout) after all of them (studies.launch.holdout)."""
    jobs = [
        (tuple(job), _composed(lambda j=job: loader.load_sweep_config(master, list(j))))
        for job in override_lists
    ]
    return holdout.held_out_last(branches.parents_first(jobs))


# Keys that look like config keys but are owned by an axis (studies.job.config.AXIS_OWNED).
AXIS_KEYS = {
    "train.tokens": "tokens",
    "train.seed": "seed",
    "train.branch_from": "branch_from",
    "model.moe.granularity": "granularity",
}


def _composition_error(exc: Exception) -> Exception:
    """Hydra's error, plus the key to use where the user typed one that an axis owns."""
    for key, axis in AXIS_KEYS.items():
        if f"'{key}'" in str(exc):
            return ValueError(
                f"{key} is not a key: `{axis}=...` is the only key for it ({str(exc).splitlines()[0]})"
            )
    return exc


def _composed(compose) -> DictConfig | Exception:
    try:
        return compose()
    except Exception as exc:  # noqa: BLE001 - kept for validate_jobs, which names the point
        return _composition_error(exc)


def compose_jobs(overrides: Sequence[str], multirun: bool) -> list[Job]:
    """Every job `studies.run [-m] overrides` would launch, outside a Hydra app (CLIs, tests).
    A study preset with hydra.mode=MULTIRUN is a sweep without -m, as under studies.run."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="plan"):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config(CONFIG_NAME, list(overrides), run_mode=RunMode.MULTIRUN)
        if not multirun and str(master.hydra.get("mode")) != "MULTIRUN":
            run = _composed(
                lambda: gh.hydra.compose_config(CONFIG_NAME, list(overrides), run_mode=RunMode.RUN)
            )
            return [(tuple(overrides), run)]
        return jobs_of(master)


def varying(override_lists: Sequence[Sequence[str]]) -> list[str]:
    """Per point, the overrides that differ between points ("-" when none; all of them for one point)."""
    lists = [list(o) for o in override_lists]
    common = set.intersection(*(set(o) for o in lists)) if len(lists) > 1 else set()
    return [" ".join(o for o in job if o not in common) or "-" for job in lists]


@dataclass
class Validation:
    """What validating a sweep keeps between points: each data config is prepared once, each explicit
    tracking URI checked once."""

    cwd: Path | None = None
    data: dict[str, PreparedData | Exception] | None = None
    uris: dict[str, Exception | None] | None = None

    def __post_init__(self) -> None:
        self.data = {} if self.data is None else self.data
        self.uris = {} if self.uris is None else self.uris

    def prepared(self, run: RunConfig) -> PreparedData:
        key = repr(run.data)
        if key not in self.data:
            try:
                self.data[key] = prepare_data(run.data)
            except Exception as exc:  # noqa: BLE001 - every point with this data config gets the error
                self.data[key] = exc
        found = self.data[key]
        if isinstance(found, Exception):
            raise found
        return found

    def tracking_ok(self, uri: str) -> None:
        if uri not in self.uris:
            try:
                checks.check_tracking_uri(uri)
                self.uris[uri] = None
            except ValueError as exc:
                self.uris[uri] = exc
        if self.uris[uri] is not None:
            raise self.uris[uri]


def validate_point(run: RunConfig, launcher: dict, seen: Validation) -> Point:
    """Everything checkable before a job starts: names and paths, the device and scheduler, derivation
    and accounting (build_point), the data (prepared once per distinct data config, into the cache the
    jobs then read) and that the budget fits in one epoch of it unless data.allow_repeat, the model built
    on the meta device against the accounting, the training memory against the target's, the MLflow URI."""
    checks.check_device(run.train.device)
    checks.check_scheduler(str(launcher.get("_target_", "")))
    checks.check_nodes(run.infra.nodes, str(launcher.get("_target_", "")))
    point = build_point(run, cwd=seen.cwd)  # derivation and memory errors before any data work
    checks.check_point_memory(point, launcher)
    cache = cache_root(run.data.cache_dir)  # its lock files and shards are written there
    key = "data.cache_dir" if run.data.cache_dir or "MOE_CACHE_DIR" not in os.environ else "MOE_CACHE_DIR"
    checks.check_writable(key, str(run.data.cache_dir or cache), cache)
    prepared = seen.prepared(run)
    point = build_point(run, cwd=seen.cwd, vocab_size=prepared.vocab_size)
    check_budget(prepared, point.model.seq_len, point.train.tokens, run.data.allow_repeat)
    check_meta_numel(point)
    checks.check_writable("paths.root", run.paths.root, point.study_dir)
    if run.tracking.uri:
        seen.tracking_ok(run.tracking.uri)
    return point


def check_meta_numel(point: Point) -> int:
    """Build the model on the meta device (no storage): its numel must equal the analytic total."""
    with torch.device("meta"):
        built = count_params_of_module(Transformer(point.model))
    counted = int(point.accounting()["acct.params_total"])
    if built != counted:
        raise RuntimeError(f"accounting says {counted:,} params but the model has {built:,} (a bug in moe/)")
    return built


def validate_jobs(jobs: Sequence[Job], cwd: Path | None = None) -> list[Point]:
    """Validate every job; one ValueError lists every bad point by its varying overrides. Points that
    are the same run (one run key) are refused: they would train the same thing twice at once."""
    labels = varying([job for job, _ in jobs])
    seen = Validation(cwd)
    errors, points = [], []
    for (job, cfg), label in zip(jobs, labels, strict=True):
        try:
            if isinstance(cfg, Exception):
                raise cfg
            launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True) if "hydra" in cfg else {}
            point = validate_point(load_run_config(cfg), launcher, seen)
            if "hydra" in cfg:  # after paths.root's own check: Hydra's folders are under it
                checks.check_launch(launch_keys(cfg.hydra, launcher))
            points.append((label, point))
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below with the point named
            errors.append(
                f"  {label if len(jobs) > 1 else ' '.join(job) or '(no overrides)'}: "
                f"{type(exc).__name__}: {exc}"
            )
    by_key: dict[str, list[str]] = {}
    for label, point in points:
        by_key.setdefault(point.run_key, []).append(label)
    for key, same in by_key.items():
        if len(same) > 1:
            errors.append(
                f"  {' and '.join(same)}: the same run (run key {key}, identical config): keep one of them"
            )
    label_of = {id(point): label for label, point in points}
    bad_branches = branches.check_branches([p for _, p in points])
    errors += [f"  {label_of[id(p)]}: {reason}" for p, reason in bad_branches]
    if not errors:
        errors += [f"  {reason}" for reason in holdout.holdout_errors(jobs, [p for _, p in points])]
    if errors:
        raise ValueError(f"{len(errors)} of {len(jobs)} sweep points are invalid:\n" + "\n".join(errors))
    validated = [p for _, p in points]
    if any(p.run.study.best_lr for p in validated):
        check_lr_grids(validated)
    check_baselines(validated)
    return validated


def launch_keys(hydra: DictConfig, launcher: dict) -> dict:
    """The parts of the `hydra` node check_launch reads, resolved (the rest may need a running job)."""
    sweeper = OmegaConf.to_container(hydra.sweeper, resolve=True) if "sweeper" in hydra else {}
    folders = {mode: {"dir": str(hydra[mode].dir)} for mode in ("run", "sweep") if mode in hydra}
    return {"launcher": launcher, "sweeper": sweeper, **folders}


def check_baselines(points: Sequence[Point]) -> None:
    """study.baseline names a variant of this sweep, or of a run already in the study's folder: the
    report measures every saving against it."""
    for baseline, study_dir in sorted(
        {(p.run.study.baseline, p.study_dir) for p in points if p.run.study.baseline}
    ):
        known = {p.variant for p in points if p.study_dir == study_dir}
        known |= {s.get("variant") for d in runfiles.run_dirs(study_dir) if (s := runfiles.read_summary(d))}
        if baseline not in known:
            variants = ", ".join(sorted(v for v in known if v))
            raise ValueError(
                f"study.baseline={baseline!r} is no variant of this sweep or study ({variants}); "
                "name one, or set study.baseline=null"
            )


def check_lr_grids(points: Sequence[Point]) -> None:
    """study.best_lr=true needs at least two learning rates per (variant, model, tokens), each at two or
    more seeds: the report's rule (analysis.tuning.lr_grid_errors), checked before any job."""
    grids: dict[tuple[str, int, str], dict[float, set[int]]] = {}
    for p in points:
        by_lr = grids.setdefault((p.run.model.name, p.train.tokens, p.variant), {})
        by_lr.setdefault(p.run.optim.lr, set()).add(p.run.seed)
    bad = lr_grid_errors({key: dict(sorted(by_lr.items())) for key, by_lr in grids.items()}, best_lr=True)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"study.best_lr=true but {bad[0]}{more}")


def validate_overrides(override_lists: Sequence[Sequence[str]], cwd: Path | None = None) -> list[Point]:
    """validate_jobs for override lists composed with hydra.compose (Hydra initialised: tests, tools)."""
    from hydra import compose

    jobs = [
        (tuple(o), _composed(lambda o=o: compose(config_name=CONFIG_NAME, overrides=list(o))))
        for o in override_lists
    ]
    return validate_jobs(jobs, cwd)
