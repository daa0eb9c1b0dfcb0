"""Learning-rate grids: compare each variant at its own best learning rate (docs/method.md §6).

At equal weights a fine-grained layer's output, and the change one optimiser step makes to it, is 1/G of
the G=1 layer's, so a single learning rate for all G handicaps G > 1. A study that sweeps `optim.lr`
(`-m granularity=1,8 optim.lr=3e-3,6e-3,1.2e-2 seed=0,1`) gives every (model, tokens, variant) a grid;
its best LR is the one with the lowest mean final smoothed val loss over seeds. Only a best LR inside
its grid is picked: at either end a better one may lie outside, so the pick is refused ("no pick: ...;
extend the grid upward") and the variant is compared at that LR marked untuned. Runs at different LRs
are never pooled as if they were seeds. `lr_pick` is what report/lr_pick.json records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.derive import LR

GROUP = ["model", "tokens", "variant"]
LR_PICK_FILE = "lr_pick.json"
PICK_RULE = (
    "lowest mean final smoothed val loss over seeds; no pick where that LR is at the edge of its grid "
    "or the grid has one LR"
)


@dataclass(frozen=True)
class LrTuning:
    """The LR grid of every (model, tokens, variant) and the LR each one is compared at."""

    grid: pd.DataFrame
    """One row per (model, tokens, variant, lr): val_loss (mean final smoothed val loss over seeds),
    val_loss_std, seeds (count), best (True on the lowest mean)."""
    best: pd.DataFrame
    """One row per (model, tokens, variant): lr (the grid's best), val_loss, n_lrs, bracketed, picked
    (the best LR is inside the grid, so it is the tuned LR), note ("" when picked, else why not)."""
    best_keys: frozenset[str]
    """run_key of every run at its variant's best LR (picked or not: a refused variant is compared at
    the grid's best, marked untuned by its note)."""
    finals: pd.DataFrame
    """The per-run rows the grid was built from (run_key, model, tokens, variant, seed, lr, final_smooth)."""

    @property
    def swept(self) -> bool:
        """True when some variant was run at more than one learning rate."""
        return bool((self.best["n_lrs"] > 1).any())


def fmt_lr(lr) -> str:
    return "not logged" if pd.isna(lr) else format(float(lr), "g")


def fmt_tokens(tokens) -> str:
    t = float(tokens)
    return str(int(t)) if t.is_integer() else str(tokens)


def edge_note(lr, highest: bool) -> str:
    """Why a best LR at the edge of its grid is not picked, and what to run instead."""
    return (
        f"no pick: best LR {fmt_lr(lr)} is the {'highest' if highest else 'lowest'} of the grid; "
        f"extend the grid {'upward' if highest else 'downward'}"
    )


def _at(df: pd.DataFrame, lr) -> pd.Series:
    return df["lr"].isna() if pd.isna(lr) else df["lr"] == lr


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
        note = "single LR (untuned)" if n == 1 else "" if bracketed else edge_note(lr_best, highest=i > 0)
        best_rows.append(
            {
                "model": model,
                "tokens": tokens,
                "variant": variant,
                "lr": lr_best,
                "val_loss": agg["mean"].iloc[i],
                "n_lrs": n,
                "bracketed": bracketed,
                "picked": bracketed,
                "note": note,
            }
        )
        keys.update(g.loc[_at(g, lr_best), "run_key"])
    return LrTuning(
        grid=pd.DataFrame(grid_rows),
        best=pd.DataFrame(best_rows),
        best_keys=frozenset(keys),
        finals=per_run.reset_index(drop=True),
    )


def seeds_by_lr(finals: pd.DataFrame) -> dict[tuple[Any, Any, Any], dict[Any, list[Any]]]:
    """(model, tokens, variant) -> {lr: the seeds run at it}, the shape `lr_grid_errors` checks."""
    grids: dict[tuple[Any, Any, Any], dict[Any, list[Any]]] = {}
    for (model, tokens, variant, lr), g in finals.groupby([*GROUP, "lr"], dropna=False, sort=True):
        grids.setdefault((model, tokens, variant), {})[lr] = sorted(set(g["seed"]))
    return grids


def use_best_lr(tuning: LrTuning, best_lr: bool | None) -> bool:
    """Resolve the report's best_lr setting; refuse the settings that would mislead.

    None: on when some variant has several LRs (a variant with one LR is then used at it, marked
    untuned). True: every variant needs >= 2 LRs, each run at >= 2 seeds. False: every variant needs
    exactly one LR.
    """
    if best_lr is None:
        return tuning.swept
    bad = lr_grid_errors(seeds_by_lr(tuning.finals), best_lr)
    if bad:
        raise ValueError("; ".join(bad))
    return best_lr


def lr_grid_errors(
    grids: Mapping[tuple[Any, Any, Any], Mapping[Any, Sequence[Any]]], best_lr: bool
) -> list[str]:
    """The one rule for LR grids, shared by the report and by the sweep's check before any job.

    grids: (model, tokens, variant) -> {learning rate: the seeds run at it}. best_lr=True needs >= 2
    learning rates for every variant and >= 2 seeds at each (the pick is a mean over seeds);
    best_lr=False needs exactly one LR (runs at different LRs are not seeds)."""
    bad = []
    for (model, tokens, variant), by_lr in sorted(grids.items(), key=lambda kv: tuple(map(str, kv[0]))):
        where = f"for variant {variant} at model={model} tokens={fmt_tokens(tokens)}"
        lrs = ", ".join(fmt_lr(v) for v in by_lr)
        if best_lr and len(by_lr) == 1:
            bad.append(
                f"{LR} has one value ({lrs}) {where}: a best-LR comparison needs at least 2 learning "
                f"rates (sweep -m {LR}=...)"
            )
        elif not best_lr and len(by_lr) > 1:
            bad.append(
                f"{LR} has {len(by_lr)} values ({lrs}) {where}: runs at different learning rates are not "
                f"seeds; compare each variant at its best LR (best_lr=True, --best-lr) or report one {LR}"
            )
        lone = {lr: set(seeds) for lr, seeds in by_lr.items() if len(set(seeds)) < 2}
        if best_lr and lone:
            seeds = sorted({format(s) for s in set().union(*lone.values())})
            at = ", ".join(fmt_lr(v) for v in lone)
            bad.append(
                f"seed has one value ({', '.join(seeds)}) at {LR}={at} {where}: the best LR is picked by the "
                "mean over seeds, so each learning rate needs at least 2 seeds (sweep -m seed=0,1)"
            )
    return bad


def best_lr_runs(runs: pd.DataFrame, tuning: LrTuning) -> pd.DataFrame:
    """The runs at their variant's best LR."""
    return runs[runs["run_key"].isin(tuning.best_keys)].reset_index(drop=True)


def _plain(v) -> Any:
    """A JSON value: None for NaN, int for whole numbers of a numeric column, else float or text."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return str(v)


def lr_pick(tuning: LrTuning) -> dict[str, Any]:
    """The LR pick of every (model, tokens, variant): lr (null where refused), refused (the reason, or
    null), best_on_grid, grid, seeds, n_seeds (the fewest at any LR), and per LR the mean loss, its seed
    count and each seed's loss."""
    finals = dict(list(tuning.finals.groupby(GROUP, dropna=False, sort=True)))
    best = {tuple(r[GROUP]): r for _, r in tuning.best.iterrows()}
    picks = []
    for key, grid in tuning.grid.groupby(GROUP, dropna=False, sort=True):
        b, runs = best[key], finals[key]
        losses = []
        for _, r in grid.iterrows():
            at = runs[_at(runs, r["lr"])].sort_values("seed")
            per_seed = {
                str(_plain(s)): _plain(v) for s, v in zip(at["seed"], at["final_smooth"], strict=True)
            }
            losses.append(
                {
                    "lr": _plain(r["lr"]),
                    "mean": _plain(r["val_loss"]),
                    "n_seeds": int(r["seeds"]),
                    "per_seed": per_seed,
                }
            )
        picks.append(
            {
                **{k: _plain(b[k]) for k in GROUP},
                "lr": _plain(b["lr"]) if b["picked"] else None,
                "refused": None if b["picked"] else b["note"],
                "best_on_grid": _plain(b["lr"]),
                "grid": [_plain(v) for v in grid["lr"]],
                "seeds": [_plain(s) for s in sorted(set(runs["seed"]))],
                "n_seeds": int(grid["seeds"].min()),
                "losses": losses,
            }
        )
    return {"rule": PICK_RULE, "loss": "final smoothed val loss (analysis.derive)", "picks": picks}


def write_lr_pick(tuning: LrTuning, out_dir: Path) -> Path:
    """report/lr_pick.json: `lr_pick(tuning)`."""
    path = Path(out_dir) / LR_PICK_FILE
    path.write_text(json.dumps(lr_pick(tuning), indent=2) + "\n")
    return path
