"""Learning-rate grids: compare each variant at its own best learning rate (docs/method.md §6).

At equal weights a fine-grained layer's output, and the change one optimiser step makes to it, is 1/G of
the G=1 layer's, so a single learning rate for all G handicaps G > 1. A study that sweeps `optim.lr`
(`-m granularity=1,8 optim.lr=1e-3,3e-3,1e-2 seed=0,1`) gives every (model, tokens, variant) a grid;
its best LR is the one with the lowest mean final smoothed val loss over seeds. A best LR at either end
of its grid is "not bracketed": a better one may lie outside. Runs at different LRs are never pooled
as if they were seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.derive import LR

GROUP = ["model", "tokens", "variant"]


@dataclass(frozen=True)
class LrTuning:
    """The LR grid of every (model, tokens, variant) and the LR each one is compared at."""

    grid: pd.DataFrame
    """One row per (model, tokens, variant, lr): val_loss (mean final smoothed val loss over seeds),
    val_loss_std, seeds (count), best (True on the chosen LR)."""
    best: pd.DataFrame
    """One row per (model, tokens, variant): lr (the best), val_loss, n_lrs, bracketed, note."""
    best_keys: frozenset[str]
    """run_key of every run at its variant's best LR."""

    @property
    def swept(self) -> bool:
        """True when some variant was run at more than one learning rate."""
        return bool((self.best["n_lrs"] > 1).any())


def fmt_lr(lr) -> str:
    return "not logged" if pd.isna(lr) else format(float(lr), "g")


def fmt_tokens(tokens) -> str:
    t = float(tokens)
    return str(int(t)) if t.is_integer() else str(tokens)


def lr_tuning(per_run: pd.DataFrame) -> LrTuning:
    """Grid and best LR from `derive.run_finals` rows (run_key, model, tokens, variant, seed, lr,
    final_smooth). A run without `optim.lr` counts as one grid point of unknown LR."""
    grid_rows, best_rows, keys = [], [], set()
    for (model, tokens, variant), g in per_run.groupby(GROUP, dropna=False, sort=True):
        agg = (
            g.groupby("lr", dropna=False, sort=True)["final_smooth"]
            .agg(["mean", "std", "count"])
            .reset_index()
        )
        i = int(np.argmin(agg["mean"].to_numpy()))
        lr_best = agg["lr"].iloc[i]
        for j, r in agg.iterrows():
            grid_rows.append(
                {
                    "model": model,
                    "tokens": tokens,
                    "variant": variant,
                    "lr": r["lr"],
                    "val_loss": r["mean"],
                    "val_loss_std": r["std"],
                    "seeds": int(r["count"]),
                    "best": j == i,
                }
            )
        n = len(agg)
        bracketed = 0 < i < n - 1
        if n == 1:
            note = "single LR (untuned)"
        elif bracketed:
            note = ""
        else:
            note = f"not bracketed: best is the {'lowest' if i == 0 else 'highest'} LR of the grid"
        best_rows.append(
            {
                "model": model,
                "tokens": tokens,
                "variant": variant,
                "lr": lr_best,
                "val_loss": agg["mean"].iloc[i],
                "n_lrs": n,
                "bracketed": bracketed,
                "note": note,
            }
        )
        at_best = g["lr"].isna() if pd.isna(lr_best) else g["lr"] == lr_best
        keys.update(g.loc[at_best, "run_key"])
    return LrTuning(grid=pd.DataFrame(grid_rows), best=pd.DataFrame(best_rows), best_keys=frozenset(keys))


def use_best_lr(tuning: LrTuning, best_lr: bool | None) -> bool:
    """Resolve the report's best_lr setting; refuse the two settings that would mislead.

    None: on when some variant has several LRs (a variant with one LR is then used at it, marked
    untuned). True: every variant needs >= 2 LRs. False: every variant needs exactly one LR.
    """
    if best_lr is None:
        return tuning.swept
    grids = {key: list(g["lr"]) for key, g in tuning.grid.groupby(GROUP, dropna=False, sort=True)}
    bad = lr_grid_errors(grids, best_lr)
    if bad:
        raise ValueError("; ".join(bad))
    return best_lr


def lr_grid_errors(grids: Mapping[tuple[Any, Any, Any], Sequence[Any]], best_lr: bool) -> list[str]:
    """The one rule for LR grids, shared by the report and by the sweep's check before any job.

    grids: (model, tokens, variant) -> the learning rates run for it. best_lr=True needs >= 2 of them for
    every variant; best_lr=False needs exactly one (runs at different LRs are not seeds)."""
    bad = []
    for (model, tokens, variant), values in sorted(grids.items(), key=lambda kv: tuple(map(str, kv[0]))):
        where = f"for variant {variant} at model={model} tokens={fmt_tokens(tokens)}"
        lrs = ", ".join(fmt_lr(v) for v in values)
        if best_lr and len(values) == 1:
            bad.append(
                f"{LR} has one value ({lrs}) {where}: a best-LR comparison needs at least 2 learning "
                f"rates (sweep -m {LR}=...)"
            )
        elif not best_lr and len(values) > 1:
            bad.append(
                f"{LR} has {len(values)} values ({lrs}) {where}: runs at different learning rates are not "
                f"seeds; compare each variant at its best LR (best_lr=True, --best-lr) or report one {LR}"
            )
    return bad


def best_lr_runs(runs: pd.DataFrame, tuning: LrTuning) -> pd.DataFrame:
    """The runs at their variant's best LR."""
    return runs[runs["run_key"].isin(tuning.best_keys)].reset_index(drop=True)
