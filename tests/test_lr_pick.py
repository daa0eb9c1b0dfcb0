"""Each arm's LR: picked by the mean over seeds, never at the edge of its grid, recorded in lr_pick.json;
a best-LR sweep with one LR or one seed is refused before any job."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from analysis.findings import read_findings
from analysis.report import write_report
from analysis.synthetic import SyntheticStudy, write_study
from analysis.tuning import LR_PICK_FILE, lr_grid_errors, lr_pick, lr_tuning, use_best_lr
from studies.launch.sweep import compose_jobs, validate_jobs

G1, G8 = "moe-E8-k2-G1", "moe-E8-k2-G8"
EDGE = "no pick: best LR 0.01 is the highest of the grid; extend the grid upward"


def _per_run(losses: dict[float, list[float]], variant: str = G1) -> pd.DataFrame:
    """One run per (lr, seed): losses maps lr -> final smoothed loss of seeds 0, 1, ..."""
    rows = [
        (f"{variant}-{lr:g}-{s}", "tiny", 1000, variant, s, lr, v)
        for lr, vals in losses.items()
        for s, v in enumerate(vals)
    ]
    return pd.DataFrame(rows, columns=["run_key", "model", "tokens", "variant", "seed", "lr", "final_smooth"])


def test_the_pick_is_the_lowest_mean_over_seeds_not_one_seeds_best():
    # seed 0 alone is best at 3e-3; over both seeds 6e-3 is (3.05 < 3.20 < 3.30)
    t = lr_tuning(_per_run({3e-3: [3.00, 3.40], 6e-3: [3.05, 3.05], 1.2e-2: [3.30, 3.30]}))
    best = t.best.iloc[0]
    assert best["lr"] == 6e-3 and best["picked"] and best["note"] == ""
    assert t.best_keys == {f"{G1}-0.006-0", f"{G1}-0.006-1"}
    (pick,) = lr_pick(t)["picks"]
    assert pick == {
        "model": "tiny",
        "tokens": 1000,
        "variant": G1,
        "lr": 0.006,
        "refused": None,
        "best_on_grid": 0.006,
        "grid": [0.003, 0.006, 0.012],
        "seeds": [0, 1],
        "n_seeds": 2,
        "losses": [
            {"lr": 0.003, "mean": pytest.approx(3.20), "n_seeds": 2, "per_seed": {"0": 3.00, "1": 3.40}},
            {"lr": 0.006, "mean": pytest.approx(3.05), "n_seeds": 2, "per_seed": {"0": 3.05, "1": 3.05}},
            {"lr": 0.012, "mean": pytest.approx(3.30), "n_seeds": 2, "per_seed": {"0": 3.30, "1": 3.30}},
        ],
    }


def test_a_best_lr_at_either_edge_of_its_grid_is_refused_with_the_way_to_extend_it():
    high = lr_tuning(_per_run({1e-3: [3.0, 3.1], 3e-3: [2.9, 2.9], 1e-2: [2.5, 2.6]})).best.iloc[0]
    assert high["lr"] == 1e-2 and not high["picked"] and high["note"] == EDGE
    low = lr_tuning(_per_run({1e-3: [2.5, 2.6], 3e-3: [2.9, 2.9], 1e-2: [3.0, 3.1]}))
    assert (
        low.best.iloc[0]["note"]
        == "no pick: best LR 0.001 is the lowest of the grid; extend the grid downward"
    )
    (pick,) = lr_pick(low)["picks"]
    assert pick["lr"] is None and pick["best_on_grid"] == 0.001 and pick["refused"].startswith("no pick")
    # two LRs never bracket a best; one LR is nothing to pick
    assert not lr_tuning(_per_run({1e-3: [3.0, 3.1], 3e-3: [2.9, 2.9]})).best.iloc[0]["picked"]
    (single,) = lr_pick(lr_tuning(_per_run({3e-3: [2.9, 3.0]})))["picks"]
    assert single["lr"] is None and single["refused"] == "single LR (untuned)" and single["grid"] == [0.003]


def test_report_records_the_picks_and_states_no_pick_for_an_edge_best(tmp_path):
    # G1 is best inside its grid (3e-3); G8 at its top (1e-2)
    spec = SyntheticStudy(
        name="picks",
        token_budgets=(40960,),
        seeds=(0, 1),
        noise=0.002,
        learning_rates={G1: {1e-3: 0.7, 3e-3: 1.0, 1e-2: 0.85}, G8: {1e-3: 0.6, 3e-3: 0.8, 1e-2: 1.0}},
    )
    write_study(tmp_path / "picks", spec)
    path = write_report(tmp_path / "picks", best_lr=True, n_boot=0)
    picks = {p["variant"]: p for p in json.loads((path.parent / LR_PICK_FILE).read_text())["picks"]}
    assert picks[G1]["lr"] == 0.003 and picks[G1]["refused"] is None
    assert picks[G8]["lr"] is None and picks[G8]["refused"] == EDGE and picks[G8]["best_on_grid"] == 0.01
    for p in picks.values():
        assert p["grid"] == [0.001, 0.003, 0.01] and p["seeds"] == [0, 1] and p["n_seeds"] == 2
        for at in p["losses"]:
            assert set(at["per_seed"]) == {"0", "1"}
            assert at["mean"] == pytest.approx(np.mean(list(at["per_seed"].values())), rel=1e-12)
    text = path.read_text()
    assert f"| tiny | 40960 | {G8} | 0.01 | 3 | {EDGE} |" in text
    (finding,) = read_findings(path)
    caveats = finding.split(" Caveats: ")[1]
    assert f"G=8's LR: {EDGE}" in caveats and "G=1's LR" not in caveats


def test_one_seed_per_learning_rate_is_refused_by_the_shared_rule():
    bad = lr_grid_errors({("tiny", 10240, G8): {3e-3: [0], 1e-2: [0, 1]}}, best_lr=True)
    assert bad == [
        f"seed has one value (0) at optim.lr=0.003 for variant {G8} at model=tiny tokens=10240: the best LR "
        "is picked by the mean over seeds, so each learning rate needs at least 2 seeds (sweep -m seed=0,1)"
    ]
    assert lr_grid_errors({("tiny", 10240, G8): {3e-3: [0, 1], 1e-2: [0, 1]}}, best_lr=True) == []
    # without a best-LR pick one seed is allowed (the finding says "one seed in an arm")
    assert lr_grid_errors({("tiny", 10240, G8): {3e-3: [0]}}, best_lr=False) == []
    t = lr_tuning(_per_run({1e-3: [3.0], 3e-3: [2.9], 1e-2: [3.1]}))
    with pytest.raises(
        ValueError, match=re.escape(f"seed has one value (0) at optim.lr=0.001, 0.003, 0.01 for variant {G1}")
    ):
        use_best_lr(t, True)
    assert use_best_lr(t, None) is True  # the automatic mode picks, and lr_pick.json shows n_seeds 1


def _nothing_written(root):
    assert not list(root.rglob("*.db")) and not list(root.rglob("runs"))


def test_lr_sweep_study_is_two_seeds_per_lr_and_refused_with_one_seed_or_one_lr(shrunk, tmp_path):
    points = validate_jobs(compose_jobs(["study=lr_sweep", *shrunk], multirun=True), cwd=tmp_path)
    grid = {(p.variant, p.run.optim.lr, p.run.seed) for p in points}
    assert grid == {(v, lr, s) for v in (G1, G8) for lr in (5e-3, 1e-2, 2e-2) for s in (0, 1)}
    assert all(p.run.study.best_lr for p in points)
    one_seed = compose_jobs(["study=lr_sweep", *shrunk, "seed=0"], multirun=True)
    want = (
        f"study.best_lr=true but seed has one value (0) at optim.lr=0.005, 0.01, 0.02 for variant {G1} at "
        "model=tiny tokens=10240: the best LR is picked by the mean over seeds, so each learning rate needs at "
        "least 2 seeds (sweep -m seed=0,1) (and 1 more)"
    )
    with pytest.raises(ValueError) as info:
        validate_jobs(one_seed, cwd=tmp_path)
    assert str(info.value) == want
    one_lr = compose_jobs(["study=lr_sweep", *shrunk, "optim.lr=0.003"], multirun=True)
    with pytest.raises(
        ValueError, match=r"^study.best_lr=true but optim.lr has one value \(0.003\) for variant"
    ):
        validate_jobs(one_lr, cwd=tmp_path)
    _nothing_written(tmp_path)
