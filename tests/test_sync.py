"""Tracker outages: the MLflow logger never stalls or fails training, and `python -m studies.sync`
backfills MLflow from the run folders idempotently (against sqlite stores and a real, killed server)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
from conftest import SHRINK
from helpers import healthy, run_module, start_study
from mlflow.tracking import MlflowClient

from studies.job.execute import run_point
from studies.server import ServerSettings, free_port, running_server
from studies.sync import read_metrics, sync_study
from studies.track import mlflow_logger, tracking

FAKE_RUN_ID = "0123456789abcdef0123456789abcdef"


def histories(client: MlflowClient, run_id: str, keys) -> dict[tuple[str, int], float]:
    out = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            assert (key, m.step) not in out, f"duplicated step {m.step} of {key}"
            out[(key, m.step)] = m.value
    return out


def assert_same_values(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if not (got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])))]
    assert not bad, bad[:5]


# metrics.jsonl reading -----------------------------------------------------------------------------


def test_read_metrics_keeps_the_last_value_per_key_and_step_and_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "train/loss": 5.0, "lr": 0.1}\n'
        '{"step": 2, "train/loss": 4.0}\n'
        '{"step": 2, "val/loss": 4.5}\n'
        '{"step": 2, "train/loss": 3.5}\n'  # a resumed run logged step 2 again
        '{"step": 3, "train/lo'  # killed mid-write
    )
    assert read_metrics(path) == {
        ("train/loss", 1): 5.0,
        ("lr", 1): 0.1,
        ("train/loss", 2): 3.5,
        ("val/loss", 2): 4.5,
    }


def test_read_metrics_rejects_a_corrupt_line_before_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lr": 0.1}\nnot json\n{"step": 2, "lr": 0.2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not JSON"):
        read_metrics(path)


# The logger while MLflow is down ----------------------------------------------------------------


def test_logger_returns_at_once_and_gives_up_in_bounded_time_when_mlflow_is_unreachable():
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    logger = mlflow_logger.MlflowLogger(uri, FAKE_RUN_ID, flush_every_s=0.05, flush_timeout_s=2.0)
    t0 = time.perf_counter()
    logger.log_params({"model.d_model": 32})
    logger.set_tags({"variant": "dense"})
    for step in range(1, 201):
        logger.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step)
    queued_s = time.perf_counter() - t0
    assert queued_s < 1.0, f"200 log_metrics calls took {queued_s:.2f} s: the training loop waited on MLflow"

    t0 = time.perf_counter()
    assert logger.flush() is False
    flush_s = time.perf_counter() - t0
    assert 1.9 < flush_s < 4.0, flush_s
    assert logger.pending == 400 + 2  # 400 metrics, params, tags: kept for a retry, not dropped
    _wait_for(lambda: logger.last_error is not None, 15, "the first failed send")  # one request: ~3-5 s
    assert "Connection" in logger.last_error and logger.pending == 402

    t0 = time.perf_counter()
    assert tracking.end_run(uri, FAKE_RUN_ID, ok=True) is False
    assert time.perf_counter() - t0 < 15.0  # 2 short HTTP retries, not MLflow's default ~4 minutes


def test_logger_drops_a_write_mlflow_rejects_and_delivers_the_rest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "s", tmp_path / "art", run_name="r", tags={"kind": "point"})
    logger = mlflow_logger.MlflowLogger(uri, run_id, flush_every_s=60.0)
    logger.log_params({"a": 1})
    logger.log_params({"a": 2})  # params are immutable: MLflow refuses the change
    logger.log_metrics({"train/loss": 2.0}, 1)
    assert logger.flush() is True
    assert len(logger.rejected) == 1 and "param" in logger.rejected[0].lower()
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"train/loss": 2.0}


# sync --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_sync_into_an_empty_store_recreates_the_point_run_and_a_second_sync_adds_nothing(
    compose, shrunk, tmp_path
):
    result = run_point(compose([*shrunk, "granularity=2"]))
    study_dir = tmp_path / "outputs" / "default"
    run_dir = study_dir / "runs" / result.run_key
    original = MlflowClient(tracking.default_tracking_uri(study_dir)).get_run(result.mlflow_run_id)
    local = read_metrics(run_dir / "metrics.jsonl")

    other = f"sqlite:///{tmp_path / 'other.db'}"  # e.g. the study moved to a tracking server
    (first,) = sync_study(study_dir, other)
    assert first.created and first.metrics_added == len(local) and first.status_set == "FINISHED"
    assert sorted(first.artifacts_added) == ["config.yaml", "metrics.jsonl", "summary.json"]
    client = MlflowClient(other)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == original.data.params
    assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {
        **{k: v for k, v in original.data.tags.items() if not k.startswith("mlflow.")},
        "synced_from": "studies.sync",
    }
    assert_same_values(histories(client, first.run_id, {k for k, _ in local}), local)

    (second,) = sync_study(study_dir, other)
    assert second.run_id == first.run_id and not second.changed and second.metrics_added == 0
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sync_of_a_folder_without_runs_names_the_problem(tmp_path):
    proc = run_module("studies.sync", [str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "has no runs/ folder" in proc.stderr


# A real tracking server killed mid-run ------------------------------------------------------------


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_server_killed_mid_run_training_completes_and_sync_backfills_mlflow_exactly(data_cache, tmp_path):
    store = tmp_path / "server"
    settings = ServerSettings(
        f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts"), port=free_port(), workers=1
    )
    overrides = [
        *SHRINK,
        f"data.cache_dir={data_cache}",
        f"paths.root={tmp_path / 'outputs'}",
        "infra=basic",
        "tokens=204800",
        "train.log_every=1",
        "train.eval_every=50",
        "tracking.flush_every_s=0.2",
        f"tracking.uri={settings.url}",
    ]
    study_dir = tmp_path / "outputs" / "default"
    log = open(tmp_path / "server.log", "w")
    with running_server(settings, log=log) as server:
        job = start_study(
            overrides, tmp_path, stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT
        )
        jsonl = lambda: next(iter(study_dir.glob("runs/*/metrics.jsonl")), None)  # noqa: E731
        _wait_for(
            lambda: jsonl() is not None and len(jsonl().read_text().splitlines()) >= 30,
            180,
            "30 logged steps",
        )
        client = MlflowClient(server.url)
        run_id = client.search_runs([client.get_experiment_by_name("default").experiment_id])[0].info.run_id
        _wait_for(lambda: len(client.get_metric_history(run_id, "train/loss")) >= 10, 60, "metrics in MLflow")
        os.killpg(server.process.pid, signal.SIGKILL)  # the whole server group, no clean shutdown
        _wait_for(lambda: not healthy(server.local_url), 30, "the server to die")
        steps_at_kill = len(jsonl().read_text().splitlines())
        assert job.poll() is None, "the run ended before the server was killed: the test proves nothing"
    job_log = lambda: (tmp_path / "job.log").read_text()  # noqa: E731
    _wait_for(lambda: job.poll() is not None, 300, "the run to finish")
    # From the last metric written to the process's exit: the final flush, artifacts and end_run against
    # a dead server (bounded by FLUSH_TIMEOUT_S and MLflow's shortened HTTP retries).
    end_stall_s = time.time() - jsonl().stat().st_mtime
    print(f"run ended {end_stall_s:.1f} s after its last metric with the tracking server down")
    assert end_stall_s < 60, end_stall_s
    assert job.returncode == 0, job_log()[-3000:]
    assert "unreachable" in job_log() and "studies.sync" in job_log()
    (run_dir,) = (study_dir / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert {k: status[k] for k in ("status", "step", "reason")} == {
        "status": "DONE",
        "step": 400,
        "reason": None,
    }
    local = read_metrics(run_dir / "metrics.jsonl")
    assert {s for k, s in local if k == "train/loss"} == set(range(1, 401))
    assert len(local) > steps_at_kill

    with running_server(settings, log=log) as server:  # same backend store, same URI
        client = MlflowClient(server.url)
        before = histories(client, run_id, {k for k, _ in local})
        assert 10 <= len(before) < len(local) and client.get_run(run_id).info.status == "RUNNING"

        sync = run_module("studies.sync", [str(study_dir)], tmp_path)
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert f"+{len(local) - len(before)} metrics; status FINISHED" in sync.stdout, sync.stdout
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert_same_values(histories(client, run_id, {k for k, _ in local}), local)
        assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {
            a.path for a in client.list_artifacts(run_id)
        }

        again = run_module("studies.sync", [str(study_dir)], tmp_path)
        assert again.returncode == 0 and "0 changed, 0 metric values added" in again.stdout, again.stdout
        assert_same_values(histories(client, run_id, {k for k, _ in local}), local)


@pytest.mark.usefixtures("one_thread")
def test_a_point_starting_while_mlflow_is_down_trains_and_sync_creates_its_run_later(
    compose, shrunk, tmp_path
):
    down = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    result = run_point(compose([*shrunk, "granularity=2", f"tracking.uri={down}"]))
    assert result.status == "DONE" and result.mlflow_run_id is None
    study_dir = tmp_path / "outputs" / "default"
    run_dir = study_dir / "runs" / result.run_key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "DONE" and summary["mlflow_run_id"] is None
    local = read_metrics(run_dir / "metrics.jsonl")
    assert ("val/loss", 20) in local and len(
        {s for _, s in local}
    ) == 20  # every step kept on disk (the train loss of each)

    store = f"sqlite:///{tmp_path / 'later.db'}"  # MLflow back (here: a store the sync writes to)
    (synced,) = sync_study(study_dir, store)
    assert synced.created and synced.metrics_added == len(local) and synced.status_set == "FINISHED"
    run = MlflowClient(store).get_run(synced.run_id)
    assert run.data.tags["run_key"] == result.run_key and run.data.params["axis.granularity"] == "2"
    assert_same_values(histories(MlflowClient(store), synced.run_id, {k for k, _ in local}), local)
