"""Forecasts: predict held-out (N, D, G) points with a law fitted on the small models, before they train.

A study fits L(N, D, G) on its finished small runs and writes report/forecast.json once, before the held-out
(largest) runs start; a later report compares each prediction and its bootstrap interval with the loss
the run reached. The file is never overwritten, so the prediction on record is the one made blind.

Here: making the forecast (`make_forecast` -> `Forecast`) and its write-once file. Comparing it with the
finished runs: analysis/forecast_compare.py; its figure: analysis.plots.plot_forecast.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.laws import GRIDS, LAWS, fit_chinchilla, fit_finegrained

FORECAST_FILE = "forecast.json"
"""Its name in <study dir>/report/."""
FORECAST_LAWS = {"finegrained": fit_finegrained, "chinchilla": fit_chinchilla}
TARGET_COLUMNS = ("run_key", "model", "params", "tokens", "granularity", "seed")
EDGE_TOL = 1e-3
"""An exponent this close to 0 or to the start grid's top is flagged as at its bound."""


def forecast_path(study_dir: Path | str) -> Path:
    """Where a study's forecast lives: <study dir>/report/forecast.json."""
    return Path(study_dir) / "report" / FORECAST_FILE


def _positive(name: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}={v} must be finite and > 0")


@dataclass(frozen=True)
class ForecastRow:
    """One held-out point and its predicted final loss with a bootstrap interval."""

    run_key: str
    """The held-out run's key (runs/<run_key>/)."""
    model: str
    """Model size name (the `model` tag)."""
    params: float
    """Total non-embedding parameters N."""
    tokens: float
    """Training tokens D."""
    granularity: float
    """Expert granularity G."""
    seed: int
    """The run's seed."""
    predicted: float
    """The law's predicted final loss."""
    lo: float
    """Lower end of the interval."""
    hi: float
    """Upper end of the interval."""

    def __post_init__(self):
        if not isinstance(self.run_key, str) or not self.run_key:
            raise ValueError(f"forecast row run_key={self.run_key!r} must be a non-empty string")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"forecast row {self.run_key}: seed={self.seed!r} must be an int")
        for name in ("params", "tokens", "granularity", "predicted", "lo", "hi"):
            _positive(f"forecast row {self.run_key}: {name}", getattr(self, name))
        if not self.lo <= self.predicted <= self.hi:
            raise ValueError(
                f"forecast row {self.run_key}: need lo <= predicted <= hi, got {self.lo}, {self.predicted}, "
                f"{self.hi}"
            )


@dataclass(frozen=True)
class Forecast:
    """A law fitted on the finished small runs and its predictions for the held-out points."""

    law: str
    """"finegrained" or "chinchilla" (analysis.laws)."""
    coefficients: dict[str, float]
    """Fitted coefficients by name (E, A, alpha, ... or c, g, gamma, ...)."""
    intervals: dict[str, tuple[float, float]]
    """Bootstrap percentile interval per coefficient, central mass `ci`."""
    ci: float
    """Central mass of every interval here (0.9: the 5th to 95th percentile)."""
    n_bootstrap: int
    """Bootstrap replicates that converged (behind the intervals)."""
    rmse_log: float
    """Root mean squared log residual of the fit on its points."""
    fit_run_keys: tuple[str, ...]
    """The runs the law was fitted on."""
    flags: tuple[str, ...]
    """Warnings about the fit (an exponent at its bound, an unidentified exponent)."""
    rows: tuple[ForecastRow, ...]
    """One per held-out point."""
    written_at: str
    """When the forecast was made, UTC ISO 8601."""

    def __post_init__(self):
        if self.law not in FORECAST_LAWS:
            raise ValueError(f"forecast law={self.law!r} must be one of {sorted(FORECAST_LAWS)}")
        if not 0.0 < self.ci < 1.0:
            raise ValueError(f"forecast ci={self.ci} must be in (0, 1)")
        if self.n_bootstrap < 1:
            raise ValueError(f"forecast n_bootstrap={self.n_bootstrap} must be >= 1")
        if not (math.isfinite(self.rmse_log) and self.rmse_log >= 0):
            raise ValueError(f"forecast rmse_log={self.rmse_log} must be finite and >= 0")
        bad = {k: v for k, v in self.coefficients.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"forecast coefficients {bad} must be finite")
        for k, (lo, hi) in self.intervals.items():
            if k not in self.coefficients or not lo <= hi:
                raise ValueError(f"forecast intervals[{k!r}]=({lo}, {hi}): needs coefficient {k!r}, lo <= hi")
        if not self.rows:
            raise ValueError("forecast has no rows: nothing was forecast")
        keys = pd.Series([r.run_key for r in self.rows])
        if keys.duplicated().any():
            raise ValueError(f"forecast rows repeat run keys: {repeated_keys(keys)}")
        if datetime.fromisoformat(self.written_at).utcoffset() is None:
            raise ValueError(f"forecast written_at={self.written_at!r} must carry its UTC offset")

    def to_json(self) -> dict:
        """JSON-ready dict (lists for tuples); `from_json` inverts it exactly."""
        d = asdict(self)
        d["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        d["fit_run_keys"], d["flags"] = list(self.fit_run_keys), list(self.flags)
        d["rows"] = [asdict(r) for r in self.rows]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Forecast:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
            raise ValueError(f"forecast JSON keys: missing {missing}, unknown {unknown}")
        return cls(
            law=d["law"],
            coefficients={k: float(v) for k, v in d["coefficients"].items()},
            intervals={k: (float(v[0]), float(v[1])) for k, v in d["intervals"].items()},
            ci=float(d["ci"]),
            n_bootstrap=int(d["n_bootstrap"]),
            rmse_log=float(d["rmse_log"]),
            fit_run_keys=tuple(d["fit_run_keys"]),
            flags=tuple(d["flags"]),
            rows=tuple(ForecastRow(**r) for r in d["rows"]),
            written_at=d["written_at"],
        )


def repeated_keys(keys: pd.Series) -> list[str]:
    """The run keys that occur more than once, sorted (for error messages)."""
    return sorted(set(keys[keys.duplicated()]))


def need_columns(df: pd.DataFrame, cols, what: str) -> None:
    """Raise ValueError naming `what` and the missing columns unless df has all of cols."""
    missing = [c for c in cols if c not in df]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; has {sorted(df.columns)}")


def make_forecast(
    fit_data: pd.DataFrame,
    targets: pd.DataFrame,
    *,
    law: str = "finegrained",
    ci: float = 0.9,
    bootstrap: int = 100,
    bootstrap_frac: float = 0.8,
    seed: int = 0,
    **fit_kw,
) -> Forecast:
    """Fit `law` on fit_data (run_key, params, tokens, granularity, loss: one row per finished run) and
    predict each row of targets (run_key, model, params, tokens, granularity, seed) with a `ci` interval.

    The interval is the percentile interval of the prediction over `bootstrap` refits on `bootstrap_frac`
    subsamples (Krajewski et al. 2024 used 80% x 100), widened to the point prediction where that falls
    outside it (flagged), its two sides then scaled by sqrt(f / (1 - f)) (2 at f = 0.8): refits on a
    fraction f drawn without replacement spread by only sqrt((1 - f) / f) of the sampling error (measured:
    unscaled, a nominal 90% interval held the true law in about half of synthetic draws). fit_kw go to analysis.laws.fit_law (starts, keep_starts, delta, workers, ...).
    Raises ValueError when the data cannot support the law, FitError when the fit fails.
    """
    if law not in FORECAST_LAWS:
        raise ValueError(f"law={law!r} must be one of {sorted(FORECAST_LAWS)}")
    if bootstrap < 2:
        raise ValueError(f"bootstrap={bootstrap} must be >= 2: the interval is a percentile over replicates")
    spec = LAWS[law]
    need_columns(fit_data, ("run_key", *spec.covariates, "loss"), "fit_data")
    need_columns(targets, TARGET_COLUMNS, "targets")
    if targets.empty:
        raise ValueError("targets is empty: no held-out point to forecast")
    if targets["run_key"].duplicated().any():
        raise ValueError(f"targets repeat run keys: {repeated_keys(targets['run_key'])}")
    if both := set(targets["run_key"]) & set(fit_data["run_key"]):
        raise ValueError(
            f"held-out run keys are also in fit_data: {sorted(both)}; a forecast must not see them"
        )
    for row in targets.itertuples(index=False):
        for col in ("params", "tokens", "granularity"):
            v = float(getattr(row, col))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"target {row.run_key}: {col}={v} must be finite and > 0")
    covs = list(spec.covariates)
    n_points, n_coefs = len(fit_data[covs].drop_duplicates()), len(spec.params)
    if n_points < n_coefs + 1:
        raise ValueError(
            f"law {law!r} has {n_coefs} coefficients: it needs at least {n_coefs + 1} distinct "
            f"({', '.join(covs)}) points to forecast from, but fit_data has {n_points}"
        )
    for col in covs:
        if (k := fit_data[col].nunique()) < 2:
            raise ValueError(f"law {law!r} needs at least 2 distinct {col} values in fit_data, has {k}")

    fit = FORECAST_LAWS[law](
        fit_data, bootstrap=bootstrap, bootstrap_frac=bootstrap_frac, ci=ci, seed=seed, **fit_kw
    )
    predicted = fit.predict(targets)
    lo, hi = fit.predict_interval(targets, ci)
    flags = _exponent_flags(fit.coefficients, fit.intervals, fit_kw.get("starts", GRIDS[law]), ci)
    n_boot = len(fit.bootstrap_thetas)
    if n_boot < bootstrap:
        flags.append(f"only {n_boot} of {bootstrap} bootstrap replicates converged")
    scale = math.sqrt(bootstrap_frac / (1 - bootstrap_frac)) if bootstrap_frac < 1 else 1.0
    rows = []
    for t, p, a, b in zip(targets.itertuples(index=False), predicted, lo, hi, strict=True):
        if not a <= p <= b:
            flags.append(
                f"{t.run_key}: the prediction {p:.4g} lies outside its bootstrap interval "
                f"[{a:.4g}, {b:.4g}], which is widened to include it"
            )
        rows.append(
            ForecastRow(
                run_key=str(t.run_key),
                model=str(t.model),
                params=float(t.params),
                tokens=float(t.tokens),
                granularity=float(t.granularity),
                seed=int(t.seed),
                predicted=float(p),
                lo=float(p - scale * (p - min(a, p))),
                hi=float(p + scale * (max(b, p) - p)),
            )
        )
    return Forecast(
        law=law,
        coefficients=dict(fit.coefficients),
        intervals=dict(fit.intervals),
        ci=ci,
        n_bootstrap=n_boot,
        rmse_log=fit.rmse_log,
        fit_run_keys=tuple(str(k) for k in fit_data["run_key"]),
        flags=tuple(flags),
        rows=tuple(rows),
        written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _exponent_flags(coefficients, intervals, starts, ci: float) -> list[str]:
    """An exponent at 0 or at the top of the start grid (the fit may have run to a bound the data do not
    pin down), or one whose bootstrap interval is wider than its value (not identified)."""
    flags = []
    for name in ("gamma", "alpha", "beta"):
        if name not in coefficients:
            continue
        v, edge = coefficients[name], float(np.max(starts[name]))
        if v < -EDGE_TOL:
            flags.append(f"{name} = {v:.4g} is negative: that term grows with its covariate in the fit")
        elif v <= EDGE_TOL:
            flags.append(f"{name} = {v:.4g} is at 0: that term does not scale in the fit")
        elif v >= edge - EDGE_TOL:
            flags.append(f"{name} = {v:.4g} is at or beyond the start grid's upper edge {edge:g}")
        if name in intervals:
            lo, hi = intervals[name]
            if hi - lo > abs(v):
                flags.append(
                    f"{name} is not identified: its {ci:.0%} bootstrap interval [{lo:.3g}, {hi:.3g}] "
                    f"is wider than its value {v:.3g}"
                )
    return flags


def write_forecast(path: Path | str, forecast: Forecast) -> bool:
    """Write forecast as JSON at path unless a file is there already; return whether it was written.

    A forecast is made once, before the held-out runs train; a re-run (resume, a second sweep) keeps the
    first. The temp file is hard-linked into place: atomic, and unlike os.replace it never overwrites."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(forecast.to_json(), f, indent=2)
            f.write("\n")
        os.link(tmp, path)
    except FileExistsError:  # another process wrote it between the check and the link
        return False
    finally:
        os.unlink(tmp)
    return True


def read_forecast(path: Path | str) -> Forecast:
    """The forecast written by `write_forecast`; a malformed file raises ValueError naming it."""
    try:
        return Forecast.from_json(json.loads(Path(path).read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a forecast ({e})") from e
