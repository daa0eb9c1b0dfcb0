"""Training-step savings: how many fewer steps (tokens, FLOPs) a variant needs to reach the baseline's loss.

Definition (docs/method.md §2): target = the baseline's final smoothed validation loss;
steps_variant = first step where the variant's smoothed curve reaches the target, interpolated linearly
in log-step between the bracketing logged points; savings = 1 - steps_variant / steps_baseline, with
steps_baseline the baseline's last logged step. A variant that never reaches the target is extrapolated
with its fitted curve L(t) = E + A t^-alpha and flagged. With several seeds, curves are averaged over
seeds at common steps and a bootstrap over seeds gives the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.curves import fit_loss_curve, steps_to_reach
from analysis.laws import FitError


@dataclass(frozen=True)
class Reach:
    """When a curve reaches a target loss."""

    step: float
    """Step (fractional when interpolated; inf if the fitted curve never gets there)."""
    extrapolated: bool
    """True when the crossing was not observed (never reached, or reached before the first evaluation)
    and the fitted curve (or a bound) was used."""


def reach_step(steps, smooth_loss, target: float, *, fit_from_frac: float = 0.1) -> Reach:
    """First step at which a smoothed curve reaches `target`, interpolated in log-step."""
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(smooth_loss, dtype=np.float64)
    hit = np.flatnonzero(y <= target)
    if hit.size:
        i = hit[0]
        if i == 0:
            # Reached at or before the first evaluation: the crossing was not observed. Estimate it from the
            # fitted curve (flagged as extrapolated); with too few points, the first step is an upper bound.
            try:
                fit = fit_loss_curve(t, y, fit_from_frac=0.0)
            except (ValueError, FitError):
                return Reach(float(t[0]), True)
            return Reach(min(steps_to_reach(fit, target), float(t[0])), True)
        y0, y1, lt0, lt1 = y[i - 1], y[i], np.log(t[i - 1]), np.log(t[i])
        return Reach(float(np.exp(lt0 + (y0 - target) / (y0 - y1) * (lt1 - lt0))), False)
    fit = fit_loss_curve(t, y, fit_from_frac=fit_from_frac)
    return Reach(steps_to_reach(fit, target), True)


def mean_curve(curve: pd.DataFrame, run_keys) -> pd.DataFrame:
    """Seed-averaged smoothed curve over the steps all `run_keys` logged (keys may repeat)."""
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


def step_savings(
    curve: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    baseline: str | None = None,
    n_boot: int = 1000,
    ci: float = 0.9,
    seed: int = 0,
    fit_from_frac: float = 0.1,
) -> pd.DataFrame:
    """Savings of every variant against its group's baseline (see module doc); one row per variant.

    `curve` is `derive.curves(...)` of the validation loss. A variant whose extrapolation fit fails keeps
    a row with NaN savings and the error in `fit_error`.
    """
    rates = runs.set_index("run_key")
    rng = np.random.default_rng(seed)
    rows = []
    for (model, tokens), base in pick_baselines(runs, baseline).items():
        g = runs[(runs["model"] == model) & (runs["tokens"] == tokens)]
        base_keys = sorted(g.loc[g["variant"] == base, "run_key"])
        b_tok = float(rates.loc[base_keys[0], "acct.batch_tokens"])
        b_fpt = float(rates.loc[base_keys[0], "acct.flops_per_token_train"])
        for variant, gv in g.groupby("variant", sort=True):
            if variant == base:
                continue
            keys = sorted(gv["run_key"])
            v_tok = float(rates.loc[keys[0], "acct.batch_tokens"])
            v_fpt = float(rates.loc[keys[0], "acct.flops_per_token_train"])
            cache: dict = {}

            def savings_of(vk, bk, cache=cache):
                ident = (tuple(sorted(vk)), tuple(sorted(bk)))
                if ident not in cache:
                    bc = mean_curve(curve, bk)
                    target, steps_b = float(bc["smooth"].iloc[-1]), float(bc["step"].iloc[-1])
                    vc = mean_curve(curve, vk)
                    r = reach_step(vc["step"], vc["smooth"], target, fit_from_frac=fit_from_frac)
                    cache[ident] = (target, steps_b, r)
                return cache[ident]

            row = {
                "model": model,
                "tokens": tokens,
                "variant": variant,
                "baseline": base,
                "n_seeds": len(keys),
                "n_seeds_baseline": len(base_keys),
                "fit_error": "",
            }
            try:
                target, steps_b, r = savings_of(keys, base_keys)
            except (FitError, ValueError) as e:
                rows.append(
                    {
                        **row,
                        "target_loss": np.nan,
                        "steps_baseline": np.nan,
                        "steps_variant": np.nan,
                        "extrapolated": True,
                        "savings_steps": np.nan,
                        "savings_tokens": np.nan,
                        "savings_flops": np.nan,
                        "ci_lo": np.nan,
                        "ci_hi": np.nan,
                        "fit_error": str(e),
                    }
                )
                continue
            row.update(
                target_loss=target,
                steps_baseline=steps_b,
                steps_variant=r.step,
                extrapolated=r.extrapolated,
                savings_steps=1 - r.step / steps_b,
                savings_tokens=1 - r.step * v_tok / (steps_b * b_tok),
                savings_flops=1 - r.step * v_tok * v_fpt / (steps_b * b_tok * b_fpt),
            )
            row["ci_lo"], row["ci_hi"], row["boot_extrapolated"] = _seed_bootstrap(
                savings_of, keys, base_keys, n_boot, ci, rng
            )
            rows.append(row)
    return pd.DataFrame(rows)


def _seed_bootstrap(savings_of, keys, base_keys, n_boot, ci, rng):
    """Percentile interval of step savings resampling seeds (variant and baseline independently).

    Seed multisets are few (3 seeds give 10), so each distinct resample is computed once.
    """
    if n_boot <= 0 or (len(keys) < 2 and len(base_keys) < 2):
        return np.nan, np.nan, 0.0
    vals, extra = [], 0
    for _ in range(n_boot):
        vk = list(rng.choice(keys, size=len(keys)))
        bk = list(rng.choice(base_keys, size=len(base_keys)))
        try:
            _, steps_b, r = savings_of(vk, bk)
        except (FitError, ValueError):
            vals.append(np.nan)
            continue
        extra += r.extrapolated
        vals.append(1 - r.step / steps_b)
    vals = np.asarray(vals)
    # A replicate whose fitted curve never reaches the target has savings -inf; percentiles keep it.
    lo, hi = np.nanpercentile(vals, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(lo), float(hi), extra / n_boot
