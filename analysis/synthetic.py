"""A synthetic study written exactly as the training side writes one (docs/outputs.md), through
records.runfiles, the writer the training side uses.

Each variant's validation loss is L(t) = E + A * (s * t)^-alpha (+ noise), so a variant with speed-up
s reaches any loss in 1/s of the steps and its true step savings are 1 - 1/s. Used by the tests and
to try the report without training: `python -m analysis.synthetic DIR [--mlflow]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from records import runfiles


@dataclass(frozen=True)
class SyntheticStudy:
    """What to write."""

    name: str = "synthetic"
    """Study (experiment) name."""
    speedups: dict[str, float] = field(default_factory=lambda: {"moe-E8-k2-G1": 1.0, "moe-E8-k2-G8": 1.5})
    """Variant label -> step speed-up over G=1; the granularity tag is parsed from the label's -G<n>."""
    token_budgets: tuple[int, ...] = (163840,)
    """Token budgets (tags.tokens); steps = budget / batch_tokens."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds per point."""
    batch_tokens: int = 1024
    """Tokens per optimiser step."""
    flops_per_token: float = 6.0e6
    """acct.flops_per_token_train."""
    curve: tuple[float, float, float] = (2.0, 12.0, 0.5)
    """(E, A, alpha) of the G=1 curve."""
    noise: float = 0.0
    """Std of Gaussian noise added to each validation loss."""
    eval_every: int = 10
    """Validation interval in steps."""
    failed: int = 0
    """Extra runs written as FAILED (excluded by the loaders)."""
    lr: float = 3e-3
    """optim.lr of the variants not in `learning_rates`."""
    learning_rates: dict[str, dict[float, float]] = field(default_factory=dict)
    """Variant -> {optim.lr: multiplier of its speed-up}: that variant is run at each of these LRs."""
    seeds_of: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Variant -> its seeds, overriding `seeds` (to leave a seed out of one arm)."""
    seed_offset: float = 0.0
    """Std of a per-seed constant added to every val loss of that seed in all variants: as in real runs,
    the seed moves the absolute loss while the difference between variants at one seed stays put."""
    params: dict[str, dict[str, object]] = field(default_factory=dict)
    """Variant -> extra params logged on its runs (e.g. {"data.epochs": 2.0})."""


def granularity_of(variant: str) -> int:
    return int(variant.rsplit("-G", 1)[1].split("-")[0])


def write_study(
    study_dir: Path | str,
    spec: SyntheticStudy = SyntheticStudy(),
    *,
    tracking_uri: str | None = None,
    seed: int = 0,
) -> dict:
    """Write runs/<key>/ folders (and MLflow runs when tracking_uri is given); return the truth."""
    study_dir = Path(study_dir)
    rng = np.random.default_rng(seed)
    E, A, alpha = spec.curve
    client = parent = None
    if tracking_uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exp = client.create_experiment(
            spec.name, artifact_location=(study_dir / "artifacts").resolve().as_uri()
        )
        parent = client.create_run(exp, tags={"kind": "sweep", "study": spec.name}).info.run_id
    points = [
        (v, b, s, lr)
        for v in spec.speedups
        for b in spec.token_budgets
        for s in spec.seeds_of.get(v, spec.seeds)
        for lr in spec.learning_rates.get(v, {spec.lr: 1.0})
    ]
    first = next(iter(spec.speedups))
    points += [(first, spec.token_budgets[0], 100 + i, spec.lr) for i in range(spec.failed)]
    # Drawn only when asked for, so studies without offsets keep their noise stream.
    offsets = {
        s: rng.normal(0, spec.seed_offset) if spec.seed_offset else 0.0
        for s in sorted({p[2] for p in points})
    }
    for i, (variant, budget, sd, lr) in enumerate(points):
        failed = i >= len(points) - spec.failed
        # The LR enters the key only for swept variants, so single-LR studies keep their keys.
        ident = f"{variant}/{budget}/{sd}" + (f"/{lr:g}" if variant in spec.learning_rates else "")
        key = hashlib.sha1(ident.encode()).hexdigest()[:10]
        speedup = spec.speedups[variant] * spec.learning_rates.get(variant, {}).get(lr, 1.0)
        steps = budget // spec.batch_tokens
        tags = {
            "kind": "point",
            "study": spec.name,
            "variant": variant,
            "model": "tiny",
            "granularity": str(granularity_of(variant)),
            "top_k": "2",
            "experts": "8",
            "tokens": str(budget),
            "seed": str(sd),
            "run_key": key,
            "git_sha": "synthetic",
        }
        acct = {
            "acct.params_total": 1.0e6,
            "acct.params_active": 4.0e5,
            "acct.params_non_embedding": 8.0e5,
            "acct.params_active_non_embedding": 2.0e5,
            "acct.flops_per_token_train": spec.flops_per_token,
            "acct.steps": steps,
            "acct.batch_tokens": spec.batch_tokens,
            "optim.lr": lr,
            **spec.params.get(variant, {}),
        }
        last = steps // 2 if failed else steps
        lines = []
        for t in range(1, last + 1):
            tok = t * spec.batch_tokens
            row = {
                "step": t,
                "tokens": tok,
                "flops": tok * spec.flops_per_token,
                "train/loss": E + A * (speedup * t) ** -alpha + rng.normal(0, 0.05),
            }
            if t % spec.eval_every == 0 or t == last:
                val = E + A * (speedup * t) ** -alpha + offsets[sd]
                row["val/loss"] = val + rng.normal(0, spec.noise)
                row["router/top1_mass"] = 0.9 - 0.4 * t / steps
                row["router/imbalance"] = 1.0 + 1.0 / np.sqrt(t)
                row["router/entropy_norm"] = 0.8 + 0.15 * t / steps
                for layer, early in ((0, 0.6), (3, 0.3)):  # the first block concentrates more early on
                    row[f"router/layer{layer}/top1_share_norm"] = early * (1 - 0.5 * t / steps)
                row["router/top1_share_norm"] = 0.45 * (1 - 0.5 * t / steps)
            lines.append(row)
        d = runfiles.runs_dir(study_dir) / key
        d.mkdir(parents=True, exist_ok=True)
        runfiles.write_events(d / runfiles.METRICS, lines)
        state = "FAILED" if failed else "DONE"
        runfiles.write_status(d, state, last, "RuntimeError: synthetic failure" if failed else None)
        final = {} if failed else {"val/loss": lines[-1]["val/loss"], "train/loss": lines[-1]["train/loss"]}
        runfiles.write_summary(
            d,
            {
                "run_key": key,
                "status": state,
                "variant": variant,
                "tags": tags,
                "params": acct,
                "final": final,
                "mlflow_run_id": None,
            },
        )
        if client is not None:
            _log_mlflow(client, exp, parent, tags, acct, lines, failed)
    if client is not None:
        client.set_terminated(parent, status="FINISHED")
    best = {
        v: sp * max(spec.learning_rates.get(v, {spec.lr: 1.0}).values()) for v, sp in spec.speedups.items()
    }
    base = next((best[v] for v in best if granularity_of(v) == 1), 1.0)
    return {
        "parent_run_id": parent,
        # each variant at its best LR against the G=1 variant at its best LR
        "savings": {v: 1.0 - base / b for v, b in best.items() if granularity_of(v) != 1},
    }


def _log_mlflow(client, exp, parent, tags, acct, lines, failed):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp, tags={**tags, "mlflow.parentRunId": parent}).info.run_id
    metrics = [Metric(k, float(v), 0, r["step"]) for r in lines for k, v in r.items() if k != "step"]
    params = [Param(k, str(v)) for k, v in acct.items()]
    for i in range(0, max(len(metrics), 1), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run, metrics=metrics[i : i + 1000], params=params if i == 0 else [])
    client.set_terminated(run, status="FAILED" if failed else "FINISHED")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("--mlflow", action="store_true", help="also log to sqlite:///<study_dir>/mlflow.db")
    p.add_argument("--noise", type=float, default=0.01)
    a = p.parse_args(argv)
    uri = f"sqlite:///{a.study_dir.resolve() / 'mlflow.db'}" if a.mlflow else None
    a.study_dir.mkdir(parents=True, exist_ok=True)
    truth = write_study(
        a.study_dir,
        SyntheticStudy(name=a.study_dir.name, noise=a.noise, token_budgets=(81920, 163840, 327680)),
        tracking_uri=uri,
    )
    print(json.dumps(truth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
