"""Hydra callback around a multirun: one MLflow parent run per sweep, a table of the points at the end,
then the analysis report.

Jobs learn the parent run id from MOE_PARENT_RUN_ID (inherited by submitit's local subprocesses and by
SLURM jobs) and record their outcome in <job dir>/point.json, which the end-of-sweep table reads.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from moe.accounting import count_params_of_module
from moe.corpus import read_meta
from moe.data import PreparedData, check_budget, prepare_data, validate_data_config
from moe.model import Transformer
from moe.train import OptimConfig
from studies import tracking
from studies.config import RunConfig, load_run_config
from studies.point import Point, build_point

PARENT_ENV = "MOE_PARENT_RUN_ID"
RECORD = "point.json"


def study_dir_of(config: DictConfig, cwd: Path | None = None) -> Path:
    return Path(cwd or os.getcwd()) / config.paths.root / config.study.name


def tracking_uri_of(config: DictConfig, cwd: Path | None = None) -> str:
    return config.tracking.uri or tracking.default_tracking_uri(study_dir_of(config, cwd))


def sweep_points(config: DictConfig) -> list[list[str]]:
    """The override lists of every job a multirun of `config` launches (study params + command line),
    expanded as Hydra's basic sweeper does."""
    node = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    task = list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_optim(optim: OptimConfig) -> None:
    """What plan_training leaves unchecked: finite values, AdamW's betas and eps, decay and clipping."""
    for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "warmup_frac", "decay_frac",
                 "grad_clip"):  # fmt: skip
        value = getattr(optim, name)
        if not math.isfinite(value):
            raise ValueError(f"optim.{name}={value} must be finite")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(optim, name) < 1.0:
            raise ValueError(f"optim.{name}={getattr(optim, name)} must be in [0, 1)")
    if optim.eps <= 0:
        raise ValueError(f"optim.eps={optim.eps} must be > 0")
    for name in ("weight_decay", "grad_clip"):
        if getattr(optim, name) < 0:
            raise ValueError(f"optim.{name}={getattr(optim, name)} must be >= 0 (0 disables it)")


def check_writable(key: str, value: str, path: Path) -> None:
    """`path` exists as a folder we can write in, or can be created: tried with a temporary file in its
    nearest existing ancestor, which is removed again (os.access says yes to root on read-only mounts)."""
    ancestor = Path(path).resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{key}={value!r} is not writable: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".moe-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(
            f"{key}={value!r} is not writable: cannot create files in {ancestor} ({exc})"
        ) from None


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """An explicitly given tracking.uri answers (http: GET /health) or can be written (sqlite)."""
    if tracking.is_server(uri):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        raise ValueError(
            f"tracking.uri={uri!r} is unreachable (GET /health: {problem}); start the server "
            "(python -m studies.server) or fix the URI"
        )
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_dir():
            raise ValueError(f"tracking.uri={uri!r} names a folder; use sqlite:///<folder>/mlflow.db")
        check_writable("tracking.uri", uri, db.parent)
    elif uri.startswith(("file:", "sqlite:")) or "://" not in uri:
        raise ValueError(
            f"tracking.uri={uri!r} is not usable: use sqlite:////abs/path/mlflow.db or http://host:port"
        )


def validate_point(
    run: RunConfig, cwd: Path | None = None, data_seen: dict[str, PreparedData] | None = None
) -> Point:
    """Everything checkable before a job starts: derivation and accounting (build_point), optimiser,
    the model built on the meta device (its numel must match the accounting), the data (prepared once
    per distinct data config in `data_seen`, into the cache the jobs then read) and that the budget fits
    in one epoch of it unless data.allow_repeat, and a writable study directory. ValueError naming the key."""
    point = build_point(run, cwd=cwd)
    check_optim(run.optim)
    key = repr(run.data)
    seen = {} if data_seen is None else data_seen
    if key not in seen:
        validate_data_config(run.data)
        seen[key] = prepare_data(run.data)
    check_budget(seen[key], point.model.seq_len, point.train.tokens, run.data.allow_repeat)
    if run.data.source == "tokens":  # the shards bring their own vocabulary
        point = build_point(
            run, cwd=cwd, vocab_size=read_meta(Path(run.data.path).expanduser())["vocab_size"]
        )
    with torch.device("meta"):
        built = count_params_of_module(Transformer(point.model))
    counted = point.accounting()["acct.params_total"]
    if built != counted:
        raise RuntimeError(f"accounting says {counted:,} params but the model has {built:,} (a bug in moe/)")
    check_writable("paths.root", run.paths.root, point.study_dir)
    return point


def validate_points(points: list[list[str]], config_name: str | None, cwd: Path | None = None) -> int:
    """Compose every point (override lists, with Hydra initialised) and validate it; one ValueError lists
    every bad point by its overrides. Explicit tracking URIs are checked once each. Returns the count."""
    common = set.intersection(*(set(p) for p in points)) if points else set()
    errors, data_seen, uris = [], {}, {}
    lr_grids: dict[tuple, set[float]] = {}
    best_lr = None
    for overrides in points:
        try:
            run = load_run_config(compose(config_name=config_name, overrides=overrides))
            point = validate_point(run, cwd, data_seen)
            best_lr = run.study.best_lr
            lr_grids.setdefault((point.variant, run.model.name, point.train.tokens), set()).add(run.optim.lr)
            if run.tracking.uri and run.tracking.uri not in uris:
                try:
                    check_tracking_uri(run.tracking.uri)
                    uris[run.tracking.uri] = None
                except ValueError as exc:
                    uris[run.tracking.uri] = exc
            if uris.get(run.tracking.uri):
                raise uris[run.tracking.uri]
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below with the point named
            varying = " ".join(o for o in overrides if o not in common) or " ".join(overrides)
            errors.append(f"  {varying}: {type(exc).__name__}: {exc}")
    if errors:
        raise ValueError(f"{len(errors)} of {len(points)} sweep points are invalid:\n" + "\n".join(errors))
    if best_lr:
        check_lr_grids(lr_grids)
    return len(points)


def check_lr_grids(lr_grids: dict[tuple, set[float]]) -> None:
    """study.best_lr=true needs at least two learning rates per (variant, model, tokens)."""
    for (variant, model, tokens), lrs in sorted(lr_grids.items()):
        if len(lrs) < 2:
            raise ValueError(
                f"study.best_lr=true but optim.lr has one value ({min(lrs):g}) for variant {variant} at "
                f"model={model} tokens={tokens}: a best-LR comparison needs at least 2 learning rates "
                "(sweep -m optim.lr=1e-3,3e-3,1e-2)"
            )


def validate_sweep(config: DictConfig, config_name: str | None) -> int:
    """Compose and validate every point of the multirun `config` before any job starts (validate_points)."""
    return validate_points(sweep_points(config), config_name)


def write_job_record(job_dir: Path, record: dict[str, Any]) -> None:
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    (Path(job_dir) / RECORD).write_text(json.dumps(record, indent=2, default=str))


def read_job_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per Hydra job dir of the sweep; a job that died before writing one counts as FAILED."""
    records = []
    job_dirs = sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()),
                      key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30)  # fmt: skip
    for job_dir in job_dirs:
        path = job_dir / RECORD
        if path.exists():
            records.append(json.loads(path.read_text()))
        else:
            records.append({"job": job_dir.name, "status": "FAILED", "error": "job ended without a record"})
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("variant", "model", "seed", "params", "active", "tokens", "val loss", "status")
    rows = [header]
    for r in records:
        tags = r.get("tags") or {}
        val = r.get("val_loss")
        rows.append((
            str(r.get("variant", "?")), tags.get("model", "?"), tags.get("seed", "?"),
            f"{r['params_total']:,}" if r.get("params_total") else "-",
            f"{r['params_active']:,}" if r.get("params_active") else "-",
            f"{r['tokens']:,}" if r.get("tokens") else "-",
            f"{val:.4f}" if isinstance(val, float) else "-",
            r.get("status", "?"),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _exit(message: str) -> None:
    """Hydra turns exceptions raised in callbacks into warnings and exits 0; a failed or invalid sweep
    must exit non-zero, so print the reason and raise SystemExit, which Hydra does not catch."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(1)


class StudyCallback(Callback):
    """Parent MLflow run on multirun start; table, UI hint and analysis report on multirun end."""

    def __init__(self, report: bool = True, validate: bool = True):
        self.report = report
        self.validate = validate
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if self.validate:
            try:
                n = validate_sweep(config, config_name)
            except ValueError as exc:
                _exit(f"Sweep not started: {exc}")
            print(f"Sweep of {n} points validated; launching.", flush=True)
        study_dir = study_dir_of(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        self.parent_run_id = tracking.start_run(
            tracking_uri_of(config), config.study.name, study_dir / "mlartifacts",
            run_name=f"sweep-{sweep_dir.name}",
            tags={"kind": "sweep", "study": config.study.name, "git_sha": tracking.git_sha(),
                  "sweep_dir": str(sweep_dir.resolve())},
        )  # fmt: skip
        os.environ[PARENT_ENV] = self.parent_run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(PARENT_ENV, None)
        uri = tracking_uri_of(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        records = read_job_records(sweep_dir)
        failed = [r for r in records if r.get("status") != "DONE"]
        table = format_table(records)
        print(
            f"\nStudy {config.study.name!r}: {len(records) - len(failed)}/{len(records)} points done\n{table}"
        )
        (sweep_dir / "summary.txt").write_text(table + "\n")
        if self.parent_run_id:
            tracking.MlflowLogger(uri, self.parent_run_id).log_artifacts([sweep_dir / "summary.txt"])
            tracking.end_run(uri, self.parent_run_id, ok=not failed)
        print(f"\nMLflow UI:  {tracking.ui_command(uri)}   (then open http://127.0.0.1:5000)")
        if self.report:
            self._report(config, uri)
        if failed:
            reasons = "\n".join(
                f"  {r.get('variant', 'job ' + str(r.get('job')))}: {r.get('error')}" for r in failed
            )
            _exit(f"{len(failed)} of {len(records)} sweep points failed:\n{reasons}")

    def _report(self, config: DictConfig, uri: str) -> None:
        """The analysis is a guest here: its failure is printed, never fails the sweep."""
        try:
            from analysis.report import write_report

            path = write_report(
                study_dir_of(config), tracking_uri=uri, study=config.study.name,
                baseline=config.study.baseline, parent_run_id=self.parent_run_id,
                best_lr=config.study.get("best_lr"),
            )  # fmt: skip
            print(f"Report: {path}")
        except Exception:  # noqa: BLE001 - any analysis error must not fail a finished sweep
            print("analysis report failed (the sweep itself is recorded):\n" + traceback.format_exc())
