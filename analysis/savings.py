"""Savings of a variant against its baseline, per seed: in steps, tokens, FLOPs and training time.

Definition (docs/method.md §2, docs/analysis.md). For each seed both arms ran: target = that seed's
baseline final smoothed val loss; steps_baseline = the baseline's last logged step; steps_variant = the
first step where that seed's variant smoothed curve reaches the target, interpolated linearly in
log-step between the bracketing logged points; savings = 1 - steps_variant / steps_baseline (tokens and
FLOPs: each arm's per-step rates; time: each run's measured `time/train_s` at those steps). A variant's
seeds are summarised by their mean, a Student t interval and a sign count, not a bootstrap: with 3
seeds a bootstrap interval is far narrower than the spread of the seeds themselves.

A crossing not observed within the variant's logged steps:
- "extrapolated": a usable (not degenerate, analysis.curves) L(t) fit of the variant crosses the target
  beyond its last observed step; that step is used (savings <= 0 when the budgets match);
- "not reached": no usable fit, a fitted curve that levels off above the target, or a fitted crossing
  before the last observed step (which the curve itself did not make). The savings are unknown, at most
  `savings_bound` = 1 - last step / steps_baseline (<= 0 when the budgets match), never a number.
Summary rule: when more than half of the paired seeds have a number, the step savings' mean and t
interval are over every paired seed, a not-reached seed counted at its bound `savings_bound` (its true
savings are lower), so with any not-reached seed the mean is an upper bound (`upper_bound`, said in the
note and the finding); the FLOP, token and time savings are over the seeds with a number, upper bounds
too then. Otherwise the variant is "not reached". Leaving a not-reached seed out would bias the mean
toward the variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from analysis.curves import degenerate_reason, fit_loss_curve, steps_to_reach
from analysis.laws import FitError, LawFit
from analysis.paired import t_interval

TIME_METRIC = "time/train_s"
"""Cumulative wall seconds of training (no eval, logging, checkpoint or compile), logged by moe/train/loop.py."""
ReachStatus = Literal["observed", "extrapolated", "not reached"]
NO_TIME = f"no {TIME_METRIC}"


@dataclass(frozen=True)
class Reach:
    """When a curve reaches a target loss."""

    step: float
    """The crossing step (fractional when interpolated); for "not reached", the last observed step, which
    any crossing lies beyond."""
    status: ReachStatus
    """observed (two logged points bracket it), extrapolated (from the fitted curve, or bounded by the
    first evaluation when it was already reached there), not reached (savings unknown)."""
    note: str = ""
    """How it was extrapolated, or why it is not reached."""

    def __post_init__(self):
        if self.status not in ("observed", "extrapolated", "not reached"):
            raise ValueError(f"reach.status={self.status!r} must be observed, extrapolated or not reached")

    @property
    def extrapolated(self) -> bool:
        return self.status == "extrapolated"

    @property
    def reached(self) -> bool:
        return self.status != "not reached"


def reach_step(steps, smooth_loss, target: float, *, fit_from_frac: float = 0.1) -> Reach:
    """First step at which a smoothed curve reaches `target`, interpolated in log-step (see module doc)."""
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(smooth_loss, dtype=np.float64)
    hit = np.flatnonzero(y <= target)
    if hit.size and hit[0] > 0:
        i = hit[0]
        y0, y1, lt0, lt1 = y[i - 1], y[i], np.log(t[i - 1]), np.log(t[i])
        return Reach(float(np.exp(lt0 + (y0 - target) / (y0 - y1) * (lt1 - lt0))), "observed")
    if hit.size:
        # Reached at or before the first evaluation: the crossing was not observed; the fitted curve
        # places it, and the first evaluation bounds it (savings at least 1 - first / steps_baseline).
        fit, why = usable_fit(t, y, 0.0)
        if fit is None:
            return Reach(
                float(t[0]), "extrapolated", f"reached by the first evaluation, an upper bound ({why})"
            )
        return Reach(
            min(steps_to_reach(fit, target), float(t[0])),
            "extrapolated",
            "reached by the first evaluation; crossing from its fitted curve",
        )
    last = float(t[-1]) if t.size else float("nan")
    fit, why = usable_fit(t, y, fit_from_frac)
    if fit is None:
        return Reach(last, "not reached", why)
    step = steps_to_reach(fit, target)
    if math.isinf(step):
        return Reach(last, "not reached", f"its fitted curve levels off above the target (E={fit['E']:.4g})")
    if step <= last:
        return Reach(
            last,
            "not reached",
            f"its fitted curve would cross at step {step:.4g}, before its last "
            f"observed step {last:g}, where the curve itself had not",
        )
    return Reach(step, "extrapolated", f"crossing beyond its last step {last:g}, from its fitted curve")


def usable_fit(steps, loss, fit_from_frac: float) -> tuple[LawFit | None, str]:
    """(fit, "") when L(t) fits and is not degenerate, else (None, why)."""
    try:
        fit = fit_loss_curve(steps, loss, fit_from_frac=fit_from_frac)
    except (ValueError, FitError) as e:
        return None, f"no loss-curve fit: {e}"
    why = degenerate_reason(fit)
    return (None, f"degenerate loss-curve fit: {why}") if why else (fit, "")


def mean_curve(curve: pd.DataFrame, run_keys) -> pd.DataFrame:
    """Smoothed curve averaged over `run_keys` (one seed run twice) at the steps they all logged."""
    parts = [curve[curve["run_key"] == k].set_index("step")["smooth"] for k in run_keys]
    table = pd.concat(parts, axis=1, join="inner")
    if table.empty:
        raise ValueError(f"runs {sorted(set(run_keys))} share no logged steps")
    return pd.DataFrame({"step": table.index.to_numpy(dtype=float), "smooth": table.mean(axis=1).to_numpy()})


def pick_baselines(runs: pd.DataFrame, baseline: str | None = None) -> dict[tuple, str]:
    """Baseline variant per (model, tokens) group: tag variant == baseline, else the one with G = 1."""
    out, missing = {}, []
    for (model, tokens), g in runs.groupby(["model", "tokens"], dropna=False, sort=True):
        variants = sorted(g["variant"].dropna().unique())
        if baseline is not None:
            cands = [baseline] if baseline in variants else []
        else:
            cands = sorted(g.loc[g["granularity"] == 1, "variant"].dropna().unique())
        if len(cands) > 1:
            raise ValueError(
                f"model={model} tokens={tokens}: several granularity=1 variants {cands}; "
                f"choose one with --baseline"
            )
        if cands:
            out[(model, tokens)] = cands[0]
        else:
            missing.append(f"model={model} tokens={tokens} (variants {variants})")
    if not out:
        want = f"baseline={baseline!r}" if baseline else "a granularity=1 variant"
        raise ValueError(f"no group has {want}: {'; '.join(missing)}")
    return out


def run_clocks(metrics: pd.DataFrame | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per run with `time/train_s`: (steps, seconds), starting at (0, 0); runs without it are absent."""
    if metrics is None or metrics.empty:
        return {}
    out = {}
    m = metrics[metrics["metric"] == TIME_METRIC].sort_values("step")
    for key, g in m.groupby("run_key", sort=False):
        g = g.drop_duplicates("step", keep="last")
        s, v = g["step"].to_numpy(dtype=float), g["value"].to_numpy(dtype=float)
        ok = np.isfinite(s) & np.isfinite(v) & (s > 0)
        if ok.any() and v[ok][-1] > 0:
            out[key] = (np.r_[0.0, s[ok]], np.r_[0.0, v[ok]])
    return out


def time_at(clock: tuple[np.ndarray, np.ndarray], step: float) -> float:
    """Training seconds at `step`, linear in step between logged points; beyond the last, at the run's
    mean rate (an extrapolated crossing)."""
    s, v = clock
    if step <= s[-1]:
        return float(np.interp(step, s, v))
    return float(v[-1] + (step - s[-1]) * v[-1] / s[-1])


@dataclass(frozen=True)
class SavingsTables:
    """`savings_tables`' result: one row per variant, and one per (variant, paired seed)."""

    summary: pd.DataFrame
    """savings.csv: mean, t interval and sign count over seeds (see `summarise`)."""
    per_seed: pd.DataFrame
    """savings_per_seed.csv: each seed's target, reach, savings (see `seed_savings`)."""


def savings_tables(
    curve: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    metrics: pd.DataFrame | None = None,
    baseline: str | None = None,
    ci: float = 0.9,
    fit_from_frac: float = 0.1,
) -> SavingsTables:
    """Savings of every variant against its group's baseline, per seed and summarised (module doc).

    curve: `derive.curves(...)` of the validation loss; metrics: `Study.metrics`, read for
    `time/train_s` (None, or runs without it: wall-clock savings unknown)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci} must be in (0, 1)")
    clocks = run_clocks(metrics)
    rates = runs.set_index("run_key")
    summary, per_seed = [], []
    for (model, tokens), base in pick_baselines(runs, baseline).items():
        g = runs[(runs["model"] == model) & (runs["tokens"] == tokens)]
        b_keys = _keys_by_seed(g[g["variant"] == base])
        for variant, gv in g.groupby("variant", sort=True):
            if variant == base:
                continue
            v_keys = _keys_by_seed(gv)
            head = {"model": model, "tokens": tokens, "variant": variant, "baseline": base}
            seeds = [
                {
                    **head,
                    "seed": sd,
                    **seed_savings(curve, rates, clocks, v_keys[sd], b_keys[sd], fit_from_frac),
                }
                for sd in sorted(set(v_keys) & set(b_keys))
            ]
            per_seed += seeds
            unpaired = sorted(set(v_keys) ^ set(b_keys))
            summary.append({**head, **summarise(pd.DataFrame(seeds), ci, unpaired)})
    return SavingsTables(pd.DataFrame(summary), pd.DataFrame(per_seed))


def step_savings(curve: pd.DataFrame, runs: pd.DataFrame, **kw) -> pd.DataFrame:
    """`savings_tables(...).summary`: one row per variant."""
    return savings_tables(curve, runs, **kw).summary


def _keys_by_seed(g: pd.DataFrame) -> dict[int, list[str]]:
    g = g.dropna(subset=["seed"])
    return {int(s): sorted(x["run_key"]) for s, x in g.groupby(g["seed"].astype(int), sort=True)}


def seed_savings(curve, rates, clocks, v_keys, b_keys, fit_from_frac) -> dict:
    """One seed's row: target_loss, steps_baseline, steps_variant, reach, savings_steps (NaN unless
    reached), savings_bound (not reached: the savings are at most this), savings_tokens, savings_flops,
    savings_time, tokens_per_s_ratio (variant / baseline at their last steps), note (how extrapolated,
    why not reached), time_note ("no time/train_s" where a run lacks it)."""
    nan = float("nan")
    try:
        bc, vc = mean_curve(curve, b_keys), mean_curve(curve, v_keys)
    except ValueError as e:
        return {"reach": "not reached", "note": str(e), "time_note": ""}
    target, steps_b = float(bc["smooth"].iloc[-1]), float(bc["step"].iloc[-1])
    r = reach_step(vc["step"], vc["smooth"], target, fit_from_frac=fit_from_frac)
    tok_v, tok_b = (float(rates.loc[k[0], "acct.batch_tokens"]) for k in (v_keys, b_keys))
    fpt_v, fpt_b = (float(rates.loc[k[0], "acct.flops_per_token_train"]) for k in (v_keys, b_keys))
    ratio = r.step / steps_b
    known = r.reached
    row = {
        "target_loss": target,
        "steps_baseline": steps_b,
        "steps_variant": r.step if known else nan,
        "reach": r.status,
        "savings_steps": 1 - ratio if known else nan,
        "savings_bound": nan if known else 1 - ratio,
        "savings_tokens": 1 - ratio * tok_v / tok_b if known else nan,
        "savings_flops": 1 - ratio * tok_v * fpt_v / (tok_b * fpt_b) if known else nan,
        "savings_time": nan,
        "tokens_per_s_ratio": nan,
    }
    row["note"], row["time_note"] = r.note, ""
    cv, cb = [clocks.get(k) for k in v_keys], [clocks.get(k) for k in b_keys]
    if any(c is None for c in cv + cb):
        row["time_note"] = NO_TIME
    else:
        tps_v = np.mean([c[0][-1] * tok_v / c[1][-1] for c in cv])
        tps_b = np.mean([c[0][-1] * tok_b / c[1][-1] for c in cb])
        row["tokens_per_s_ratio"] = float(tps_v / tps_b)
        if known:
            t_v = np.mean([time_at(c, r.step) for c in cv])
            row["savings_time"] = float(1 - t_v / np.mean([time_at(c, steps_b) for c in cb]))
    return row


def summarise(seeds: pd.DataFrame, ci: float, unpaired=()) -> dict:
    """A variant's row of savings.csv from its per-seed rows (module doc's summary rule).

    status: measured / not reached / not measured (no seed both arms ran); savings_steps, ci_lo, ci_hi,
    savings_steps_sd over the seeds with a number; n_positive: seeds with savings > 0 (a not-reached
    seed never counts); savings_time with its t interval over those of them with `time/train_s`."""
    nan = float("nan")
    n = len(seeds)
    out = {
        "status": "not measured",
        "n_seeds": n,
        "savings_steps": nan,
        "ci_lo": nan,
        "ci_hi": nan,
        "savings_steps_sd": nan,
        "n_positive": 0,
        "n_extrapolated": 0,
        "n_not_reached": 0,
        "savings_bound": nan,
        "savings_tokens": nan,
        "savings_flops": nan,
        "savings_time": nan,
        "savings_time_ci_lo": nan,
        "savings_time_ci_hi": nan,
        "n_time": 0,
        "tokens_per_s_ratio": nan,
        "target_loss": nan,
        "steps_baseline": nan,
        "steps_variant": nan,
        "extrapolated": False,
        "upper_bound": False,
        "unpaired": ",".join(map(str, unpaired)),
        "note": "",
    }
    if n == 0:
        out["note"] = "no seed both arms ran" + (f" (unpaired seeds {out['unpaired']})" if unpaired else "")
        return out
    num = seeds[seeds["reach"] != "not reached"]
    miss = seeds[seeds["reach"] == "not reached"]
    reached = num["savings_steps"].to_numpy(dtype=float)
    x = np.concatenate([reached, miss["savings_bound"].to_numpy(dtype=float)])  # bounds: an upper bound
    out.update(
        upper_bound=bool(len(miss)),
        n_positive=int((reached > 0).sum()),
        n_extrapolated=int((num["reach"] == "extrapolated").sum()),
        n_not_reached=len(miss),
        savings_bound=float(miss["savings_bound"].max()) if len(miss) else nan,
        tokens_per_s_ratio=_mean(seeds.get("tokens_per_s_ratio")),
        target_loss=_mean(seeds.get("target_loss")),
        steps_baseline=_mean(seeds.get("steps_baseline")),
        extrapolated=bool((num["reach"] == "extrapolated").any()),
    )
    notes = (
        [
            f"not reached in {len(miss)} of {n} seed{'s' * (n != 1)} ("
            + "; ".join(f"seed {r.seed}: {r.note}" for r in miss.itertuples())
            + "), counted at its bound: the savings are upper bounds"
        ]
        if len(miss)
        else []
    )
    if 2 * len(num) <= n:
        out.update(status="not reached", note="; ".join(notes))
        return out
    lo, hi = t_interval(x, ci)
    t = num["savings_time"].to_numpy(dtype=float)
    t = t[np.isfinite(t)]
    t_lo, t_hi = t_interval(t, ci)
    out.update(
        status="measured",
        savings_steps=float(x.mean()),
        ci_lo=lo,
        ci_hi=hi,
        savings_steps_sd=float(x.std(ddof=1)) if x.size >= 2 else nan,
        savings_tokens=_mean(num["savings_tokens"]),
        savings_flops=_mean(num["savings_flops"]),
        savings_time=float(t.mean()) if t.size else nan,
        savings_time_ci_lo=t_lo,
        savings_time_ci_hi=t_hi,
        n_time=int(t.size),
        steps_variant=_mean(num["steps_variant"]),
    )
    if t.size < len(num):
        notes.append(
            f"wall-clock savings {'unknown' if not t.size else f'over {t.size} of {len(num)} seeds'} "
            f"({NO_TIME}{'' if not t.size else ' in the others'})"
        )
    out["note"] = "; ".join(notes)
    return out


def _mean(col) -> float:
    if col is None:
        return float("nan")
    v = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")
