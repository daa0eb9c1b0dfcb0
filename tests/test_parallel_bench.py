"""The parallel-layout benchmark (python -m moe.parallel.bench) runs the real loop on gloo ranks and
reports every layout's step time against DDP's; bad arguments are refused before any rank starts."""

import pytest

from moe.parallel.bench import main


def test_a_batch_that_does_not_split_into_whole_sequences_per_rank_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--batch-tokens", "768", "--nproc", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-tokens=768" in err and "--nproc=2" in err


@pytest.mark.parametrize(
    "flag, value", [("--nproc", "0"), ("--steps", "3"), ("--rounds", "0"), ("--batch-tokens", "0")]
)
def test_counts_below_what_the_bench_needs_are_refused_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main([flag, value])
    assert exc.value.code == 2
    assert f"{flag}={value}" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_reports_each_layouts_step_time_as_a_ratio_to_ddp(tmp_path):
    report = main(["--steps", "4", "--rounds", "1", "--batch-tokens", "512", "--cache-dir", str(tmp_path)])
    assert report["batch_tokens"] == 512 and report["nproc"] == 2
    layouts = report["layouts"]
    assert set(layouts) == {"ddp", "fsdp", "fsdp_keep", "fsdp_ep2"}
    assert layouts["ddp"]["ratio"] == 1.0
    for r in layouts.values():
        assert r["step_s"] > 0 and r["windows"] == 1
        assert r["ratio"] == pytest.approx(r["step_s"] / layouts["ddp"]["step_s"])
