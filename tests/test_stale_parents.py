"""A sweep parent run left RUNNING by a sweep process that died (SIGKILL) is ended KILLED by the next
sweep of the study; a live, a detached and a foreign sweep's parent are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import start_study
from mlflow.tracking import MlflowClient

from records.sweep_record import update_sweep_record
from studies.launch.stale import close_stale_parents
from studies.track import tracking


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def parent(uri: str, tmp_path, name: str, **record) -> str:
    sweep_dir = tmp_path / name
    sweep_dir.mkdir()
    update_sweep_record(sweep_dir, **record)
    tags = {"kind": "sweep", "sweep_dir": str(sweep_dir)}
    return tracking.start_run(uri, "study", tmp_path / "art", run_name=f"sweep-{name}", tags=tags)


def test_only_the_parent_of_a_sweep_process_that_is_gone_is_ended_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    host = os.uname().nodename
    gone = parent(uri, tmp_path, "gone", launcher={"host": host, "pid": dead_pid()}, detach=False)
    live = parent(uri, tmp_path, "live", launcher={"host": host, "pid": os.getpid()}, detach=False)
    detached = parent(uri, tmp_path, "detached", launcher={"host": host, "pid": dead_pid()}, detach=True)
    foreign = parent(uri, tmp_path, "foreign", launcher={"host": "elsewhere", "pid": 1}, detach=False)
    older = parent(uri, tmp_path, "older", detach=False)  # from before sweep.json named its launcher

    closed = close_stale_parents(uri, "study")

    assert len(closed) == 1 and closed[0].startswith("MLflow parent run sweep-gone ended KILLED: its sweep")
    client = MlflowClient(uri)
    status = {run_id: client.get_run(run_id).info.status for run_id in (gone, live, detached, foreign, older)}
    assert status == {
        gone: "KILLED",
        live: "RUNNING",
        detached: "RUNNING",
        foreign: "RUNNING",
        older: "RUNNING",
    }
    assert close_stale_parents(uri, "study") == []  # done once


def test_a_store_that_does_not_exist_is_not_created(tmp_path):
    assert close_stale_parents(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", "study") == []
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_sweep_killed_with_sigkill_has_its_parent_ended_by_the_next_sweep(shrunk, tmp_path):
    args = ["-m", *shrunk, "infra=basic", "tokens=204800", "study.name=killed"]
    sweep = start_study(args, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "outputs" / "killed" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/metrics.jsonl")):
        assert time.monotonic() < deadline and sweep.poll() is None, "the point did not start"
        time.sleep(0.5)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(timeout=30)
    uri = f"sqlite:///{tmp_path / 'outputs' / 'killed' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    (stale,) = client.search_runs([experiment], "tags.kind = 'sweep'")
    assert stale.info.status == "RUNNING"
    # the next sweep of the study (here a short point of its own) ends it before it starts
    short = [a for a in args if not a.startswith("tokens=")] + ["tokens=5120"]
    again = start_study(short, tmp_path, stdout=subprocess.PIPE, text=True)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"MLflow parent run {stale.info.run_name} ended KILLED: its sweep process" in out
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
