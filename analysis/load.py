"""Load a study into tidy DataFrames, from MLflow or from the run folders (layout: docs/outputs.md).

`Study.runs`: one row per finished point run (tags as columns, params under their dotted names).
`Study.metrics`: one row per run x metric x step (`run_key, metric, step, value`).
`Study.excluded`: unfinished and failed runs with their status and reason, never mixed into `runs`.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TAGS = (
    "study",
    "variant",
    "model",
    "granularity",
    "top_k",
    "experts",
    "tokens",
    "seed",
    "run_key",
    "git_sha",
)
INT_TAGS = ("granularity", "top_k", "experts", "seed")
FINISHED = "FINISHED"  # MLflow's word; status.json's DONE maps to it


@dataclass(frozen=True)
class Study:
    """A study's runs and metric histories as tidy DataFrames."""

    name: str
    """Study name (MLflow experiment name, study directory name)."""
    source: str
    """Where it was loaded from (tracking URI or study directory)."""
    runs: pd.DataFrame
    """Finished point runs, one row each."""
    metrics: pd.DataFrame
    """Metric histories of those runs: run_key, metric, step, value."""
    excluded: pd.DataFrame
    """Runs left out: run_key, variant, status, reason."""


def _coerce(value):
    """Params and tags arrive as strings: numbers become numbers, the rest stays text."""
    if not isinstance(value, str):
        return value
    try:
        f = float(value)
    except ValueError:
        return value
    return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f


def _finish(name, source, rows, metrics_rows, excluded_rows) -> Study:
    runs = pd.DataFrame(rows)
    for c in TAGS:
        if c not in runs:
            runs[c] = pd.Series(dtype=object)
    for c in INT_TAGS:
        runs[c] = pd.to_numeric(runs[c], errors="coerce").astype("Int64")
    runs["tokens"] = pd.to_numeric(runs["tokens"], errors="coerce")
    metrics = (
        pd.concat(metrics_rows, ignore_index=True)
        if metrics_rows
        else pd.DataFrame(columns=["run_key", "metric", "step", "value"])
    )
    excluded = pd.DataFrame(excluded_rows, columns=["run_key", "variant", "status", "reason"])
    for _, r in excluded.iterrows():
        log.warning("study %s: run %s (%s) excluded: %s %s", name, r.run_key, r.variant, r.status, r.reason)
    return Study(
        name=name, source=source, runs=runs.reset_index(drop=True), metrics=metrics, excluded=excluded
    )


def load_mlflow(tracking_uri: str, study: str, *, metrics=None, workers: int = 8) -> Study:
    """Point runs of experiment `study` and their metric histories (all, or the keys in `metrics`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"study {study!r} not found at tracking URI {tracking_uri!r}; experiments: {names}")
    found, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], filter_string="tags.kind = 'point'", max_results=1000, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    rows, excluded, done = [], [], []
    for run in found:
        tags = run.data.tags
        key = tags.get("run_key", run.info.run_id)
        if run.info.status != FINISHED:
            excluded.append(
                {
                    "run_key": key,
                    "variant": tags.get("variant"),
                    "status": run.info.status,
                    "reason": tags.get("failure_reason", ""),
                }
            )
            continue
        row = {t: _coerce(tags[t]) for t in TAGS if t in tags}
        row.update(run_key=key, run_id=run.info.run_id, status=FINISHED)
        row.update({k: _coerce(v) for k, v in run.data.params.items()})
        rows.append(row)
        done.append(
            (key, run.info.run_id, sorted(k for k in run.data.metrics if metrics is None or k in metrics))
        )

    def history(item):
        key, run_id, metric = item
        h = client.get_metric_history(run_id, metric)
        return pd.DataFrame(
            {"run_key": key, "metric": metric, "step": [m.step for m in h], "value": [m.value for m in h]}
        )

    jobs = [(key, rid, m) for key, rid, ms in done for m in ms]
    # Each history is one query; threads overlap the round trips to a remote server.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        metric_rows = list(pool.map(history, jobs))
    return _finish(study, tracking_uri, rows, metric_rows, excluded)


def read_metrics_jsonl(path: Path, run_key: str) -> pd.DataFrame:
    """Tidy rows from one metrics.jsonl (every line has `step`; other keys are metrics)."""
    records = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:  # a run killed mid-write leaves a torn last line
                log.warning("%s:%d unreadable line skipped (%s)", path, n, e)
                continue
            step = obj.pop("step")
            records.extend(
                (run_key, k, step, float(v))
                for k, v in obj.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
    return pd.DataFrame(records, columns=["run_key", "metric", "step", "value"])


def load_files(study_dir: Path | str) -> Study:
    """The same tables from study_dir/runs/<key>/{summary,status}.json and metrics.jsonl."""
    study_dir = Path(study_dir)
    runs_dir = study_dir / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"study directory {str(study_dir)!r} has no runs/ folder (unknown study?)")
    rows, metric_rows, excluded = [], [], []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        summary = _read_json(d / "summary.json")
        status = _read_json(d / "status.json")
        state = (status.get("status") or summary.get("status") or "UNKNOWN").upper()
        tags = summary.get("tags", {})
        if state != "DONE" or not summary:
            reason = status.get("reason") or ("no summary.json" if not summary else "")
            excluded.append(
                {
                    "run_key": d.name,
                    "variant": tags.get("variant", summary.get("variant")),
                    "status": state,
                    "reason": f"{reason} (step {status.get('step', '?')})",
                }
            )
            continue
        row = {
            t: _coerce(tags[t]) if isinstance(tags.get(t), str) else tags.get(t) for t in TAGS if t in tags
        }
        row.update(run_key=d.name, run_id=summary.get("mlflow_run_id"), status=FINISHED)
        row.update({k: _coerce(v) for k, v in summary.get("params", {}).items()})
        row.setdefault("variant", summary.get("variant"))
        rows.append(row)
        if (d / "metrics.jsonl").exists():
            metric_rows.append(read_metrics_jsonl(d / "metrics.jsonl", d.name))
    return _finish(study_dir.name, str(study_dir), rows, metric_rows, excluded)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def load_study(
    study_dir: Path | str | None = None,
    *,
    tracking_uri: str | None = None,
    study: str | None = None,
    metrics=None,
) -> Study:
    """MLflow when tracking_uri is given (study defaults to the directory name), else the run folders."""
    if tracking_uri:
        name = study or (Path(study_dir).name if study_dir else None)
        if not name:
            raise ValueError("loading from a tracking URI needs study=<name> (or a study directory)")
        return load_mlflow(tracking_uri, name, metrics=metrics)
    if study_dir is None:
        raise ValueError("give a study directory or a tracking URI")
    return load_files(study_dir)


def load_scaling_csv(path: Path | str) -> pd.DataFrame:
    """A CSV with columns params, tokens, loss (and optionally granularity), validated."""
    df = pd.read_csv(path)
    missing = [c for c in ("params", "tokens", "loss") if c not in df]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; need params,tokens,loss[,granularity]")
    return df


def load_chinchilla_svg(path: Path | str, *, drop_highest_loss: int = 5) -> pd.DataFrame:
    """Epoch AI's extraction of Hoffmann et al. Fig. 4 as params/tokens/loss; tokens = FLOP / (6 N).

    Epoch's replication drops the five highest-loss points (drop_highest_loss=5).
    """
    raw = pd.read_csv(path)
    df = pd.DataFrame(
        {
            "params": raw["Model Size"].astype(float),
            "tokens": raw["Training FLOP"].astype(float) / (6.0 * raw["Model Size"].astype(float)),
            "loss": raw["loss"].astype(float),
        }
    )
    if drop_highest_loss:
        df = df.drop(index=df["loss"].nlargest(drop_highest_loss).index)
    return df.reset_index(drop=True).astype({"params": np.float64})
