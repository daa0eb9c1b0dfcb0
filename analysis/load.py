"""Load a study into tidy DataFrames, from MLflow or from the run folders (layout: docs/outputs.md).

`Study.runs`: one row per finished point run (tags as columns, params under their dotted names).
`Study.metrics`: one row per run x metric x step (`run_key, metric, step, value`).
`Study.excluded`: unfinished and failed runs with their status and reason, never mixed into `runs`.
"""

from __future__ import annotations

import http.client
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from records import runfiles

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
    notes: tuple[str, ...] = ()
    """What the loader had to work around (a torn last line of a metrics.jsonl), for the report."""


def _coerce(value):
    """Params and tags arrive as strings: numbers become numbers, the rest stays text."""
    if not isinstance(value, str):
        return value
    try:
        f = float(value)
    except ValueError:
        return value
    return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f


def _finish(name, source, rows, metrics_rows, excluded_rows, notes=()) -> Study:
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
    for note in notes:
        log.warning("study %s: %s", name, note)
    return Study(
        name=name,
        source=source,
        runs=runs.reset_index(drop=True),
        metrics=metrics,
        excluded=excluded,
        notes=tuple(notes),
    )


def check_tracking_server(tracking_uri: str, timeout: float = 3.0) -> None:
    """An http(s) tracking URI must answer GET <uri>/health within `timeout` seconds (ValueError if not).

    MLflow's own client retries a dead server for minutes before it fails; any HTTP answer (even an
    error status from a proxy) shows a server is there. Other URIs (sqlite, file) are not checked."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, http.client.HTTPException, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise ValueError(f"no MLflow tracking server answers at {url} within {timeout:g} s ({why})") from None


def load_mlflow(tracking_uri: str, study: str, *, metrics=None, workers: int = 8) -> Study:
    """Point runs of experiment `study` and their metric histories (all, or the keys in `metrics`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_tracking_server(tracking_uri)
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(study)
    except MlflowException as e:
        raise ValueError(f"tracking URI {tracking_uri!r}: {e.message}") from None
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
    """Tidy rows from one metrics.jsonl, read by records.runfiles (its rule: a torn last line is dropped,
    a corrupt line elsewhere is a RunFileError naming file:line; a repeated metric and step keeps the last)."""
    values = runfiles.metric_values(runfiles.read_events(path))
    return pd.DataFrame(
        [(run_key, metric, step, value) for (metric, step), value in values.items()],
        columns=["run_key", "metric", "step", "value"],
    )


def load_files(study_dir: Path | str) -> Study:
    """The same tables from study_dir/runs/<key>/{summary,status}.json and metrics.jsonl (records.runfiles).

    A metrics.jsonl with a torn last line (a run killed mid-write) loads without it and is named in
    `Study.notes`; an unreadable run file is a RunFileError (a ValueError) naming the file."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ValueError(f"study directory {str(study_dir)!r} does not exist (no runs/ folder to read)")
    if not runfiles.runs_dir(study_dir).is_dir():
        raise ValueError(f"study directory {str(study_dir)!r} has no runs/ folder (unknown study?)")
    rows, metric_rows, excluded, notes = [], [], [], []
    for d in runfiles.run_dirs(study_dir):
        summary = runfiles.read_summary(d) or {}
        status = runfiles.read_status(d) or {}
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
        path = d / runfiles.METRICS
        metric_rows.append(read_metrics_jsonl(path, d.name))
        if runfiles.is_torn(path):
            notes.append(f"{path}: torn last line dropped (the run was killed while writing it)")
    return _finish(study_dir.name, str(study_dir), rows, metric_rows, excluded, notes)


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
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in ("params", "tokens", "loss") if c not in df]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; need params,tokens,loss[,granularity]")
    for c in ("params", "tokens", "loss", "granularity"):
        if c in df:
            bad = pd.to_numeric(df[c], errors="coerce").isna()
            if bad.any():
                rows = ", ".join(str(i + 2) for i in df.index[bad][:5])  # file line: header is line 1
                raise ValueError(f"{path}: column {c!r} is not a number on line(s) {rows}")
            df[c] = pd.to_numeric(df[c])
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
