"""Comparability checks: params that make a comparison unfair, made visible (docs/method.md §6).

Each check reads params the training side logs; a param an older store lacks makes the check
"unknown" for those runs, never an error.
  data.epochs                 > 1 means the run saw some tokens more than once.
  moe.router, moe.expert_choice_scope
                              expert choice with scope "batch" lets a token's selection depend on later
                              tokens of its own sequence (not causal); "position" is causal.
  moe.routed_scale_used, moe.routed_scale
                              effective routed-output scale, and the one set (None = auto: G, or 1 for
                              unnormalised sigmoid scores). Within one (model, tokens) comparison every arm
                              must follow one convention: auto for all, or the same fixed value. Without
                              moe.routed_scale (older stores) the convention is read off the value: = G, or
                              a constant. A G=1 (or dense) arm at scale 1 fits every convention.
  data.fingerprint            the data a run trained on; arms of one comparison must share it.
  data.val_windows, train.eval_tokens
                              which validation tokens a run's val loss is measured on: where the windows
                              sit in the val split (runs without data.val_windows took the first ones)
                              and how many; arms of one comparison must share both.
  machine.threads, machine.cpu_capability, machine.torch, machine.device
                              where a run trained (studies.job.record.machine_facts): thread count, CPU
                              capability and torch version change the loss of one run key beyond seed
                              noise; arms of one comparison must share all four.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from analysis.derive import LR

EPOCHS = "data.epochs"
ROUTER = "moe.router"
EC_SCOPE = "moe.expert_choice_scope"
ROUTED_SCALE = "moe.routed_scale_used"
ROUTED_SCALE_SET = "moe.routed_scale"
FINGERPRINT = "data.fingerprint"
VAL_WINDOWS = "data.val_windows"
EVAL_TOKENS = "train.eval_tokens"
THREADS = "machine.threads"
MACHINE = (THREADS, "machine.cpu_capability", "machine.torch", "machine.device")
IDENT = ["model", "tokens", "variant", "seed", "run_key"]


@dataclass(frozen=True)
class Check:
    """One comparability check over a study's runs."""

    name: str
    """What is checked, in words."""
    params: tuple[str, ...]
    """The params it reads."""
    status: Literal["ok", "flagged", "unknown"]
    """flagged: offenders found; unknown: none found but some runs lack the params."""
    summary: str
    """One sentence: what was found."""
    offenders: pd.DataFrame
    """The offending runs (model, tokens, variant, seed, run_key, lr, and the params read)."""


def param(runs: pd.DataFrame, name: str, *, numeric: bool = False) -> pd.Series:
    """A param column, NaN where not logged (or the whole column when no run logged it)."""
    if name not in runs:
        return pd.Series(np.nan, index=runs.index, dtype=float if numeric else object)
    col = runs[name]
    return pd.to_numeric(col, errors="coerce") if numeric else col.where(col.notna(), np.nan)


def comparability_checks(runs: pd.DataFrame) -> list[Check]:
    """All six checks, in a fixed order."""
    return [
        repeated_data(runs),
        batch_expert_choice(runs),
        routed_scale_mix(runs),
        fingerprint_mix(runs),
        val_tokens_mix(runs),
        machine_mix(runs),
    ]


def _check(name, params, runs, bad, unknown, found, clean, extra=()) -> Check:
    n_unknown = int(unknown.sum())
    unknown_note = f"{', '.join(params)} not logged for {n_unknown} of {len(runs)} runs (unknown)"
    if bad.any():
        status, summary = "flagged", found + (f"; {unknown_note}" if n_unknown else "")
    elif n_unknown:
        status, summary = "unknown", f"none found, but {unknown_note}"
    else:
        status, summary = "ok", clean
    cols = IDENT + ([LR] if LR in runs else []) + [p for p in params if p in runs] + list(extra)
    order = ["model", "tokens", "variant"] + ([LR] if LR in runs else []) + ["seed"]
    offenders = runs.loc[bad, cols].sort_values(order).reset_index(drop=True)
    return Check(name, tuple(params), status, summary, offenders)


def repeated_data(runs: pd.DataFrame) -> Check:
    epochs = param(runs, EPOCHS, numeric=True)
    bad = epochs > 1
    return _check(
        "runs that repeated data",
        (EPOCHS,),
        runs,
        bad,
        epochs.isna(),
        f"{int(bad.sum())} runs saw some tokens more than once ({EPOCHS} > 1)",
        f"ok: every run saw each token at most once ({EPOCHS} <= 1)",
    )


def batch_expert_choice(runs: pd.DataFrame) -> Check:
    router, scope = param(runs, ROUTER), param(runs, EC_SCOPE)
    ec = router == "expert_choice"
    bad = ec & (scope == "batch")
    return _check(
        "expert choice routed over the whole batch (not causal)",
        (ROUTER, EC_SCOPE),
        runs,
        bad,
        router.isna() | (ec & scope.isna()),
        f"{int(bad.sum())} expert-choice runs chose tokens over the whole batch ({EC_SCOPE}=batch): "
        f"a token's routing depends on later tokens of its sequence",
        "ok: no run used expert choice over the whole batch",
    )


def _per_group(runs, same) -> pd.Series:
    """True on every run of a (model, tokens) group where `same(group)` is False."""
    bad = pd.Series(False, index=runs.index)
    for _, g in runs.groupby(["model", "tokens"], dropna=False):
        if not same(g):
            bad[g.index] = True
    return bad


def scale_conventions(runs: pd.DataFrame) -> pd.Series:
    """Routed-scale convention per run: "auto", "fixed <x>", "= G" (inferred), "any" (a G=1 or dense arm
    at scale 1, which every convention gives) or NaN (not logged)."""
    used = param(runs, ROUTED_SCALE, numeric=True)
    gran = pd.to_numeric(runs["granularity"], errors="coerce").astype(float)
    fixed = used.map(lambda v: f"fixed {v:g}", na_action="ignore")
    if ROUTED_SCALE_SET in runs:
        set_ = pd.to_numeric(runs[ROUTED_SCALE_SET], errors="coerce")  # None / "None" -> NaN = auto
        label = set_.map(lambda v: f"fixed {v:g}", na_action="ignore").fillna("auto")
    else:
        label = fixed.where(used != gran, "= G")
    label = label.where(~((gran.isna() | (gran == 1)) & (used == 1)), "any")
    return label.where(used.notna(), np.nan)


def routed_scale_mix(runs: pd.DataFrame) -> Check:
    label = scale_conventions(runs)
    bad = _per_group(runs, lambda g: label[g.index].dropna().pipe(lambda s: s[s != "any"]).nunique() <= 1)
    return _check(
        "arms with different routed-output scale conventions",
        (ROUTED_SCALE, ROUTED_SCALE_SET),
        runs.assign(convention=label),
        bad,
        label.isna(),
        f"{int(bad.sum())} runs are in comparisons whose arms mix routed-scale conventions "
        f"(auto vs a fixed {ROUTED_SCALE_SET}, or different fixed values)",
        f"ok: within each comparison every arm follows one routed-scale convention ({ROUTED_SCALE})",
        extra=("convention",),
    )


def fingerprint_mix(runs: pd.DataFrame) -> Check:
    fp = param(runs, FINGERPRINT)
    bad = _per_group(runs, lambda g: fp[g.index].dropna().nunique() <= 1)
    return _check(
        "arms trained on different data",
        (FINGERPRINT,),
        runs,
        bad,
        fp.isna(),
        f"{int(bad.sum())} runs are in comparisons whose arms trained on different {FINGERPRINT}",
        f"ok: within each comparison every run has the same {FINGERPRINT}",
    )


def val_tokens_mix(runs: pd.DataFrame) -> Check:
    windows = param(runs, VAL_WINDOWS).fillna("first")
    n_tokens = param(runs, EVAL_TOKENS, numeric=True)
    val_set = pd.Series(
        [f"{w} x {n:g}" if pd.notna(n) else np.nan for w, n in zip(windows, n_tokens, strict=True)],
        index=runs.index,
        dtype=object,
    )
    bad = _per_group(runs, lambda g: val_set[g.index].dropna().nunique() <= 1)
    return _check(
        "arms validated on different tokens",
        (EVAL_TOKENS, VAL_WINDOWS),  # without train.eval_tokens it is unknown; without val_windows: first
        runs.assign(val_set=val_set),
        bad,
        n_tokens.isna(),
        f"{int(bad.sum())} runs are in comparisons whose arms measured val loss on different tokens "
        f"({VAL_WINDOWS} x {EVAL_TOKENS})",
        f"ok: within each comparison every run measured val loss on the same tokens ({VAL_WINDOWS} x {EVAL_TOKENS})",
        extra=("val_set",),
    )


def machine_facts(runs: pd.DataFrame) -> pd.Series:
    """Per run, its machine facts as one text ("1 threads, AVX2, torch 2.5.1, cpu"); NaN where any of
    them is not logged (runs from before studies.job.record.machine_facts)."""
    cols = [param(runs, p) for p in MACHINE]
    threads = pd.to_numeric(cols[0], errors="coerce")
    label = [
        f"{t:g} threads, {c}, torch {v}, {d}"
        if pd.notna(t) and all(pd.notna(x) for x in (c, v, d))
        else np.nan
        for t, c, v, d in zip(threads, *cols[1:], strict=True)
    ]
    return pd.Series(label, index=runs.index, dtype=object)


def machine_mix(runs: pd.DataFrame) -> Check:
    facts = machine_facts(runs)
    bad = _per_group(runs, lambda g: facts[g.index].dropna().nunique() <= 1)
    return _check(
        "arms run on different machines",
        MACHINE,  # the first names the check (analysis.findings keys its caveat by it)
        runs,
        bad,
        facts.isna(),
        f"{int(bad.sum())} runs are in comparisons whose arms ran with different torch threads, CPU "
        "capability, torch version or device: the same run gives a different loss on each",
        "ok: within each comparison every run ran with the same threads, CPU capability, torch and device",
    )


def machine_caveat(offenders: pd.DataFrame) -> str:
    """The finding's caveat for `machine_mix` offenders, naming the facts that differ."""
    differ = []
    for p in (p for p in MACHINE if p in offenders):
        vals = sorted({_text(v) for v in offenders[p].dropna()})
        if len(vals) > 1:
            differ.append(f"{p} {' vs '.join(vals)}")
    what = "; ".join(differ) or "threads, CPU capability, torch or device"
    return f"the runs ran on different machines ({what}), which moves the loss beyond seed noise"


def _text(v) -> str:
    return format(float(v), "g") if isinstance(v, (int, float, np.number)) else str(v)


def per_variant(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    """The distinct values of param `name` per (model, tokens, variant), as text ("" if not logged)."""

    def text(s):
        return ", ".join(sorted({_text(v) for v in s.dropna()}))

    df = runs[["model", "tokens", "variant"]].assign(value=param(runs, name))
    out = df.groupby(["model", "tokens", "variant"], dropna=False)["value"].agg(text).reset_index()
    return out.rename(columns={"value": name})
