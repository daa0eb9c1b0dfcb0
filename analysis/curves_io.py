"""The raw curves a report is computed from, as two CSV files beside it, and a `Study` rebuilt from them.

    curves.csv  one row per run x logged step: who (RUN_COLUMNS), `step`, then one column per metric key
                (CORE_METRICS always, empty where a run did not log it; then the router stats the report
                plots). A metric a step did not log is empty: train and eval steps are separate rows.
    runs.csv    one row per run: every column of `Study.runs` (tags, params, accounting `acct.*`, data and
                machine facts); excluded runs too, with their `status` and `reason`.

`pandas.read_csv("curves.csv")` plots at once (`df.dropna(subset=["val/loss"])`); `load_curves(folder)`
returns the `Study` the report was computed from, so `python -m analysis.report --from-curves FOLDER`
recomputes every table and figure without MLflow or run folders (docs/outputs.md).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.load import FINISHED, TAGS, Study, _coerce, _finish

CURVES_FILE = "curves.csv"
RUNS_FILE = "runs.csv"
RUN_COLUMNS = ("run_key", "variant", "model", "budget", "granularity", "optim.lr", "seed")
"""Who each curves.csv row belongs to (from runs.csv; `budget` is the run's `tokens` tag)."""
CORE_METRICS = ("tokens", "flops", "time/train_s", "train/loss", "val/loss")
"""Metric columns every curves.csv has: tokens seen, FLOPs spent, training-only wall seconds, losses."""
TEXT = ("run_key", "variant", "model", "study", "git_sha")
"""Columns kept as text even where they look like numbers (a run key of ten digits)."""
EXACT = 2**53  # integers up to here survive float64, so integral metric columns are written as integers


def curves_table(study: Study, metrics=None) -> pd.DataFrame:
    """curves.csv's rows: `study.metrics` (the keys in `metrics`, or all) wide, one row per run x step."""
    m = study.metrics
    if metrics is not None:
        m = m[m["metric"].isin(set(metrics))]
    clash = sorted(set(m["metric"]) & {*RUN_COLUMNS, "step"})
    if clash:
        raise ValueError(f"metric key(s) {clash} collide with curves.csv's identity columns")
    wide = (
        m.drop_duplicates(["run_key", "metric", "step"], keep="last")
        .pivot(index=["run_key", "step"], columns="metric", values="value")
        .reset_index()
    )
    extra = sorted(set(wide.columns) - {"run_key", "step", *CORE_METRICS})
    for c in CORE_METRICS:
        if c not in wide:
            wide[c] = float("nan")
    who = study.runs.rename(columns={"tokens": "budget"})
    who = who.reindex(columns=list(RUN_COLUMNS))
    out = who.merge(wide, on="run_key", how="inner")[[*RUN_COLUMNS, "step", *CORE_METRICS, *extra]]
    out["step"] = out["step"].astype("int64")
    for c in (*CORE_METRICS, *extra):
        v = out[c].dropna()
        if len(v) and (v % 1 == 0).all() and v.abs().max() < EXACT:
            out[c] = out[c].astype("Int64")  # 163840, not 163840.0
    order = ["model", "budget", "variant", "optim.lr", "seed", "run_key", "step"]
    return out.sort_values(order, kind="stable", na_position="first").reset_index(drop=True)


def runs_table(study: Study) -> pd.DataFrame:
    """runs.csv's rows: finished runs (`study.runs`) then excluded ones, identity columns first."""
    runs = study.runs.copy()
    for c in runs.columns:  # stay integers beside the excluded rows' empty cells (80, not 80.0)
        if pd.api.types.is_integer_dtype(runs[c]):
            runs[c] = runs[c].astype("Int64")
    order = [c for c in ("model", "tokens", "variant", "optim.lr", "seed", "run_key") if c in runs]
    runs = runs.sort_values(order, kind="stable", na_position="first")
    table = pd.concat([runs, study.excluded], ignore_index=True) if len(study.excluded) else runs
    first = [c for c in (*TAGS, "status", "reason") if c in table]
    return table[first + sorted(set(table.columns) - set(first))]


def write_curves(study: Study, folder: Path | str, metrics=None) -> tuple[Path, Path]:
    """Write folder/curves.csv and folder/runs.csv (see module doc); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    curves, runs = folder / CURVES_FILE, folder / RUNS_FILE
    curves_table(study, metrics).to_csv(curves, index=False)
    runs_table(study).to_csv(runs, index=False)
    return curves, runs


def _read(path: Path, **kw) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a report folder holds {CURVES_FILE} and {RUNS_FILE})")
    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None


def _require(path: Path, df: pd.DataFrame, cols) -> None:
    missing = [c for c in cols if c not in df]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; have {list(df.columns)[:12]}")


def _lines(mask) -> str:
    return ", ".join(str(i + 2) for i in mask[mask].index[:5])  # file line: the header is line 1


def read_runs(path: Path) -> tuple[list[dict], list[dict]]:
    """(finished run rows, excluded rows) of a runs.csv, each cell typed as the loaders type params."""
    df = _read(path, dtype=str, keep_default_na=False, na_values=[""])
    _require(path, df, ("run_key", "status", "variant", "model", "tokens"))
    if df["run_key"].isna().any() or df["run_key"].duplicated().any():
        bad = df["run_key"].isna() | df["run_key"].duplicated()
        raise ValueError(f"{path}: run_key empty or repeated on line(s) {_lines(bad)}")
    finished, excluded = [], []
    for rec in df.to_dict("records"):
        # every column of the file, as the loaders type params (an empty cell: not logged for that run)
        row = {k: (v if k in TEXT else _coerce(v)) if isinstance(v, str) else None for k, v in rec.items()}
        if row["status"] == FINISHED:
            row.pop("reason", None)
            finished.append(row)
        else:
            excluded.append(
                {
                    **{k: row.get(k) for k in ("run_key", "variant", "status")},
                    "reason": row.get("reason") or "",
                }
            )
    return finished, excluded


def _numbers(path: Path, df: pd.DataFrame, col: str, want: str = "a number") -> pd.Series:
    """A text column as float64 (empty -> NaN); Python's float() reads back exactly what to_csv wrote."""

    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    v = df[col].map(number).astype("float64")
    bad = v.isna() & df[col].notna()
    if want == "an integer":
        bad |= v.isna() | (v % 1 != 0)
    if bad.any():
        raise ValueError(f"{path}: column {col!r} is not {want} on line(s) {_lines(bad)}")
    return v


def read_metrics(path: Path, known_keys) -> pd.DataFrame:
    """Study.metrics rows (run_key, metric, step, value) from a curves.csv, checked."""
    df = _read(path, dtype=str, keep_default_na=False, na_values=[""])
    _require(path, df, ("run_key", "step", "val/loss"))
    step = _numbers(path, df, "step", "an integer").astype("int64")
    unknown = sorted(set(df["run_key"].dropna()) - set(known_keys))
    if df["run_key"].isna().any() or unknown:
        raise ValueError(
            f"{path}: run_key(s) {unknown[:5] or ['(empty)']} are not finished runs in {RUNS_FILE}"
        )
    metric_cols = [c for c in df.columns if c not in (*RUN_COLUMNS, "step")]
    values = pd.DataFrame({c: _numbers(path, df, c) for c in metric_cols}, index=df.index)
    long = values.assign(run_key=df["run_key"], step=step).melt(
        id_vars=["run_key", "step"], value_vars=metric_cols, var_name="metric", value_name="value"
    )
    return long.dropna(subset=["value"])[["run_key", "metric", "step", "value"]].reset_index(drop=True)


def load_curves(folder: Path | str) -> Study:
    """The Study written by `write_curves` into folder (a report folder), for the report to recompute.

    Its metrics are those curves.csv holds; the name is the runs' `study` tag (else the folder's parent);
    a missing or malformed file is a ValueError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"{folder}: no such directory (want a report folder with {CURVES_FILE}, {RUNS_FILE})"
        )
    finished, excluded = read_runs(folder / RUNS_FILE)
    metrics = read_metrics(folder / CURVES_FILE, [r["run_key"] for r in finished])
    names = sorted({str(r["study"]) for r in finished if isinstance(r.get("study"), str)})
    name = names[0] if len(names) == 1 else folder.resolve().parent.name
    return _finish(name, str(folder), finished, [metrics], excluded)
