"""The finding of each comparison as one sentence, then the caveats its data carries.

    G=8 reaches G=1's final val loss (smoothed, trailing log-linear fit over 5 evals) in 33.4% fewer
    steps (90% interval [31.2%, 35.0%], 3 seeds; not extrapolated) at model=tiny, 163840 tokens
    (moe-E8-k2-G8 vs moe-E8-k2-G1). Caveats: ...

`finding_sentences` is pure (savings rows, runs, checks, LR tuning in; strings out); `write_report`
opens report.md with them and writes them to report/findings.txt, which `read_findings` returns so the
sweep can print them last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.checks import EPOCHS, EVAL_TOKENS, FINGERPRINT, ROUTED_SCALE, ROUTER, Check
from analysis.derive import LR, Smoothing, smoothed_label
from analysis.tuning import LrTuning, fmt_lr, fmt_tokens

FINDINGS_FILE = "findings.txt"


def finding_sentences(
    savings: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    checks: Sequence[Check] = (),
    tuning: LrTuning | None = None,
    at_best: bool = False,
    ci: float = 0.9,
    smoothing: Smoothing | None = None,
) -> list[str]:
    """One string per row of `savings.step_savings` (same order): the finding, then "Caveats: ...".

    runs: the compared runs (granularity tags name the arms "G=<g>" where that is unambiguous);
    checks: `checks.comparability_checks` of the study; tuning/at_best: the LR grid and whether each
    arm is compared at its best LR; ci: the interval mass `step_savings` used."""
    smoothing = smoothing or Smoothing()
    out = []
    for _, r in savings.iterrows():
        group = runs[(runs["model"] == r["model"]) & (runs["tokens"] == r["tokens"])]
        name = _labels(group)
        v, b = name[r["variant"]], name[r["baseline"]]
        where = f"at model={r['model']}, {fmt_tokens(r['tokens'])} tokens ({r['variant']} vs {r['baseline']})"
        target = f"{b}'s {smoothed_label(smoothing)}"
        n, nb = int(r["n_seeds"]), int(r["n_seeds_baseline"])
        seeds = f"{n} seed{'s' * (n != 1)}" if n == nb else f"{n} and {nb} seeds"
        x = float(r["savings_steps"])
        if math.isnan(x):
            text = f"{v} vs {b}: step savings not measured ({r['fit_error']}) {where}."
        elif math.isinf(x):
            text = f"{v} does not reach {target}: its fitted curve levels off above it ({seeds}) {where}."
        else:
            lo, hi = float(r["ci_lo"]), float(r["ci_hi"])
            more = x < 0
            if more:
                x, lo, hi = -x, -hi, -lo
            interval = (
                f"{ci:.0%} interval [{_pct(lo)}, {_pct(hi)}], {seeds}"
                if np.isfinite(lo) or np.isfinite(hi)
                else f"no interval, {seeds}"
            )
            how = "extrapolated by its fitted curve" if r["extrapolated"] else "not extrapolated"
            text = (
                f"{v} reaches {target} in {_pct(x)} {'more' if more else 'fewer'} steps "
                f"({interval}; {how}) {where}."
            )
        notes = _caveats(r, name, checks, tuning, at_best)
        out.append(text + (f" Caveats: {'; '.join(notes)}." if notes else " Caveats: none found."))
    return out


def read_findings(report: Path | str) -> list[str]:
    """The finding sentences `write_report` wrote beside `report` (its report.md path, or report/)."""
    report = Path(report)
    path = (report if report.is_dir() else report.parent) / FINDINGS_FILE
    return [line for line in path.read_text().splitlines() if line.strip()]


def _pct(v: float) -> str:
    return f"{v:.1%}" if np.isfinite(v) else ("inf" if v > 0 else "-inf")


def _labels(group: pd.DataFrame) -> dict[str, str]:
    """Variant -> "G=<g>" where no other variant of the group has that G, else the variant's name."""
    g = group.drop_duplicates("variant").set_index("variant")["granularity"]
    counts = g.value_counts(dropna=True)
    return {v: f"G={int(x)}" if pd.notna(x) and counts[x] == 1 else str(v) for v, x in g.items()}


def _caveats(r, name, checks, tuning, at_best) -> list[str]:
    arms = (r["variant"], r["baseline"])
    notes = []
    if min(int(r["n_seeds"]), int(r["n_seeds_baseline"])) < 2:
        notes.append("one seed in an arm: no interval, and a seed alone moves the loss")
    unknown = [c.params[0] for c in checks if c.status == "unknown"]
    if unknown:
        notes.append(f"not checked, not logged: {', '.join(unknown)}")
    by_param = {c.params[0]: c for c in checks}  # the first param a check reads names it
    for param, say in CHECK_CAVEATS.items():
        c = by_param.get(param)
        if c is None or c.offenders.empty:
            continue
        off = c.offenders
        off = off[(off["model"] == r["model"]) & (off["tokens"] == r["tokens"]) & off["variant"].isin(arms)]
        if not off.empty:
            notes.append(say(off, name))
    if tuning is not None:
        best = tuning.best[(tuning.best["model"] == r["model"]) & (tuning.best["tokens"] == r["tokens"])]
        best = best[best["variant"].isin(arms)].set_index("variant")
        if not at_best:
            lrs = ", ".join(sorted({fmt_lr(v) for v in best["lr"]}))
            notes.append(f"arms not at their best LR (one {LR} each, untuned: {lrs})")
        else:
            notes += [f"{name[v]}'s LR: {best.loc[v, 'note']}" for v in arms if v in best.index
                      and best.loc[v, "note"]]  # fmt: skip
    return notes


CHECK_CAVEATS = {
    EPOCHS: lambda off, name: (
        f"repeated data in {_arms(off, name)} ({EPOCHS} up to {pd.to_numeric(off[EPOCHS]).max():g})"
    ),
    ROUTER: lambda off, name: f"expert choice over the whole batch in {_arms(off, name)} (not causal)",
    ROUTED_SCALE: lambda off, name: "the arms mix routed-output scale conventions",
    FINGERPRINT: lambda off, name: "the arms trained on different data",
    EVAL_TOKENS: lambda off, name: "the arms' val losses were measured on different tokens",
}
"""Caveat per comparability check (keyed by the first param it reads) when it flags a run of the arms."""


def _arms(offenders: pd.DataFrame, name: dict[str, str]) -> str:
    return " and ".join(name[v] for v in sorted(offenders["variant"].unique(), key=str))
