"""The finding of each comparison as one sentence, then the caveats its data carries.

    G=8 reaches G=1's final val loss (smoothed, trailing log-linear fit over 5 evals) in 25.0% fewer
    steps (90% t-interval [9.0%, 37.0%], 5 of 5 seeds favour G=8; not extrapolated), 20.0% fewer FLOPs
    and 14.0% less training time (90% t-interval [...], tokens/s ratio 0.88) at model=tiny, 2M tokens
    (moe-E8-k2-G8 vs moe-E8-k2-G1). Caveats: ...

A variant that does not reach the target in most seeds reads "does not reach ...: not reached in k of n
seeds (why); savings unknown, at most X in those seeds" (analysis/savings.py's summary rule).

`finding_sentences` is pure (savings rows, runs, checks, LR tuning in; strings out); `write_report`
opens report.md with them and writes them to report/findings.txt, which `read_findings` returns so the
sweep can print them last.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.checks import (
    EPOCHS,
    EVAL_TOKENS,
    FINGERPRINT,
    ROUTED_SCALE,
    ROUTER,
    THREADS,
    Check,
    machine_caveat,
)
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
    """One string per row of `savings.savings_tables(...).summary` (same order): the finding, then
    "Caveats: ...".

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
        status = r.get("status", "measured")
        if status == "not measured":
            text = f"{v} vs {b}: savings not measured ({r['note']}) {where}."
        elif status == "not reached":
            text = f"{v} does not reach {target} {where}: {r['note']}; savings unknown{_at_most(r)}."
        else:
            text = _measured(r, v, target, ci) + f" {where}."
        notes = _caveats(r, name, checks, tuning, at_best)
        out.append(text + (f" Caveats: {'; '.join(notes)}." if notes else " Caveats: none found."))
    return out


def _measured(r, v: str, target: str, ci: float) -> str:
    """Steps with their t interval, sign count and extrapolation, then FLOPs and training time."""
    n, pos, k = int(r["n_seeds"]), int(r["n_positive"]), int(r["n_extrapolated"])
    x, more, interval = _amount(r["savings_steps"], r["ci_lo"], r["ci_hi"], ci)
    how = f"extrapolated by the fitted curve in {k} of {_seeds(n)}" if k else "not extrapolated"
    if int(r["n_not_reached"]):
        how += (
            f"; not reached in {int(r['n_not_reached'])} of {_seeds(n)}, counted at its bound{_at_most(r)}: "
            "the savings are upper bounds"
        )
    text = (
        f"{v} reaches {target} in {x} {'more' if more else 'fewer'} steps ({interval or 'no interval'}, "
        f"{pos} of {_seeds(n)} favour{'s' * (n == 1)} {v}; {how})"
    )
    f, more, _ = _amount(r["savings_flops"], np.nan, np.nan, ci)
    text += f", {f} {'more' if more else 'fewer'} FLOPs"
    if not np.isfinite(float(r.get("savings_time", np.nan))):
        return text + " and training time unknown (no time/train_s)"
    t, more, interval = _amount(r["savings_time"], r["savings_time_ci_lo"], r["savings_time_ci_hi"], ci)
    ratio = f"tokens/s ratio {float(r['tokens_per_s_ratio']):.2f}"
    return (
        text
        + f" and {t} {'more' if more else 'less'} training time ({interval + ', ' if interval else ''}{ratio})"
    )


def _amount(x, lo, hi, ci: float) -> tuple[str, bool, str]:
    """(|x| as a percentage, whether x < 0 ("more"), the interval of |x| or ""): a negative saving reads
    as an amount more, its interval flipped with it."""
    x, lo, hi = float(x), float(lo), float(hi)
    more = x < 0
    if more:
        x, lo, hi = -x, -hi, -lo
    interval = f"{ci:.0%} t-interval [{_pct(lo)}, {_pct(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return _pct(x), more, interval


def _at_most(r) -> str:
    """The bound on the savings of the seeds that did not reach the target (<= 0 when budgets match)."""
    bound = float(r.get("savings_bound", np.nan))
    return f", at most {_pct(bound)} in those seeds" if np.isfinite(bound) else ""


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


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
    if int(r["n_seeds"]) < 2:
        notes.append("fewer than 2 seeds both arms ran: no interval, and a seed alone moves the loss")
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
            notes.append(
                f"LR not tuned in this study (one {LR} each: {lrs}; a preset names where it was picked)"
            )
        else:
            notes += [
                f"{name[v]}'s LR: {best.loc[v, 'note']}"
                for v in arms
                if v in best.index and best.loc[v, "note"]
            ]
    return notes


CHECK_CAVEATS = {
    EPOCHS: lambda off, name: (
        f"repeated data in {_arms(off, name)} ({EPOCHS} up to {pd.to_numeric(off[EPOCHS]).max():g})"
    ),
    ROUTER: lambda off, name: f"expert choice over the whole batch in {_arms(off, name)} (not causal)",
    ROUTED_SCALE: lambda off, name: "the arms mix routed-output scale conventions",
    FINGERPRINT: lambda off, name: "the arms trained on different data",
    EVAL_TOKENS: lambda off, name: "the arms' val losses were measured on different tokens",
    THREADS: lambda off, name: machine_caveat(off),
}
"""Caveat per comparability check (keyed by the first param it reads) when it flags a run of the arms."""


def _arms(offenders: pd.DataFrame, name: dict[str, str]) -> str:
    return " and ".join(name[v] for v in sorted(offenders["variant"].unique(), key=str))
