"""Seed-paired differences of final loss: variant - baseline at the same seed.

Between seeds the absolute final loss moves by about 0.1 while the G=8 - G=1 difference at one seed is
more stable, so the paired difference is the honest unit of comparison. Only seeds that both arms ran
are paired; the interval is Student t over the paired differences, and the seed standard deviation and
the differences themselves are listed so that one chaotic seed is visible rather than averaged away.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def t_interval(values, ci: float) -> tuple[float, float]:
    """Student t interval of the mean of `values` (central mass `ci`); NaNs with fewer than 2 values."""
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci} must be in (0, 1)")
    d = np.asarray(values, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf((1 + ci) / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean() - half), float(d.mean() + half)


def paired_differences(
    per_run: pd.DataFrame, baselines: dict[tuple, str], *, ci: float = 0.95, column: str = "final_smooth"
) -> pd.DataFrame:
    """One row per (model, tokens, variant != baseline) from `derive.run_finals` rows.

    Columns: baseline, n_pairs, seeds (paired seeds), unpaired (seeds only one arm has), mean_diff
    (variant - baseline; negative favours the variant), ci_lo, ci_hi (NaN with < 2 pairs), sd_diff
    (seed standard deviation of the differences; NaN with < 2 pairs), diffs (each seed's difference, in
    the order of `seeds`), favour_variant (pairs where the variant's loss is lower).
    column: the per-run loss compared (final_smooth; final_eval, the many-window final evaluation).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci} must be in (0, 1)")
    rows = []
    for (model, tokens), base in sorted(baselines.items(), key=str):
        g = per_run[(per_run["model"] == model) & (per_run["tokens"] == tokens)]
        b = _by_seed(g[g["variant"] == base], column)
        for variant, gv in g.groupby("variant", sort=True):
            if variant == base:
                continue
            v = _by_seed(gv, column)
            common = v.index.intersection(b.index).sort_values()
            d = (v[common] - b[common]).to_numpy(dtype=float)
            lo, hi = t_interval(d, ci)
            rows.append(
                {
                    "model": model,
                    "tokens": tokens,
                    "variant": variant,
                    "baseline": base,
                    "n_pairs": d.size,
                    "seeds": ",".join(str(s) for s in common),
                    "unpaired": ",".join(str(s) for s in v.index.symmetric_difference(b.index).sort_values()),
                    "mean_diff": d.mean() if d.size else np.nan,
                    "ci_lo": lo,
                    "ci_hi": hi,
                    "sd_diff": d.std(ddof=1) if d.size >= 2 else np.nan,
                    "diffs": ",".join(f"{x:+.4f}" for x in d),
                    "favour_variant": int((d < 0).sum()),
                }
            )
    return pd.DataFrame(rows)


def _by_seed(g: pd.DataFrame, column: str) -> pd.Series:
    """`column` per seed (a seed run twice is averaged); runs without a seed or a value are left out."""
    g = g.dropna(subset=["seed", column])
    return g.groupby(g["seed"].astype(int))[column].mean()
