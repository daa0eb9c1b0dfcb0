"""The study as MLflow's UI opens it: a saved view of the experiment with every point's loss curves.

MLflow 3.17's experiment page keeps its view state (chart mode, visible runs, chart layout) in the
browser, and collapses child runs under their parent: a study opens on one parent row and an empty chart
view. What the UI does read from the server is a *saved view*: an experiment tag
`mlflow.sharedViewState.<key>` holding `{"name", "createdAt", "updatedAt", "state"}` (state: the page's
search facets and UI state as a JSON string). It is listed in the page's "Views" menu and opened by
`#/experiments/<id>/runs?viewStateShareKey=<key>`; `compareRunsMode=CHART` in the same URL picks the chart
view (that mode is only ever read from the URL). docs/tracking.md says why this mechanism, and its limits.

The view here: runs tagged `kind=point` (every sweep's points, not the parent runs), sorted by val/loss
(a sort other than creation time lists child runs flat instead of folding them under their parent), all
of them visible, and a first chart section with val/loss and train/loss line charts over steps.
The parent run gets the study's savings as metrics and the findings as its description.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from studies.track.tracking import is_server, open_client

log = logging.getLogger(__name__)

VIEW_KEY = "study-loss-curves"  # one per experiment: every sweep overwrites it with the same view
VIEW_NAME = "Loss curves of every point"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the MLflow UI's saved-view tags (server/js/build)
SHARE_PARAM = "viewStateShareKey"
LOSS_KEYS = ("val/loss", "train/loss")
POINT_FILTER = "tags.kind = 'point'"
LOCAL_UI = "http://127.0.0.1:5000"  # where `tracking.ui_command` tells users to open `mlflow ui`
RUN_NOTE_TAG = "mlflow.note.content"  # a run's description, shown on its overview page
MAX_NOTE_CHARS = 8000  # MLflow's run tag value limit
# report/savings.csv columns logged on the parent run (means over seeds; time from `time/train_s`)
SAVINGS_COLUMNS = ("savings_steps", "savings_tokens", "savings_flops", "savings_time", "tokens_per_s_ratio")


@dataclass(frozen=True)
class StudyView:
    """What publish_study_view did: the URL that opens on the curves, and each step that failed."""

    url: str | None
    """The UI URL of the loss-curve view; None when the view could not be published."""
    problems: list[str] = field(default_factory=list)
    """One line per failed publishing step (the step, the error); empty when all went through."""

    def hint(self) -> str:
        """The end-of-sweep lines about MLflow's view of the study."""
        lines = []
        if self.url:
            lines.append(f"MLflow study view (loss curves of every point): {self.url}")
        lines += [f"MLflow study view: {p}; the sweep is recorded regardless" for p in self.problems]
        return "\n".join(lines)


# Pure parts: the view state, its tag and its URL ---------------------------------------------------


def _line_chart(key: str, section: str) -> dict[str, Any]:
    """A LINE chart card as the UI stores it (RunsChartsLineCardConfig's fields), over optimiser steps."""
    return {
        "uuid": f"study-{key.replace('/', '-')}",
        "type": "LINE",
        "metricSectionId": section,
        "metricKey": key,
        "selectedMetricKeys": [key],
        "displayName": key,
        "deleted": False,
        "isGenerated": False,
        "runsCountToCompare": 100,
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "lineSmoothness": 0,
        "range": {},
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def view_state(metric_keys: tuple[str, ...] = LOSS_KEYS) -> dict[str, Any]:
    """The experiment page state of the study view. isAccordionReordered keeps the loss section first:
    otherwise the UI sorts sections by name and the charts it generates for the other metrics (router/...,
    lr, ...) come before it."""
    section = "study-loss"
    return {
        "searchFilter": POINT_FILTER,
        "orderByKey": f"metrics.`{metric_keys[0]}`",
        "orderByAsc": True,
        "runsHiddenMode": "SHOW_ALL",  # the UI's default shows the first 10 runs only
        "isAccordionReordered": True,
        "compareRunSections": [
            {
                "uuid": section,
                "name": "Loss curves",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "compareRunCharts": [_line_chart(key, section) for key in metric_keys],
    }


def view_tag_value(state: dict[str, Any], created_ms: int, updated_ms: int) -> str:
    """The saved-view envelope the UI parses (a name and creation time, the state as a JSON string)."""
    return json.dumps(
        {"name": VIEW_NAME, "createdAt": created_ms, "updatedAt": updated_ms, "state": json.dumps(state)}
    )


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, or `mlflow ui` on a local store."""
    return tracking_uri.rstrip("/") if is_server(tracking_uri) else LOCAL_UI


WORKFLOW = {"workflowType": "machine_learning"}  # the runs page, not MLflow 3's GenAI overview


def view_url(base: str, experiment_id: str, key: str = VIEW_KEY, mode: str = "CHART") -> str:
    query = urllib.parse.urlencode({SHARE_PARAM: key, "compareRunsMode": mode, **WORKFLOW})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs page in the training view (its plain URL opens the GenAI overview)."""
    return f"{base}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(WORKFLOW)}"


def savings_metrics(savings_csv: Path) -> dict[str, float]:
    """report/savings.csv as parent-run metrics: `savings_steps/<variant>` (and tokens, flops, time,
    tokens_per_s_ratio), with `/<model>/<tokens>` appended when a variant is compared in several groups;
    values that are not a number (not reached, no `time/train_s`) are left out."""
    with savings_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    variants = [r["variant"] for r in rows]
    out: dict[str, float] = {}
    for r in rows:
        name = (
            r["variant"]
            if variants.count(r["variant"]) == 1
            else f"{r['variant']}/{r['model']}/{r['tokens']}"
        )
        for col in SAVINGS_COLUMNS:
            try:
                value = float(r.get(col) or "nan")
            except ValueError:
                continue
            if math.isfinite(value):
                out[f"{col}/{name}"] = value
    return out


def parent_note(findings: list[str], url: str | None, report_artifact: str | None, sweep_dir: Path) -> str:
    """The parent run's description: the findings, where the curves, the report and the sweep folder are."""
    lines = ["Study findings:", *(f"- {f}" for f in findings)] if findings else []
    if url:
        lines.append(f"\nLoss curves of every point: {url}")
    if report_artifact:
        lines.append(f"\nReport with figures: artifact `{report_artifact}` of this run.")
    if lines:
        lines.append(f"\nSweep folder: `{sweep_dir}`")
    return "\n".join(lines)[:MAX_NOTE_CHARS]


# Publishing: each step on its own, so one refusal leaves the others done ---------------------------


def _step(problems: list[str], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None with the failure appended to problems."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the view is a convenience: a refusal never fails a sweep
        first_line = (str(exc).splitlines() or [""])[0][:300]
        problems.append(f"{what} failed ({type(exc).__name__}: {first_line})")  # printed by StudyView.hint
        return None


def _publish_view(client: MlflowClient, experiment_id: str) -> bool:
    exp = client.get_experiment(experiment_id)
    old = exp.tags.get(VIEW_TAG_PREFIX + VIEW_KEY)
    now = int(time.time() * 1000)
    created = now
    if old:  # keep the view's creation time: the Views menu sorts by it
        try:
            created = int(json.loads(old)["createdAt"])
        except (ValueError, KeyError, TypeError):
            created = now
    client.set_experiment_tag(
        experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, view_tag_value(view_state(), created, now)
    )
    return True


def _log_report(client: MlflowClient, parent_run_id: str, report_dir: Path) -> str:
    """The report folder as the parent's `report/` artifacts, unless analysis.report logged it already."""
    if not any(a.path == "report/report.md" for a in client.list_artifacts(parent_run_id, "report")):
        client.log_artifacts(parent_run_id, str(report_dir), artifact_path="report")
    return "report/report.md"


def publish_study_view(
    tracking_uri: str,
    parent_run_id: str | None,
    experiment_name: str,
    sweep_dir: Path,
    report_path: Path | None,
) -> StudyView:
    """Publish the study's loss-curve view on its experiment and the study's summary on the sweep's parent
    run (savings metrics, findings as description, the report as artifacts). Never raises: every failed
    step is one line of StudyView.problems (printed by StudyView.hint), and the sweep goes on."""
    problems: list[str] = []
    client = _step(problems, f"opening {tracking_uri}", open_client, tracking_uri)
    if client is None:
        return StudyView(None, problems)
    exp = _step(
        problems, f"finding experiment {experiment_name!r}", client.get_experiment_by_name, experiment_name
    )
    if exp is None:
        if not problems:
            problems.append(f"experiment {experiment_name!r} not found in {tracking_uri}")
        return StudyView(None, problems)
    published = _step(
        problems, "saving the loss-curve view (experiment tag)", _publish_view, client, exp.experiment_id
    )
    url = view_url(ui_base(tracking_uri), exp.experiment_id) if published else None
    if parent_run_id:
        _summarise_parent(client, parent_run_id, url, report_path, Path(sweep_dir), problems)
    log.debug("MLflow study view of %s (sweep %s): %s", experiment_name, Path(sweep_dir).name, url)
    return StudyView(url, problems)


def _summarise_parent(
    client: MlflowClient,
    parent_run_id: str,
    url: str | None,
    report_path: Path | None,
    sweep_dir: Path,
    problems: list[str],
) -> None:
    """Savings as metrics, findings and links as the description, the report as artifacts."""
    report_artifact = None
    findings: list[str] = []
    if report_path is not None and Path(report_path).exists():
        report_dir = Path(report_path).parent
        report_artifact = _step(
            problems, "logging the report on the parent run", _log_report, client, parent_run_id, report_dir
        )
        findings_file = report_dir / "findings.txt"  # analysis.findings.FINDINGS_FILE
        if findings_file.exists():
            text = _step(problems, f"reading {findings_file}", findings_file.read_text) or ""
            findings = [line for line in text.splitlines() if line.strip()]
        savings_csv = report_dir / "savings.csv"
        if savings_csv.exists():
            metrics = _step(problems, f"reading {savings_csv}", savings_metrics, savings_csv) or {}
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
            if batch:
                _step(
                    problems, "logging the savings on the parent run", client.log_batch, parent_run_id, batch
                )
    note = parent_note(findings, url, report_artifact, sweep_dir)
    if note:
        _step(
            problems,
            "setting the parent run's description",
            client.set_tag,
            parent_run_id,
            RUN_NOTE_TAG,
            note,
        )
