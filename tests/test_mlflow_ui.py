"""studies.track.study_view against a real `mlflow server` and headless Chromium: after a real `granularity=1,8`
sweep, the URL the sweep prints opens MLflow's UI on both points' val/loss and train/loss curves, the
parent run carries the study's summary, and a server that refuses the view is reported, not raised."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from test_server import assert_not_blank, chromium, chromium_run, page_text

from studies.server import free_port
from studies.track import tracking
from studies.track.study_view import (
    LOSS_KEYS,
    RUN_NOTE_TAG,
    VIEW_KEY,
    VIEW_NAME,
    VIEW_TAG_PREFIX,
    experiment_url,
    publish_study_view,
    savings_metrics,
    ui_base,
    view_state,
    view_tag_value,
    view_url,
)

# The tests of the served sweep (conftest.served_sweep) share one worker, which trains it once.
pytestmark = pytest.mark.xdist_group("served_sweep")


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains `text` (the test's tmp dir: server store, browser profile)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if text in line and not line.split()[1].startswith("Z")]


@pytest.fixture(scope="module")
def published_study(served_sweep):
    """The served sweep (conftest) with the study view published on it, as the sweep's end does:
    (tracking url, experiment id, parent run id, StudyView, tmp dir)."""
    url, tmp, exp_id = served_sweep.url, served_sweep.tmp, served_sweep.experiment_id
    (parent,) = MlflowClient(url).search_runs([exp_id], "tags.kind = 'sweep'")
    report = tmp / "outputs" / "default" / "report" / "report.md"
    assert report.exists()
    view = publish_study_view(url, parent.info.run_id, "default", Path(parent.data.tags["sweep_dir"]), report)
    yield url, exp_id, parent.info.run_id, view, tmp
    assert processes_mentioning(str(tmp / "profile")) == [], "chromium left processes behind"


@pytest.mark.slow
def test_the_experiment_url_opens_the_training_runs_not_the_genai_overview(published_study):
    url, exp_id, _, _, tmp = published_study
    assert (
        MlflowClient(url).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    )
    page_url = experiment_url(url, exp_id)
    png = tmp / "experiment.png"
    chromium_run(page_url, f"--screenshot={png}", tmp / "profile-experiment-shot")
    text = page_text(page_url, tmp / "experiment")
    runs = MlflowClient(url).search_runs([exp_id])  # the sweep's parent run and its 2 points
    (parent,) = [r.info.run_name for r in runs if r.data.tags.get("kind") == "sweep"]
    # the runs table of the training view (points fold under their parent), not the GenAI overview
    assert f"{len(runs)} matching runs" in text and parent in text, text[-2000:]
    assert "Run Name" in text and "Duration" in text, text[-2000:]
    assert_not_blank(Image.open(png).convert("RGB"))
    assert processes_mentioning(str(tmp / "profile")) == [], "chromium left processes behind"


@pytest.mark.slow
def test_printed_url_opens_on_every_points_val_and_train_loss_curves(published_study):
    url, exp_id, _, view, tmp = published_study
    chromium()  # skips the test when no headless browser is installed
    assert view.problems == [] and view.url == view_url(url, exp_id)
    assert view.url in view.hint()
    points = [r.info.run_name for r in MlflowClient(url).search_runs([exp_id], "tags.kind = 'point'")]
    assert len(points) == 2

    # The view as the "Views" menu opens it (table): the points listed flat, not folded under the parent.
    table_png = tmp / "study-view-table.png"
    table_url = view_url(url, exp_id, mode="TABLE")
    chromium_run(table_url, f"--screenshot={table_png}", tmp / "profile-table-shot")
    table = page_text(table_url, tmp / "table")
    assert VIEW_NAME in table and "2 matching runs" in table
    assert all(name in table for name in points)

    # Exactly the URL the sweep prints: the chart view with one val/loss and one train/loss chart,
    # each with a series per point (the legend reads "<run name> (<metric>)").
    chart_png = tmp / "study-view-chart.png"
    chromium_run(view.url, f"--screenshot={chart_png}", tmp / "profile-chart-shot")
    charts = page_text(view.url, tmp / "chart")
    assert (
        "Loss curves (2)" in charts
        and "No charts in this section" not in charts.split("Loss curves")[1][:200]
    )
    section = charts[charts.index("Loss curves (2)") :]
    for key in LOSS_KEYS:
        assert f" {key} " in section, key
        for name in points:
            assert f"{name} ({key})" in section, (name, key)
    for png in (table_png, chart_png):
        assert_not_blank(Image.open(png).convert("RGB"))
    assert processes_mentioning(str(tmp / "profile")) == [], "chromium left processes behind"


@pytest.mark.slow
def test_parent_run_carries_the_savings_the_findings_and_the_report(published_study):
    url, exp_id, parent_id, view, tmp = published_study
    client = MlflowClient(url)
    parent = client.get_run(parent_id)
    savings_csv = tmp / "outputs" / "default" / "report" / "savings.csv"
    if savings_csv.exists():  # the 20-step study may be too short for a savings fit; then none is logged
        assert any(k.startswith("savings_steps/") for k in parent.data.metrics), parent.data.metrics
    note = parent.data.tags[RUN_NOTE_TAG]
    assert view.url in note and "report/report.md" in note
    assert "report/report.md" in [a.path for a in client.list_artifacts(parent_id, "report")]
    tag = client.get_experiment(exp_id).tags[VIEW_TAG_PREFIX + VIEW_KEY]
    assert VIEW_NAME in tag
    # Publishing again (the next sweep) replaces the view and keeps its creation time.
    again = publish_study_view(url, parent_id, "default", tmp, None)
    assert again.problems == [] and again.url == view.url
    assert (
        client.get_experiment(exp_id).tags[VIEW_TAG_PREFIX + VIEW_KEY].split('"createdAt": ')[1][:13]
        == (tag.split('"createdAt": ')[1][:13])
    )


@pytest.mark.slow
def test_a_server_that_refuses_the_view_is_reported_and_nothing_raises(published_study):
    url, _, _, _, tmp = published_study
    # A deleted experiment: the server refuses its tags and its runs' writes.
    parent = tracking.start_run(
        url, "deleted-study", tmp / "unused", run_name="sweep-x", tags={"kind": "sweep"}
    )
    client = MlflowClient(url)
    client.delete_experiment(client.get_experiment_by_name("deleted-study").experiment_id)
    report = tmp / "outputs" / "default" / "report" / "report.md"
    view = publish_study_view(url, parent, "deleted-study", tmp, report)
    assert view.url is None
    assert any("saving the loss-curve view (experiment tag) failed" in p for p in view.problems), (
        view.problems
    )
    assert "the sweep is recorded regardless" in view.hint()
    # No server at all: said so within MLflow's shortened HTTP retries.
    dead = f"http://127.0.0.1:{free_port()}"
    gone = publish_study_view(dead, "0" * 32, "default", tmp, None)
    assert gone.url is None and gone.problems and "finding experiment 'default' failed" in gone.problems[0]
    # A store that has no such study.
    missing = publish_study_view(url, None, "no-such-study", tmp, None)
    assert missing.url is None and missing.problems == [f"experiment 'no-such-study' not found in {url}"]


# Fast checks: the view against the installed MLflow UI bundle, and the pure helpers ------------------

UI_STATE_KEYS = ("runsHiddenMode", "isAccordionReordered", "compareRunSections", "compareRunCharts")
SEARCH_KEYS = ("searchFilter", "orderByKey", "orderByAsc")


def ui_bundle() -> str:
    """The installed MLflow UI's JavaScript, where the saved-view tag and the state keys it reads live."""
    import mlflow

    build = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "\n".join(p.read_text(errors="replace") for p in sorted(build.glob("*.js")))


def test_view_state_uses_only_what_the_installed_mlflow_ui_reads_from_a_saved_view():
    bundle = ui_bundle()
    # The tag prefix, the URL parameter and the chart-mode parameter the page reads.
    assert (
        f'"{VIEW_TAG_PREFIX}"' in bundle and '"viewStateShareKey"' in bundle and '"compareRunsMode"' in bundle
    )
    # A shared view keeps the picked search facets and UI state keys, minus runsExpanded & co.
    assert '["searchFilter","orderByKey","orderByAsc","startTime"' in bundle
    ui_keys = bundle[bundle.index('["selectedColumns","columnOrder"') :].split("]", 1)[0]
    dropped = bundle[bundle.index('["runsExpanded","runsPinned"') :].split("]", 1)[0]
    state = view_state()
    assert set(state) == {*UI_STATE_KEYS, *SEARCH_KEYS}
    for key in UI_STATE_KEYS:
        assert f'"{key}"' in ui_keys and f'"{key}"' not in dropped, key
    # The envelope the Views menu parses: a string name, a number createdAt, the state as a string.
    envelope = json.loads(view_tag_value(state, 1, 2))
    assert (
        envelope["name"] == VIEW_NAME
        and envelope["createdAt"] == 1
        and json.loads(envelope["state"]) == state
    )


def test_view_url_points_at_the_server_or_the_local_mlflow_ui():
    assert view_url(ui_base("http://login01:5000/"), "3") == (
        "http://login01:5000/#/experiments/3/runs?viewStateShareKey=study-loss-curves&compareRunsMode=CHART"
        "&workflowType=machine_learning"
    )
    assert experiment_url("http://login01:5000", "3") == (
        "http://login01:5000/#/experiments/3/runs?workflowType=machine_learning"
    )
    # the bundle reads both: the workflow from the URL, the kind from the experiment's tag
    bundle = ui_bundle()
    assert 'MACHINE_LEARNING="machine_learning"' in bundle and '"mlflow.experimentKind"' in bundle
    assert 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in bundle
    assert ui_base("sqlite:////tmp/study/mlflow.db") == "http://127.0.0.1:5000"


def test_savings_become_parent_metrics_and_failed_fits_are_left_out(tmp_path):
    csv_path = tmp_path / "savings.csv"
    csv_path.write_text(
        "model,tokens,variant,savings_steps,savings_tokens,savings_flops\n"
        "tiny,1000,moe-G8,0.25,0.25,0.2\n"
        "tiny,1000,moe-G4,,,\n"
        "tiny,2000,moe-G2,0.1,0.1,0.05\n"
        "small,2000,moe-G2,0.3,0.3,nan\n"
    )
    assert savings_metrics(csv_path) == {
        "savings_steps/moe-G8": 0.25,
        "savings_tokens/moe-G8": 0.25,
        "savings_flops/moe-G8": 0.2,
        "savings_steps/moe-G2/tiny/2000": 0.1,
        "savings_tokens/moe-G2/tiny/2000": 0.1,
        "savings_flops/moe-G2/tiny/2000": 0.05,
        "savings_steps/moe-G2/small/2000": 0.3,
        "savings_tokens/moe-G2/small/2000": 0.3,
    }
