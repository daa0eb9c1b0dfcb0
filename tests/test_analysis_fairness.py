"""Fair comparisons: each variant at its best LR, seed-paired differences, comparability checks."""

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from torch.testing import assert_close

from analysis import report as report_cli
from analysis.checks import (
    batch_expert_choice,
    comparability_checks,
    fingerprint_mix,
    repeated_data,
    routed_scale_mix,
    val_tokens_mix,
)
from analysis.derive import curves, run_finals
from analysis.load import load_files
from analysis.paired import paired_differences
from analysis.report import write_report
from analysis.savings import step_savings
from analysis.synthetic import SyntheticStudy, write_study
from analysis.tuning import best_lr_runs, lr_tuning, use_best_lr

G1, G8 = "moe-E8-k2-G1", "moe-E8-k2-G8"
# G1 is best at 3e-3 (bracketed); G8 is best at 1e-2, the top of its grid (not bracketed).
SWEPT = SyntheticStudy(
    name="swept",
    token_budgets=(204800,),
    seeds=(0, 1),
    noise=0.002,
    learning_rates={G1: {1e-3: 0.7, 3e-3: 1.0, 1e-2: 0.85}, G8: {1e-3: 0.6, 3e-3: 0.8, 1e-2: 1.0}},
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("swept") / SWEPT.name
    truth = write_study(root, SWEPT)
    return root, truth


def _per_run(rows):
    return pd.DataFrame(rows, columns=["run_key", "model", "tokens", "variant", "seed", "lr", "final_smooth"])


def test_lr_grid_has_mean_std_and_seed_count_per_lr_and_picks_the_lowest_mean():
    per_run = _per_run(
        [
            ("a", "tiny", 1000, G1, 0, 1e-3, 3.0),
            ("b", "tiny", 1000, G1, 1, 1e-3, 3.2),
            ("c", "tiny", 1000, G1, 0, 3e-3, 2.9),
            ("d", "tiny", 1000, G1, 1, 3e-3, 2.7),
            ("e", "tiny", 1000, G1, 0, 1e-2, 3.5),
        ]
    )
    t = lr_tuning(per_run)
    grid = t.grid.set_index("lr")
    assert_close(grid["val_loss"].to_numpy(), np.array([3.1, 2.8, 3.5]))
    assert_close(grid.loc[1e-3, "val_loss_std"], float(np.std([3.0, 3.2], ddof=1)))
    assert grid["seeds"].tolist() == [2, 2, 1]
    assert grid["best"].tolist() == [False, True, False]
    best = t.best.iloc[0]
    assert best["lr"] == 3e-3 and best["n_lrs"] == 3 and best["bracketed"] and best["note"] == ""
    assert t.best_keys == {"c", "d"} and t.swept


def test_best_lr_at_the_edge_of_its_grid_is_not_picked():
    per_run = _per_run(
        [("a", "tiny", 1000, G8, 0, 1e-3, 3.0), ("b", "tiny", 1000, G8, 0, 1e-2, 2.5)]
        + [("c", "tiny", 1000, G8, 0, 3e-3, 2.8)]
    )
    best = lr_tuning(per_run).best.iloc[0]
    assert best["lr"] == 1e-2 and not best["bracketed"] and not best["picked"]
    assert best["note"] == "no pick: best LR 0.01 is the highest of the grid; extend the grid upward"


def test_best_lr_savings_use_each_variants_own_best_lr(swept):
    root, truth = swept
    path = write_report(root, n_boot=20)
    text = path.read_text()
    sav = pd.read_csv(path.parent / "savings.csv")
    # the same savings as step_savings on exactly the best-LR runs (G1 at 3e-3, G8 at 1e-2)
    s = load_files(root)
    best = s.runs[s.runs["optim.lr"] == s.runs["variant"].map({G1: 3e-3, G8: 1e-2})]
    want = step_savings(curves(s.metrics, best), best)
    assert_close(sav["savings_steps"].to_numpy(), want["savings_steps"].to_numpy(), rtol=1e-12, atol=0)
    assert sav["n_seeds"].tolist() == [2]  # seeds, not seeds x learning rates
    assert abs(sav["savings_steps"].iloc[0] - truth["savings"][G8]) < 0.03
    finals = pd.read_csv(path.parent / "final_losses.csv").set_index("variant")
    assert finals.loc[G1, "lr"] == 3e-3 and finals.loc[G8, "lr"] == 1e-2
    assert finals["seeds"].tolist() == [2, 2]
    assert "Savings, final losses and paired differences below use each variant at its own best LR" in text
    assert (
        "| tiny | 204800 | moe-E8-k2-G8 | 0.01 | 3 | no pick: best LR 0.01 is the highest of the grid; extend the grid upward |"
        in text
    )
    assert (
        "FLOPs are the runs' acct.flops_per_token_train (moe.model.accounting: router counted as a matmul, 6 "
        in text
    )
    grid = pd.read_csv(path.parent / "lr_grid.csv")
    assert len(grid) == 6 and grid["best"].sum() == 2


def test_best_lr_with_single_lr_grid_is_refused(tmp_path, capsys):
    spec = SyntheticStudy(
        name="one", token_budgets=(20480,), seeds=(0,), lr=3e-3, learning_rates={G8: {1e-3: 1.0, 1e-2: 1.2}}
    )
    write_study(tmp_path / "one", spec)
    want = (
        "optim.lr has one value (0.003) for variant moe-E8-k2-G1 at model=tiny tokens=20480: a best-LR "
        "comparison needs at least 2 learning rates (sweep -m optim.lr=...)"
    )
    with pytest.raises(ValueError, match=re.escape(want)):
        write_report(tmp_path / "one", best_lr=True, n_boot=0)
    # the CLI prints the same message as one line on stderr and exits 2 (docs/analysis.md, bad input)
    assert report_cli.main(["--study-dir", str(tmp_path / "one"), "--best-lr", "--n-boot", "0"]) == 2
    assert re.search(re.escape(want), capsys.readouterr().err)


def test_no_best_lr_with_several_lrs_per_variant_is_refused_not_mixed_as_seeds(swept, capsys):
    root, _ = swept
    want = (
        r"optim.lr has 3 values \(0.001, 0.003, 0.01\) for variant moe-E8-k2-G1 at model=tiny "
        r"tokens=204800: runs at different learning rates are not seeds"
    )
    with pytest.raises(ValueError, match=want):
        write_report(root, best_lr=False, n_boot=0)
    assert report_cli.main(["--study-dir", str(root), "--no-best-lr", "--n-boot", "0"]) == 2
    assert re.search(want, capsys.readouterr().err)


def test_automatic_best_lr_is_off_when_every_variant_has_one_lr_and_on_when_one_is_swept():
    single = _per_run([("a", "tiny", 1000, G1, 0, 3e-3, 3.0), ("b", "tiny", 1000, G8, 0, 1e-2, 2.9)])
    t = lr_tuning(single)
    assert not t.swept and use_best_lr(t, None) is False and use_best_lr(t, False) is False
    mixed = pd.concat([single, _per_run([("c", "tiny", 1000, G8, 0, 3e-3, 2.7)])])
    t = lr_tuning(mixed)
    assert use_best_lr(t, None) is True  # G8 swept; G1 is used at its only LR, marked untuned
    assert t.best.set_index("variant").loc[G1, "note"] == "single LR (untuned)"
    runs = pd.DataFrame({"run_key": ["a", "b", "c"]})
    assert best_lr_runs(runs, t)["run_key"].tolist() == ["a", "c"]


def test_runs_without_optim_lr_are_one_grid_point_of_unknown_lr():
    t = lr_tuning(
        _per_run([("a", "tiny", 1000, G1, 0, np.nan, 3.0), ("b", "tiny", 1000, G1, 1, np.nan, 3.2)])
    )
    assert len(t.grid) == 1 and t.grid["seeds"].iloc[0] == 2 and t.best_keys == {"a", "b"}
    with pytest.raises(ValueError, match=r"optim.lr has one value \(not logged\)"):
        use_best_lr(t, True)


def test_paired_difference_uses_only_common_seeds():
    base = [3.10, 3.00, 3.20, 2.95]  # seeds 0, 1, 2, 3
    var = {0: 3.00, 1: 2.88, 2: 3.12, 5: 1.0}  # seed 5 has no baseline partner; 3 has no variant run
    rows = [(f"b{s}", "tiny", 1000, G1, s, 3e-3, v) for s, v in enumerate(base)]
    rows += [(f"v{s}", "tiny", 1000, G8, s, 1e-2, v) for s, v in var.items()]
    p = paired_differences(_per_run(rows), {("tiny", 1000): G1}).iloc[0]
    d = np.array([3.00 - 3.10, 2.88 - 3.00, 3.12 - 3.20])
    assert p["n_pairs"] == 3 and p["seeds"] == "0,1,2" and p["unpaired"] == "3,5"
    assert_close(p["mean_diff"], d.mean(), rtol=1e-12, atol=0)
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert_close([p["ci_lo"], p["ci_hi"]], [d.mean() - half, d.mean() + half], rtol=1e-12, atol=0)
    assert p["favour_variant"] == 3 and p["baseline"] == G1


def test_paired_interval_is_not_available_with_one_pair():
    rows = [("b", "tiny", 1000, G1, 0, 3e-3, 3.0), ("v", "tiny", 1000, G8, 0, 3e-3, 3.1)]
    rows += [("w", "tiny", 1000, G8, 7, 3e-3, 2.0)]
    p = paired_differences(_per_run(rows), {("tiny", 1000): G1}).iloc[0]
    assert p["n_pairs"] == 1 and p["favour_variant"] == 0
    assert_close(p["mean_diff"], 0.1, rtol=1e-12, atol=0)
    assert np.isnan(p["ci_lo"]) and np.isnan(p["ci_hi"])


def test_paired_interval_is_narrow_where_absolute_loss_moves_between_seeds(tmp_path):
    # The seed moves every arm's loss by ~0.1; the paired difference stays put, the report shows both.
    spec = SyntheticStudy(
        name="seeds", token_budgets=(102400,), seeds=(0, 1, 2, 3), seed_offset=0.1, noise=0.002
    )
    write_study(tmp_path / "seeds", spec)
    path = write_report(tmp_path / "seeds", n_boot=0)
    finals = pd.read_csv(path.parent / "final_losses.csv")
    p = pd.read_csv(path.parent / "paired.csv").iloc[0]
    spread = finals["final_val_loss_smoothed_std"].min()
    assert spread > 0.02 and p["ci_hi"] - p["ci_lo"] < spread / 2
    assert p["ci_hi"] < 0 and p["favour_variant"] == 4
    text = path.read_text()
    assert "## Paired differences by seed" in text and "| moe-E8-k2-G8 | moe-E8-k2-G1 | 4 | 0,1,2,3 |" in text


def _runs(**params):
    """Four runs: G1 and G8 at seeds 0 and 1; params maps name -> four values."""
    df = pd.DataFrame(
        {
            "run_key": ["a", "b", "c", "d"],
            "model": "tiny",
            "tokens": 1000,
            "variant": [G1, G1, G8, G8],
            "granularity": [1, 1, 8, 8],
            "seed": [0, 1, 0, 1],
        }
    )
    return df.assign(**params)


def test_report_flags_runs_that_repeated_data(tmp_path):
    spec = SyntheticStudy(
        name="rep",
        token_budgets=(20480,),
        seeds=(0,),
        params={G8: {"data.epochs": 2.5}, G1: {"data.epochs": 1.0}},
    )
    write_study(tmp_path / "rep", spec)
    text = write_report(tmp_path / "rep", n_boot=0).read_text()
    assert "## Comparability checks" in text
    assert "- **runs that repeated data** (`data.epochs`): 1 runs saw some tokens more than once" in text
    assert re.search(r"\| tiny \| 20480 \| moe-E8-k2-G8 \| 0 \| \w+ \| 0.003 \| 2.5 \|", text)


def test_repeated_data_check_is_ok_at_one_epoch_and_unknown_where_not_logged():
    assert repeated_data(_runs(**{"data.epochs": [1.0, 1.0, 0.5, 1.0]})).status == "ok"
    c = repeated_data(_runs(**{"data.epochs": [1.0, np.nan, 3.0, 1.0]}))
    assert c.status == "flagged" and c.offenders["run_key"].tolist() == ["c"]
    assert "not logged for 1 of 4 runs" in c.summary


def test_missing_fairness_params_make_checks_unknown_not_errors():
    checks = comparability_checks(_runs())
    assert [c.status for c in checks] == ["unknown"] * 6
    assert all(c.offenders.empty for c in checks)


def test_batch_scoped_expert_choice_is_flagged_and_position_scope_is_not():
    c = batch_expert_choice(
        _runs(
            **{
                "moe.router": ["softmax", "softmax", "expert_choice", "expert_choice"],
                "moe.expert_choice_scope": [np.nan, np.nan, "batch", "position"],
            }
        )
    )
    assert c.status == "flagged" and c.offenders["run_key"].tolist() == ["c"]
    c = batch_expert_choice(
        _runs(
            **{
                "moe.router": ["softmax"] * 2 + ["expert_choice"] * 2,
                "moe.expert_choice_scope": ["position"] * 4,
            }
        )
    )
    assert c.status == "ok"
    c = batch_expert_choice(_runs(**{"moe.router": ["expert_choice"] * 4}))  # scope not logged: unknown
    assert c.status == "unknown"


def test_auto_routed_scale_for_every_arm_is_one_convention_and_a_fixed_one_among_auto_is_flagged():
    # auto gives G for softmax and 1 for unnormalised sigmoid: both are the auto convention
    runs = _runs(
        **{"moe.routed_scale_used": [1.0, 1.0, 8.0, 1.0], "moe.routed_scale": [None, "None", None, None]}
    )
    assert routed_scale_mix(runs).status == "ok"
    g1_fixed = _runs(
        **{"moe.routed_scale_used": [1.0, 1.0, 8.0, 8.0], "moe.routed_scale": [1.0, 1.0, None, None]}
    )
    assert routed_scale_mix(g1_fixed).status == "ok"  # at G=1 a fixed 1 is what auto gives
    mixed = _runs(
        **{"moe.routed_scale_used": [1.0, 1.0, 8.0, 1.0], "moe.routed_scale": [None, None, None, 1.0]}
    )
    c = routed_scale_mix(mixed)  # G8 seed 1 is the routed_scale=1 ablation, compared with auto arms
    assert c.status == "flagged" and c.offenders["convention"].tolist() == ["any", "any", "auto", "fixed 1"]


def test_routed_scale_of_one_convention_is_ok_and_a_mix_is_flagged():
    assert routed_scale_mix(_runs(**{"moe.routed_scale_used": [1.0, 1.0, 8.0, 8.0]})).status == "ok"  # = G
    assert routed_scale_mix(_runs(**{"moe.routed_scale_used": [1.0] * 4})).status == "ok"  # constant
    mixed = _runs(**{"moe.routed_scale_used": [1.0, 1.0, 8.0, 1.0]})  # G8 seed 1 lost its scale
    c = routed_scale_mix(mixed)
    assert c.status == "flagged" and c.offenders["run_key"].tolist() == ["a", "b", "c", "d"]


def test_different_data_fingerprints_in_one_comparison_are_flagged():
    c = fingerprint_mix(_runs(**{"data.fingerprint": ["f1", "f1", "f2", "f2"]}))
    assert c.status == "flagged" and len(c.offenders) == 4
    assert c.offenders["data.fingerprint"].tolist() == ["f1", "f1", "f2", "f2"]
    assert fingerprint_mix(_runs(**{"data.fingerprint": ["f1"] * 4})).status == "ok"


def test_arms_validated_on_different_windows_or_token_counts_are_flagged():
    spread = {"data.val_windows": ["spread"] * 4}
    assert val_tokens_mix(_runs(**spread, **{"train.eval_tokens": [16384] * 4})).status == "ok"
    # a run from before data.val_windows took the first windows: not the same tokens as "spread"
    old = val_tokens_mix(
        _runs(
            **{"data.val_windows": ["spread", "spread", np.nan, "spread"], "train.eval_tokens": [16384] * 4}
        )
    )
    assert old.status == "flagged"
    assert old.offenders["val_set"].tolist() == [
        "spread x 16384",
        "spread x 16384",
        "first x 16384",
        "spread x 16384",
    ]
    fewer = val_tokens_mix(_runs(**spread, **{"train.eval_tokens": [16384, 16384, 8192, 8192]}))
    assert fewer.status == "flagged" and len(fewer.offenders) == 4
    assert val_tokens_mix(_runs(**spread)).status == "unknown"


def test_final_table_shows_each_variants_routed_scale(tmp_path):
    spec = SyntheticStudy(
        name="scale",
        token_budgets=(20480,),
        seeds=(0,),
        params={G1: {"moe.routed_scale_used": 1.0}, G8: {"moe.routed_scale_used": 8.0}},
    )
    write_study(tmp_path / "scale", spec)
    path = write_report(tmp_path / "scale", n_boot=0)
    finals = pd.read_csv(path.parent / "final_losses.csv").set_index("variant")
    assert finals.loc[G1, "routed_scale"] == 1 and finals.loc[G8, "routed_scale"] == 8
    assert "Learning rate: one per variant (`optim.lr` = 0.003); no best-LR selection." in path.read_text()


def test_run_finals_carries_the_lr_of_each_run(swept):
    s = load_files(swept[0])
    f = run_finals(curves(s.metrics, s.runs), s.runs)
    assert len(f) == 12 and sorted(f["lr"].unique()) == [1e-3, 3e-3, 1e-2]
