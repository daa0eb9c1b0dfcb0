"""Held-out points (study.holdout, docs/scaling_law.md): a law fitted on the other points of a study
forecasts them before they train, so the forecast is a test the law can fail.

    before jobs   holdout_errors(jobs, points): the refusals (an entry that matches no point, or all of
                  them; a fit set smaller than the law; --detach, which would start them unforecast)
    sweep order   held_out_last(jobs): held-out points after every other point (studies.launch.sweep)
    between       forecast_before(master, jobs): fit on the finished other points and write
                  report/forecast.json (never overwritten: a re-run keeps the first) and log it on the
                  sweep's MLflow parent run; the sweeper starts no held-out point without it
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from analysis.derive import SPIKE_RISE, worst_rise
from analysis.laws import levels
from records import runfiles
from studies.job.config import load_run_config
from studies.job.point import Point, build_point

LAW_COEFFICIENTS = {"finegrained": 7, "chinchilla": 5}
"""Free coefficients of each law (analysis.laws): the fit set needs more distinct (N, D, G) points."""


def matches(cfg: Any, entry: str) -> bool:
    """Whether a composed job config has `entry` (key=value; `model` names the size preset)."""
    key, _, value = entry.partition("=")
    key, value = key.strip(), value.strip()
    if key == "model":
        return str(OmegaConf.select(cfg, "model.name")) == value
    return str(OmegaConf.select(cfg, key)) == value


def is_held_out(cfg: Any) -> bool:
    """A job whose composed config matches any study.holdout entry (a composition error never does)."""
    if not isinstance(cfg, DictConfig):
        return False
    return any(matches(cfg, entry) for entry in OmegaConf.select(cfg, "study.holdout") or [])


def held_out_last(jobs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Jobs with the held-out ones after the others, each group in its own order (a stable sort)."""
    return sorted(jobs, key=lambda job: is_held_out(job[1]))


def law_of(points: Sequence[Point]) -> str:
    """The fine-grained law when the fit set has several G, else Chinchilla's."""
    gs = {_grid(p)[2] for p in points}
    return "finegrained" if len(gs) > 1 else "chinchilla"


def _grid(p: Point) -> tuple[float, int, int]:
    return (
        float(p.accounting()["acct.params_non_embedding"]),
        p.train.tokens,
        p.model.moe.granularity if p.model.moe else 1,
    )


def holdout_errors(jobs: Sequence[tuple[Any, Any]], points: Sequence[Point]) -> list[str]:
    """Why the study's held-out points cannot be forecast, before any job (empty: they can)."""
    if not points or not points[0].run.study.holdout:
        return []
    entries = list(points[0].run.study.holdout)
    cfgs = [cfg for _, cfg in jobs]
    errors = [
        f"study.holdout entry {e!r} matches none of the {len(points)} points"
        for e in entries
        if not any(matches(cfg, e) for cfg in cfgs)
    ]
    held = [is_held_out(cfg) for cfg in cfgs]
    fit = [p for p, h in zip(points, held, strict=True) if not h]
    if not fit:
        errors.append(f"study.holdout={entries} holds out every point: none is left to fit the law on")
        return errors
    law = law_of(fit)
    grid = {_grid(p) for p in fit}
    need = LAW_COEFFICIENTS[law] + 1
    if len(grid) < need:
        errors.append(
            f"study.holdout: the points left to fit the {law} law on have {len(grid)} distinct "
            f"(N, D, G) values, fewer than its {need - 1} coefficients + 1; add sizes or budgets"
        )
    # each term's coefficient and exponent (and c, or c and a) need three levels of its covariate
    axes = (("model sizes", 0), ("token budgets", 1)) + (
        (("granularities", 2),) if law == "finegrained" else ()
    )
    for name, i in axes:
        if (k := levels([g[i] for g in grid])) < 3:
            errors.append(
                f"study.holdout: the points left to fit on have {k} {name}; the {law} law needs 3 or more"
            )
    if points[0].run.launch.detach:
        errors.append(
            "study.holdout with launch.detach=true: the held-out points would be submitted before "
            "their forecast exists; run the sweep attached"
        )
    return errors


def _target_row(p: Point) -> dict[str, Any]:
    params, tokens, g = _grid(p)
    return {
        "run_key": p.run_key,
        "model": p.run.model.name,
        "params": params,
        "tokens": float(tokens),
        "granularity": float(g),
        "seed": p.run.seed,
    }


def _val_losses(run_dir: Path) -> list[float]:
    lines = (
        (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    )
    events = (json.loads(line) for line in lines if line.strip())
    return [e["val/loss"] for e in sorted(events, key=lambda e: e["step"]) if "val/loss" in e]


def fit_rows(points: Sequence[Point]) -> tuple[pd.DataFrame, list[str]]:
    """The finished points' (N, D, G, final val loss), and why each other one is left out: not finished,
    or spiking (analysis.derive.worst_rise above SPIKE_RISE, the report's rule)."""
    rows, left_out = [], []
    for p in points:
        summary = runfiles.read_json(p.run_dir / "summary.json") or {}
        loss = (summary.get("final") or {}).get("val/loss_final")
        if summary.get("status") != "DONE" or loss is None:
            left_out.append(f"{p.run_key}: not finished")
        elif (rise := worst_rise(_val_losses(p.run_dir))) > SPIKE_RISE:
            left_out.append(
                f"{p.run_key}: val loss rose {rise:.2f} above its earlier minimum (> {SPIKE_RISE:g})"
            )
        else:
            rows.append({**_target_row(p), "loss": float(loss)})
    return pd.DataFrame(rows), left_out


def forecast_before(
    master: DictConfig,
    jobs: Sequence[tuple[Any, Any]],
    study_dir: Path,
    tracking_uri: str | None,
    parent_run_id: str | None = None,
) -> str | None:
    """Write the held-out points' forecast before they start; None when it exists, else why it cannot."""
    from analysis.forecast import forecast_path, make_forecast, read_forecast, write_forecast

    points = [(build_point(load_run_config(cfg)), is_held_out(cfg)) for _, cfg in jobs]
    held = [p for p, h in points if h]
    path = forecast_path(study_dir)
    if path.exists():
        have = {row.run_key for row in read_forecast(path).rows}
        if missing := [p.run_key for p in held if p.run_key not in have]:
            return (
                f"{path} (written earlier) has no forecast for held-out points {missing}: a forecast is never "
                "rewritten; start them in a new study (study.name) or drop them from the sweep"
            )
        print(f"Forecast of the {len(held)} held-out points kept from {path}", flush=True)
        return None
    fit = [p for p, h in points if not h]
    data, left_out = fit_rows(fit)
    try:
        forecast = make_forecast(data, pd.DataFrame([_target_row(p) for p in held]), law=law_of(fit))
    except (ValueError, RuntimeError) as exc:
        return f"no forecast for the held-out points: {exc}"
    if left_out:  # said in the forecast itself, not only on the console
        forecast = dataclasses.replace(
            forecast, flags=(*forecast.flags, *(f"left out of the fit: {w}" for w in left_out))
        )
        print(f"Forecast fitted without {len(left_out)} points: {left_out}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_forecast(path, forecast)
    _log_on_parent(path, forecast, tracking_uri, parent_run_id)
    print(f"Forecast of the {len(held)} held-out points written to {path} before they start", flush=True)
    return None


def _log_on_parent(path: Path, forecast: Any, tracking_uri: str | None, run_id: str | None) -> None:
    from studies.track.tracking import open_client

    if not run_id or not tracking_uri:
        return
    client = open_client(tracking_uri)
    client.log_artifact(run_id, str(path), artifact_path="forecast")
    client.set_tag(run_id, "forecast_written_at", forecast.written_at)
    for row in forecast.rows:
        client.log_metric(run_id, f"forecast/{row.run_key}", row.predicted)
