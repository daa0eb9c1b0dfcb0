"""Does a cooldown branch land where a cosine run of its length does? (docs/branches.md; arXiv 2405.18392)

    python -m analysis.branch_check outputs/results/branch_check \
        --against outputs/results/token_budget outputs/results/granularity

pairs every finished point of the first study (warmup-stable-decay parents and their cooldown branches)
with the finished cosine run of the same variant, model, budget and seed in the others, checks that the
two differ only in their schedule, and prints per (variant, budget) the paired difference of
val/loss_final (WSD - cosine) with its 95% t-interval over seeds, every seed's difference and the cosine
runs' seed spread. The claim holds at a budget when the interval contains 0 or the mean difference is
within the cosine seed spread. Writes nothing unless --csv is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pandas as pd

from analysis.paired import t_interval

SAME = (
    "model.d_model",
    "model.n_layers",
    "model.d_ff",
    "model.tie_embeddings",
    "model.init",
    "moe.granularity",
    "moe.top_k",
    "moe.num_experts",
    "moe.order",
    "optim.lr",
    "optim.warmup_frac",
    "optim.weight_decay",
    "train.batch_tokens",
    "train.final_eval_tokens",
    "data.fingerprint",
)
"""Params a WSD point and its cosine partner must share: everything that is not the schedule."""


def finished(study_dir: Path) -> pd.DataFrame:
    """One row per DONE point of a study folder: variant, model, tokens, seed, schedule, loss, params."""
    rows = []
    for f in sorted((Path(study_dir) / "runs").glob("*/summary.json")):
        s = json.loads(f.read_text())
        loss = (s.get("final") or {}).get("val/loss_final")
        if s.get("status") != "DONE" or loss is None:
            continue
        t, p = s["tags"], s["params"]
        rows.append(
            {
                "run_key": s["run_key"],
                "variant": t["variant"],
                "model": t["model"],
                "tokens": int(t["budget_tokens"]),
                "seed": int(t["seed"]),
                "schedule": p["optim.schedule"],
                "loss": float(loss),
                **{k: p.get(k) for k in SAME},
            }
        )
    return pd.DataFrame(rows)


def compare(wsd: pd.DataFrame, cosine: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, model, tokens): the paired WSD - cosine differences over seeds and the verdict."""
    if wsd.empty or cosine.empty:
        raise ValueError(
            "no finished points to compare: " + ("the WSD study" if wsd.empty else "the cosine studies")
        )
    wsd, cosine = wsd[wsd["schedule"] == "wsd"], cosine[cosine["schedule"] == "cosine"]
    key = ["variant", "model", "tokens", "seed"]
    pairs = wsd.merge(cosine.drop_duplicates(key), on=key, suffixes=("", "_cos"))
    for col in SAME:
        if differ := pairs[pairs[col].astype(str) != pairs[f"{col}_cos"].astype(str)]["run_key"].tolist():
            raise ValueError(
                f"{col} differs between WSD runs {differ} and their cosine partners: not a schedule check"
            )
    rows = []
    for (variant, model, tokens), g in pairs.groupby(["variant", "model", "tokens"]):
        diffs = (g["loss"] - g["loss_cos"]).tolist()
        lo, hi = t_interval(diffs, 0.95)
        spread = cosine[
            (cosine["variant"] == variant) & (cosine["model"] == model) & (cosine["tokens"] == tokens)
        ]
        sd = statistics.stdev(spread["loss"]) if len(spread) > 1 else float("nan")
        mean = statistics.fmean(diffs)
        holds = len(diffs) > 1 and ((lo <= 0 <= hi) or abs(mean) <= sd)
        rows.append(
            {
                "variant": variant,
                "model": model,
                "tokens": tokens,
                "seeds": len(diffs),
                "mean_diff": mean,
                "ci_lo": lo,
                "ci_hi": hi,
                "diffs": ",".join(f"{d:+.4f}" for d in diffs),
                "cosine_seed_sd": sd,
                "within_noise": holds,
            }
        )
    if not rows:
        raise ValueError("no WSD point has a cosine run of the same variant, model, budget and seed")
    return pd.DataFrame(rows)


def sentences(table: pd.DataFrame) -> list[str]:
    out = []
    for r in table.itertuples(index=False):
        verdict = "within seed noise" if r.within_noise else "NOT within seed noise"
        out.append(
            f"{r.variant} at {r.tokens:,} tokens: WSD - cosine = {r.mean_diff:+.4f} (95% t [{r.ci_lo:+.4f}, "
            f"{r.ci_hi:+.4f}], {r.seeds} seeds: {r.diffs}); cosine seed sd {r.cosine_seed_sd:.4f}: {verdict}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.branch_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("wsd", type=Path, help="study folder of the WSD parents and their cooldown branches")
    ap.add_argument("--against", type=Path, nargs="+", required=True, help="study folders with cosine runs")
    ap.add_argument("--csv", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    for d in [args.wsd, *args.against]:
        if not (d / "runs").is_dir():
            print(f"error: {d} is not a study folder (no runs/ inside)", file=sys.stderr)
            return 2
    try:
        table = compare(finished(args.wsd), pd.concat([finished(d) for d in args.against], ignore_index=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(sentences(table)))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
