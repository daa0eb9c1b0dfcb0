"""studies.server: settings and command line, a real server through the CLI, a sweep logged to a real
server, and the MLflow UI rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import healthy, repo_env
from mlflow.tracking import MlflowClient
from PIL import Image

from studies.server import (
    ServerSettings,
    filesystem_type,
    free_port,
    group_alive,
    server_command,
    settings_warnings,
    tracking_server,
    validate_settings,
)

# Headless flags from docs/tracking.md; without the last two only the page's loading skeleton is drawn.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--virtual-time-budget=20000",
    "--run-all-compositor-stages-before-draw",
]


# Settings and command line ----------------------------------------------------------------------

# The tests of the served sweep (conftest.served_sweep) share one worker, which trains it once.
pytestmark = pytest.mark.xdist_group("served_sweep")


def test_invalid_settings_name_the_flag_and_value(tmp_path):
    art = str(tmp_path / "art")
    with pytest.raises(ValueError, match=r"--port=70000 must be in 1\.\.65535"):
        validate_settings(ServerSettings(f"sqlite:///{tmp_path}/db", art, port=70000))
    with pytest.raises(ValueError, match="--workers=0 must be >= 1"):
        validate_settings(ServerSettings(f"sqlite:///{tmp_path}/db", art, workers=0))
    with pytest.raises(ValueError, match="--backend-store-uri='mlflow.db' is not a URI"):
        validate_settings(ServerSettings("mlflow.db", art))
    with pytest.raises(ValueError, match="MLflow 3 refuses file stores"):
        validate_settings(ServerSettings(f"file://{tmp_path}/mlruns", art))


def test_relative_store_and_artifact_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = validate_settings(ServerSettings("sqlite:///db/mlflow.db", "shared/artifacts"))
    assert settings.backend_store_uri == f"sqlite:///{tmp_path.resolve()}/db/mlflow.db"
    assert settings.artifacts_destination == str(tmp_path.resolve() / "shared" / "artifacts")
    remote = validate_settings(ServerSettings("postgresql://db.cluster/mlflow", "s3://bucket/mlflow"))
    assert (remote.backend_store_uri, remote.artifacts_destination) == (
        "postgresql://db.cluster/mlflow",
        "s3://bucket/mlflow",
    )


def test_default_server_binds_loopback_and_proxies_artifacts(tmp_path):
    settings = validate_settings(ServerSettings(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "a")))
    cmd = server_command(settings)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "a")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5000"
    assert "--allowed-hosts" not in cmd
    assert settings.url == "http://127.0.0.1:5000"
    assert settings_warnings(settings, mounts="") == []


def test_binding_all_interfaces_advertises_the_node_name_accepts_it_and_warns_about_auth(tmp_path):
    settings = ServerSettings(
        f"sqlite:///{tmp_path}/mlflow.db",
        str(tmp_path),
        host="0.0.0.0",
        port=5123,
        allowed_hosts=("mlflow.example.org",),
    )
    name = socket.getfqdn()
    assert settings.url == f"http://{name}:5123"
    assert settings.local_url == "http://127.0.0.1:5123"
    cmd = server_command(settings)
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert {name, f"{name}:*", "127.0.0.1:*", "mlflow.example.org"} <= set(allowed)
    (warning,) = settings_warnings(settings, mounts="")
    assert "--host=0.0.0.0" in warning and "NO authentication" in warning


def test_filesystem_type_takes_the_deepest_mount_holding_the_path():
    mounts = "\n".join(
        [
            "/dev/sda1 / ext4 rw 0 0",
            "nas:/export /shared nfs4 rw 0 0",
            "/dev/nvme0n1 /shared/local\\040disk xfs rw 0 0",
        ]
    )
    assert filesystem_type(Path("/shared/study/mlflow.db"), mounts) == "nfs4"
    assert filesystem_type(Path("/shared/local disk/mlflow.db"), mounts) == "xfs"
    assert filesystem_type(Path("/home/me"), mounts) == "ext4"
    assert filesystem_type(Path("/sharedx/db"), mounts) == "ext4"  # a prefix of the name is not a parent


def test_sqlite_store_on_nfs_is_warned_about_but_artifacts_on_nfs_are_not():
    mounts = "/dev/sda1 / ext4 rw 0 0\nnas:/export /shared nfs rw 0 0"
    on_nfs = ServerSettings("sqlite:////shared/study/mlflow.db", "/shared/study/artifacts")
    (warning,) = settings_warnings(on_nfs, mounts)
    assert "/shared/study is on nfs" in warning and "local disk" in warning
    assert settings_warnings(ServerSettings("sqlite:////var/mlflow.db", "/shared/art"), mounts) == []


# A real server -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["ctrl_c", "sigkill"])
def test_cli_serves_until_interrupted_or_killed_then_its_whole_process_group_ends(tmp_path, stop):
    port = free_port()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studies.server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/db/mlflow.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=repo_env(),
        cwd=tmp_path,
    )
    lines = []
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C or SIGTERM stops it" in line for line in lines):
            line = cli.stdout.readline()
            assert line and time.monotonic() < deadline, "server did not come up:\n" + "".join(lines)
            lines.append(line)
        out = "".join(lines)
        assert f"tracking.uri=http://127.0.0.1:{port}" in out
        pgid = int(re.search(r"process group (\d+)", out).group(1))
        assert pgid != cli.pid and group_alive(pgid)
        assert healthy(f"http://127.0.0.1:{port}")
        client = MlflowClient(f"http://127.0.0.1:{port}")
        exp = client.create_experiment("served")
        assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
        assert (tmp_path / "db" / "mlflow.db").exists()
        cli.send_signal(signal.SIGINT if stop == "ctrl_c" else signal.SIGKILL)
        rest, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    if stop == "ctrl_c":
        assert cli.returncode == 0, out + rest
        assert "Tracking server stopped." in rest
    else:  # no finally ran in the CLI: its watchdog (studies.track.watchdog) ends the group
        deadline = time.monotonic() + 30
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not group_alive(pgid), "mlflow server processes survived the CLI"
    assert not healthy(f"http://127.0.0.1:{port}")


@pytest.mark.slow
def test_startup_failure_reports_the_server_log(tmp_path):
    # A port that is already taken: mlflow server exits, and the error carries its log.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"exited with status .* before answering; server log"):
            with tracking_server(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", port=port):
                pass


# A sweep against a real server, and its UI ------------------------------------------------------


@pytest.fixture
def served_study(served_sweep):
    """A real server with one finished `granularity=1,8` sweep logged to it: (url, tmp dir, experiment id)."""
    return served_sweep.url, served_sweep.tmp, served_sweep.experiment_id


@pytest.mark.slow
def test_sweep_pointed_at_the_server_records_parent_children_metrics_and_artifacts(served_study):
    url, tmp, exp_id = served_study
    client = MlflowClient(url)
    runs = client.search_runs([exp_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kind") == "point"]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["variant"] for c in children) == ["moe-E8-k2-G1", "moe-E8-k2-G8"]
    for child in children:
        assert child.info.status == "FINISHED"
        # Artifacts were uploaded through the server, not written to a path only this node can see.
        assert child.info.artifact_uri.startswith("mlflow-artifacts:"), child.info.artifact_uri
        train = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in train] == list(range(1, 21)), "the train loss of every step"
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 6  # steps 1, 2, 4, 8, 10, 20
        local = Path(
            client.download_artifacts(child.info.run_id, "summary.json", str(tmp / child.info.run_id))
        )
        summary = json.loads(local.read_text())
        assert summary["mlflow_run_id"] == child.info.run_id and summary["status"] == "DONE"
        assert summary["run_key"] == child.data.tags["run_key"]
    # Everything went to the server: no job fell back to the default sqlite store in the study dir.
    assert not (tmp / "outputs" / "default" / "mlflow.db").exists()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless browser: install Debian's chromium (apt-get install -y chromium)")


def chromium_run(url: str, action: str, profile: Path) -> str:
    """Run headless Chromium on `url` with one action (--dump-dom, --screenshot=...) and a fresh profile."""
    proc = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", action, url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def render(url: str, out: Path) -> tuple[Image.Image, str]:
    """Screenshot of `url` (saved as out.png) and the text of its rendered DOM."""
    shot = out.with_suffix(".png")
    chromium_run(url, f"--screenshot={shot}", out.parent / f"{out.name}-screenshot-profile")
    return Image.open(shot).convert("RGB"), page_text(url, out)


def page_text(url: str, out: Path) -> str:
    """Visible text of the rendered page, tags removed (`<strong>3</strong> matching runs`)."""
    dom = chromium_run(url, "--dump-dom", out.parent / f"{out.name}-dom-profile")
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", dom)).split())


def assert_not_blank(image: Image.Image) -> None:
    # The loading skeleton has ~5 colours and one covering 95% of the page; a drawn page has thousands.
    colours = image.getcolors(maxcolors=1 << 24)
    dominant = max(count for count, _ in colours) / (image.width * image.height)
    assert len(colours) > 500 and dominant < 0.9, (len(colours), dominant)


@pytest.mark.slow
def test_runs_page_shows_the_sweep_as_a_parent_run_of_its_points(served_study, tmp_path):
    url, _, exp_id = served_study
    runs = MlflowClient(url).search_runs([exp_id])
    (parent,) = [r.info.run_name for r in runs if r.data.tags["kind"] == "sweep"]
    points = [r.info.run_name for r in runs if r.data.tags["kind"] == "point"]
    image, text = render(f"{url}/#/experiments/{exp_id}/runs", tmp_path / "runs")
    assert_not_blank(image)
    # The points are folded under the parent row, and counted with it.
    assert parent in text and "3 matching runs" in text
    assert not any(name in text for name in points)
    # Ordered by a metric, the table lists runs flat: every point is on the page.
    flat = page_text(
        f"{url}/#/experiments/{exp_id}/runs?orderByKey=metrics.%60val%2Floss%60", tmp_path / "flat"
    )
    assert all(name in flat for name in [parent, *points])


@pytest.mark.slow
def test_loss_chart_page_plots_train_and_val_loss_of_every_point(served_study, tmp_path):
    url, _, exp_id = served_study
    children = MlflowClient(url).search_runs([exp_id], "tags.kind = 'point'")
    keys = ["train/loss", "val/loss"]
    query = {
        "runs": json.dumps([c.info.run_id for c in children]),
        "metric": json.dumps(keys[0]),
        "experiments": json.dumps([exp_id]),
        "plot_metric_keys": json.dumps(keys),
        "x_axis": "step",
    }
    image, text = render(f"{url}/#/metric?{urllib.parse.urlencode(query)}", tmp_path / "loss")
    assert_not_blank(image)
    assert "train/loss vs val/loss" in text
    for child in children:
        assert f"{child.info.run_name} (train/loss)" in text and f"{child.info.run_name} (val/loss)" in text
