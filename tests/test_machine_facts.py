"""Machine facts: every run records where it trained, and the report flags arms that trained apart."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis.checks import MACHINE, comparability_checks, machine_caveat, machine_mix
from analysis.findings import read_findings
from analysis.load import load_files
from analysis.report import write_report
from analysis.synthetic import SyntheticStudy, write_study
from studies.job.execute import run_point
from studies.job.record import machine_facts, machine_params

G1, G8 = "moe-E8-k2-G1", "moe-E8-k2-G8"
HERE = {
    "machine.threads": 1,
    "machine.cpu_capability": "AVX2",
    "machine.torch": "2.5.1",
    "machine.device": "cpu",
}


def test_machine_facts_are_what_torch_reports_on_this_process(one_thread):
    facts = machine_facts("cpu")
    assert facts == {
        "threads": 1,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": "cpu",
    }
    # what a run logs is exactly what analysis.checks reads
    assert machine_params(facts) == {f"machine.{k}": v for k, v in facts.items()}
    assert set(machine_params(facts)) == set(MACHINE)


@pytest.fixture
def finished(compose, shrunk, tmp_path, one_thread):
    result = run_point(compose([*shrunk, "granularity=2"]))
    return result, tmp_path / "outputs" / "default"


def test_a_run_records_its_machine_in_summary_mlflow_params_and_tags(finished):
    result, study_dir = finished
    want = machine_facts("cpu")
    summary = json.loads((study_dir / "runs" / result.run_key / "summary.json").read_text())
    assert summary["machine"] == want and summary["threads"] == 1
    assert {k: summary["params"][k] for k in MACHINE} == machine_params(want)
    run = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}").get_run(result.mlflow_run_id)
    for key, value in machine_params(want).items():
        assert run.data.params[key] == str(value), key
        assert run.data.tags[key] == str(value), key
    # the analysis side reads them back as params; one machine for every run: ok
    runs = load_files(study_dir).runs
    assert runs.loc[0, "machine.cpu_capability"] == want["cpu_capability"]
    assert machine_mix(runs).status == "ok"


def _runs(**differ):
    """G1 and G8 at seeds 0 and 1, all on HERE except the four values given per param."""
    df = pd.DataFrame(
        {
            "run_key": list("abcd"),
            "model": "tiny",
            "tokens": 1000,
            "variant": [G1, G1, G8, G8],
            "granularity": [1, 1, 8, 8],
            "seed": [0, 1, 0, 1],
        }
    )
    return df.assign(**{**HERE, **differ})


@pytest.mark.parametrize(
    ("param", "values"),
    [
        ("machine.threads", [1, 1, 2, 2]),
        ("machine.cpu_capability", ["AVX2", "AVX2", "AVX512", "AVX512"]),
        ("machine.torch", ["2.5.1", "2.5.1", "2.5.1", "2.6.0"]),
        ("machine.device", ["cpu"] * 3 + ["NVIDIA H100"]),
    ],
)
def test_arms_on_different_threads_cpu_capability_torch_or_device_are_flagged(param, values):
    c = machine_mix(_runs(**{param: values}))
    assert c.status == "flagged" and c.offenders["run_key"].tolist() == list("abcd")
    assert c.summary.startswith("4 runs are in comparisons whose arms ran with different torch threads")
    assert c.offenders[param].tolist() == values
    shown = " vs ".join(sorted({format(v, "g") if isinstance(v, int) else v for v in values}))
    assert machine_caveat(c.offenders) == (
        f"the runs ran on different machines ({param} {shown}), which moves the loss beyond seed noise"
    )


def test_one_machine_for_every_arm_is_ok_and_comparisons_are_checked_apart():
    assert machine_mix(_runs()).status == "ok"
    # another token budget on another machine is another comparison: not a mix
    other = _runs(**{"machine.threads": 2}).assign(tokens=2000, run_key=list("efgh"))
    assert machine_mix(pd.concat([_runs(), other], ignore_index=True)).status == "ok"


def test_runs_from_stores_without_machine_facts_are_unknown_never_an_error():
    old = _runs().drop(columns=list(MACHINE))
    c = machine_mix(old)
    assert c.status == "unknown" and c.offenders.empty
    assert c.summary == f"none found, but {', '.join(MACHINE)} not logged for 4 of 4 runs (unknown)"
    assert comparability_checks(old)[-1].name == "arms run on different machines"
    # one old run among logged ones: the rest still agree, so unknown, not flagged
    partial = _runs(**{"machine.threads": [1, 1, 1, np.nan]})
    assert machine_mix(partial).status == "unknown"


def test_report_flags_arms_run_on_different_machines_and_the_finding_says_so(tmp_path):
    spec = SyntheticStudy(
        name="apart",
        token_budgets=(20480,),
        seeds=(0,),
        params={G1: HERE, G8: {**HERE, "machine.cpu_capability": "AVX512"}},
    )
    write_study(tmp_path / "apart", spec)
    path = write_report(tmp_path / "apart", n_boot=0)
    text = path.read_text()
    assert "- **arms run on different machines** (`machine.threads`, `machine.cpu_capability`, " in text
    assert "2 runs are in comparisons whose arms ran with different torch threads, CPU capability" in text
    (finding,) = read_findings(path)
    caveats = finding.split(" Caveats: ")[1]
    assert "the runs ran on different machines (machine.cpu_capability AVX2 vs AVX512)" in caveats
