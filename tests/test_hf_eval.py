"""studies.eval: lm-evaluation-harness on exported points, logged to MLflow and to the report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the hf extra is not installed (pip install -e '.[hf]')")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from records import runfiles
from studies.eval import evaluate_study, main  # noqa: E402
from studies.job.execute import run_point  # noqa: E402
from studies.track import tracking  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    ("def f(x):\n    return", [" x", " ]]]]"], 0),
    ("import", [" os", " 7 7 7"], 0),
    ("for i in", [" range(10):", " :::"], 0),
    ("class", [" Foo:", " ))))"], 0),
]


def write_task(folder: Path) -> Path:
    """A 4-question multiple-choice task from local json files, as an lm-eval task YAML."""
    folder.mkdir()
    rows = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_code_mc.yaml").write_text(
        "task: tiny_code_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.mark.slow
def test_study_points_are_scored_logged_to_mlflow_and_reported_g1_vs_g8(compose, shrunk, tmp_path):
    for g in (1, 8):
        run_point(compose([*shrunk, f"granularity={g}", "train.checkpoint_every=10"]))
    study = tmp_path / "outputs" / "default"
    tasks = write_task(tmp_path / "tasks")
    # moe.train.loop keeps the final step's weights (step 20), so the DONE points export as they ended
    points = evaluate_study(study, ["tiny_code_mc"], include_path=tasks)
    assert sorted(p.granularity for p in points) == ["1", "8"]
    client = tracking.open_client(tracking.default_tracking_uri(study))
    for p in points:
        acc = p.scores["downstream/tiny_code_mc/acc"]
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert p.scores["downstream/avg_acc"] == acc
        run_dir = study / "runs" / p.run_key
        assert json.loads((run_dir / "downstream.json").read_text())["scores"] == p.scores
        run = client.get_run(runfiles.read_summary(run_dir)["mlflow_run_id"])
        assert run.data.metrics["downstream/avg_acc"] == acc
        assert (run_dir / "hf" / "model.safetensors").is_file()
    report = (study / "report" / "downstream.md").read_text()
    assert "| 1 | 1 |" in report and "| 8 | 1 |" in report and "G=8 vs G=1 average accuracy" in report
    # a second evaluation re-scores from lm-eval's cache and the existing exports
    again = evaluate_study(study, ["tiny_code_mc"], include_path=tasks)
    assert {p.run_key: p.scores for p in again} == {p.run_key: p.scores for p in points}
    # each point answers from its own store, keyed by its run key (a shared one answered G=8 from G=1's)
    stores = sorted(f.name for f in (study / "lm_eval_cache").iterdir())
    assert all(any(name.startswith(p.run_key) for name in stores) for p in points), stores
    assert not any(name.startswith("hf") for name in stores), stores
    # the study's report carries the comparison too, whichever of the two is written last
    from analysis.report import write_report

    write_report(study)
    full = (study / "report" / "report.md").read_text()
    assert full.count("## Downstream accuracy") == 1 and "G=8 vs G=1 average accuracy" in full


def test_unknown_task_and_an_empty_study_are_refused(tmp_path, capsys):
    (tmp_path / "study" / "runs").mkdir(parents=True)
    assert main([str(tmp_path / "study"), "--tasks", "tiny_code_mc"]) == 2
    assert "has no DONE point" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--tasks", "x"]) == 2
    assert "neither an exported model" in capsys.readouterr().err
