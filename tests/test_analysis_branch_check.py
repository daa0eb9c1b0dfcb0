"""analysis.branch_check pairs each WSD point with the cosine run of its variant, budget and seed, and says
whether the schedule moved the final loss beyond the seed noise; it refuses pairs that differ in more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.branch_check import SAME, compare, finished, main


def write_run(study: Path, key: str, *, schedule: str, tokens: int, seed: int, loss: float, **params) -> None:
    d = study / "runs" / key
    d.mkdir(parents=True)
    summary = {
        "run_key": key,
        "status": "DONE",
        "final": {"val/loss_final": loss},
        "tags": {"variant": "moe-E8-k2-G1", "model": "tiny", "budget_tokens": str(tokens), "seed": str(seed)},
        "params": {"optim.schedule": schedule, **{k: 1 for k in SAME}, **params},
    }
    (d / "summary.json").write_text(json.dumps(summary))


def studies(tmp_path: Path, shift: float, **wsd_params) -> tuple[Path, Path]:
    wsd, cos = tmp_path / "wsd", tmp_path / "cos"
    for seed, noise in enumerate([0.0, 0.03, -0.02]):
        write_run(cos, f"c{seed}", schedule="cosine", tokens=1000, seed=seed, loss=4.0 + noise)
        write_run(
            wsd,
            f"w{seed}",
            schedule="wsd",
            tokens=1000,
            seed=seed,
            loss=4.0 + noise + shift + 0.002 * seed,
            **wsd_params,
        )
    return wsd, cos


def test_a_branch_that_lands_on_the_cosine_loss_is_within_seed_noise(tmp_path):
    wsd, cos = studies(tmp_path, shift=0.001)
    (row,) = compare(finished(wsd), finished(cos)).itertuples(index=False)
    assert row.seeds == 3 and row.within_noise and row.mean_diff == pytest.approx(0.003)
    assert row.diffs == "+0.0010,+0.0030,+0.0050"


def test_a_branch_far_above_the_cosine_loss_is_not_within_seed_noise(tmp_path):
    wsd, cos = studies(tmp_path, shift=0.2)
    (row,) = compare(finished(wsd), finished(cos)).itertuples(index=False)
    assert not row.within_noise and row.ci_lo > 0


def test_pairs_that_differ_in_more_than_the_schedule_are_refused_naming_the_param(tmp_path):
    wsd, cos = studies(tmp_path, shift=0.0, **{"optim.lr": 2})
    with pytest.raises(ValueError, match=r"optim.lr differs between WSD runs \['w0', 'w1', 'w2'\]"):
        compare(finished(wsd), finished(cos))


def test_the_cli_prints_one_sentence_per_budget_and_refuses_a_folder_without_runs(tmp_path, capsys):
    wsd, cos = studies(tmp_path, shift=0.001)
    assert main([str(wsd), "--against", str(cos), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "moe-E8-k2-G1 at 1,000 tokens: WSD - cosine = +0.0030" in out and "within seed noise" in out
    assert (tmp_path / "t.csv").exists()
    assert main([str(tmp_path / "nowhere"), "--against", str(cos)]) == 2
    assert "is not a study folder (no runs/ inside)" in capsys.readouterr().err
