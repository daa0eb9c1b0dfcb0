"""`python -m studies.server`: an MLflow tracking server for a cluster, and `tracking_server(...)` for code.

The server owns the backend store (sqlite on the server node's local disk, or a database URI) and proxies
artifacts (`--serve-artifacts`) to `--artifacts-destination` on shared storage, so jobs on any node only
need `tracking.uri=http://<host>:<port>`. `mlflow server` forks worker processes: it runs in its own
process group (its own session), stopped on exit, Ctrl-C, SIGTERM or SIGKILL (docs/tracking.md)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ALL_INTERFACES = ("0.0.0.0", "::", "")
# sqlite's file locks are unreliable on these; MLflow's store must not live there.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs")


@dataclass(frozen=True)
class ServerSettings:
    """What `mlflow server` is started with (the CLI flags of `python -m studies.server`)."""

    backend_store_uri: str
    """Runs, params and metrics: sqlite:////abs/path/mlflow.db (server-local disk) or a database URI."""
    artifacts_destination: str
    """Where proxied artifacts are stored: a path on shared storage, file://..., s3://..."""
    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 exposes the server (which has no authentication) to the network."""
    port: int = 5000
    """TCP port to listen on."""
    workers: int = 2
    """mlflow server worker processes."""
    allowed_hosts: tuple[str, ...] = ()
    """Extra Host headers to accept (name or name:port; * wildcards) beyond the advertised name."""

    @property
    def advertised_host(self) -> str:
        """The name jobs use to reach the server: the machine's name when bound to all interfaces."""
        return socket.getfqdn() if self.host in ALL_INTERFACES else self.host

    @property
    def url(self) -> str:
        host = self.advertised_host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def local_url(self) -> str:
        """Where this machine reaches the server (the health check, tests)."""
        return f"http://127.0.0.1:{self.port}" if self.host in ALL_INTERFACES else self.url


def validate_settings(settings: ServerSettings) -> ServerSettings:
    """ServerSettings with local paths made absolute; ValueError naming the flag if one is unusable."""
    if not 1 <= settings.port <= 65535:
        raise ValueError(f"--port={settings.port} must be in 1..65535")
    if settings.workers < 1:
        raise ValueError(f"--workers={settings.workers} must be >= 1")
    backend = settings.backend_store_uri
    if "://" not in backend:
        raise ValueError(
            f"--backend-store-uri={backend!r} is not a URI; use sqlite:////abs/dir/mlflow.db or a database URI"
        )
    if backend.startswith("file:"):
        raise ValueError(
            f"--backend-store-uri={backend!r}: MLflow 3 refuses file stores; use sqlite:////abs/dir/mlflow.db"
        )
    if backend.startswith("sqlite:///"):
        db = Path(backend.removeprefix("sqlite:///")).expanduser().resolve()
        backend = f"sqlite:///{db}"
    artifacts = settings.artifacts_destination
    if "://" not in artifacts or artifacts.startswith("file://"):
        artifacts = str(Path(artifacts.removeprefix("file://")).expanduser().resolve())
    return ServerSettings(
        backend, artifacts, settings.host, settings.port, settings.workers, settings.allowed_hosts
    )


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """Type of the filesystem holding `path`, from /proc/mounts (or `mounts`, in its format); None if unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    path = Path(path).resolve()
    best, best_type = None, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = Path(fields[1].replace("\\040", " "))
        if (path == mount_point or mount_point in path.parents) and (
            best is None or len(mount_point.parts) > len(best.parts)
        ):
            best, best_type = mount_point, fields[2]
    return best_type


def settings_warnings(settings: ServerSettings, mounts: str | None = None) -> list[str]:
    """Things that work but that a cluster user should hear about (`mounts`: see filesystem_type)."""
    warnings = []
    if settings.host not in LOOPBACK:
        warnings.append(
            f"--host={settings.host}: the server is reachable from the network and has NO authentication; "
            "anyone who can reach the port can read and delete runs. Prefer an SSH tunnel to 127.0.0.1."
        )
    if settings.backend_store_uri.startswith("sqlite:///"):
        db_dir = Path(settings.backend_store_uri.removeprefix("sqlite:///")).parent
        fs = filesystem_type(db_dir, mounts)
        if fs in NETWORK_FILESYSTEMS:
            warnings.append(
                f"--backend-store-uri: {db_dir} is on {fs}; sqlite locking is unreliable on network "
                "filesystems. Put mlflow.db on the server node's local disk (artifacts may stay shared)."
            )
    return warnings


def server_command(settings: ServerSettings) -> list[str]:
    """The `mlflow server` command line for `settings` (validated)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        settings.backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        settings.artifacts_destination,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--workers",
        str(settings.workers),
    ]
    if settings.host not in LOOPBACK:
        # MLflow's default Host check accepts only loopback and private IPs; jobs use the node's name.
        name = settings.advertised_host
        hosts = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", name, f"{name}:*"]
        cmd += ["--allowed-hosts", ",".join([*hosts, *settings.allowed_hosts])]
    elif settings.allowed_hosts:
        cmd += ["--allowed-hosts", ",".join(settings.allowed_hosts)]
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it before we do)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of group `pgid` remains."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def stop_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group led by `process`, then SIGKILL what is left after `timeout_s`."""
    pgid = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None and not group_alive(pgid):
                return
            time.sleep(0.1)
    process.wait()


@dataclass(frozen=True)
class RunningServer:
    """A started server: where it answers and the process group to stop."""

    url: str
    """Tracking URI for jobs: tracking.uri=<url>."""
    local_url: str
    """Where this machine reaches it."""
    process: subprocess.Popen
    """`mlflow server`, leader of its own process group."""


@contextmanager
def running_server(
    settings: ServerSettings, *, log: IO | None = None, startup_timeout_s: float = 120.0
) -> Iterator[RunningServer]:
    """Start `mlflow server` in its own process group, wait for /health, stop the group on exit.

    `log`: a file the server writes to (None: inherit this process's stdout/stderr).
    """
    settings = validate_settings(settings)
    if settings.backend_store_uri.startswith("sqlite:///"):
        Path(settings.backend_store_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in settings.artifacts_destination:
        Path(settings.artifacts_destination).mkdir(parents=True, exist_ok=True)
    if _healthy(settings.local_url):
        raise RuntimeError(f"--port={settings.port}: a server already answers at {settings.local_url}")
    # MLflow's job runner (GenAI judges, trace rollups) adds 8 processes that a scaling study never uses.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    process = subprocess.Popen(
        server_command(settings),
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    watchdog = subprocess.Popen(  # ends the group if this process dies without the finally below
        [sys.executable, "-m", "studies.track.watchdog", str(os.getpid()), str(process.pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(settings.local_url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with status {process.returncode} before answering{_log_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"mlflow server did not answer {settings.local_url}/health within "
                    f"{startup_timeout_s:.0f} s{_log_tail(log)}"
                )
            time.sleep(0.25)
        yield RunningServer(settings.url, settings.local_url, process)
    finally:
        stop_group(process)
        watchdog.kill()
        watchdog.wait()


def _log_tail(log: IO | None, chars: int = 3000) -> str:
    if log is None or not getattr(log, "name", None):
        return ""
    log.flush()
    text = Path(log.name).read_text(errors="replace")
    return f"; server log ({log.name}):\n{text[-chars:]}"


@contextmanager
def tracking_server(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    log_path: Path | None = None,
) -> Iterator[str]:
    """A real MLflow tracking server for the duration of the block; yields its URL (the tracking URI).

    port=None picks a free one. The server's output goes to `log_path` (None: a temporary file, shown in
    the error if the server fails to start).
    """
    settings = ServerSettings(
        backend_store_uri, str(artifacts_destination), host, port or free_port(host), workers
    )
    with (
        open(log_path, "w") if log_path else tempfile.NamedTemporaryFile("w", suffix=".log") as log,
        running_server(settings, log=log) as server,
    ):
        yield server.url


def parse_args(argv: list[str] | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser(
        prog="python -m studies.server",
        description="Run an MLflow tracking server for a cluster (artifacts proxied to shared storage).",
    )
    parser.add_argument(
        "--backend-store-uri",
        required=True,
        help="sqlite:////<server-local dir>/mlflow.db (never on NFS) or a database URI",
    )
    parser.add_argument(
        "--artifacts-destination",
        required=True,
        help="artifact root on shared storage (a path, file://, s3://, ...)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes a server without auth)",
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="extra comma-separated Host headers to accept (name, name:port, wildcards)",
    )
    args = parser.parse_args(argv)
    extra = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    return ServerSettings(
        args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.workers, extra
    )


class _Stop(Exception):
    """Raised from the signal handlers so that the `with` block stops the server group."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _raise_stop(signum: int, frame: object) -> None:
    # One stop is enough: a second Ctrl-C must not interrupt stop_group and orphan the server.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = validate_settings(parse_args(argv))
    except ValueError as exc:
        print(f"studies.server: {exc}", file=sys.stderr)
        return 2
    for warning in settings_warnings(settings):
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    # Installed explicitly: a shell starts background jobs with SIGINT ignored, and a closed terminal's
    # SIGHUP would otherwise end this process and leave the server (in its own session) running.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup asked to outlive the terminal
        signal.signal(signal.SIGHUP, _raise_stop)
    print(
        f"Starting mlflow server on {settings.host}:{settings.port} "
        f"(backend {settings.backend_store_uri}, artifacts {settings.artifacts_destination}) ...",
        flush=True,
    )
    try:
        with running_server(settings) as server:
            print(
                f"\nMLflow tracking server up (process group {server.process.pid}).\n"
                f"  tracking URI: {server.url}\n"
                f"  point jobs at it: python -m studies.run -m ... tracking.uri={server.url}\n"
                f"  UI: {server.url}/#/experiments\n"
                "Ctrl-C or SIGTERM stops it.",
                flush=True,
            )
            status = server.process.wait()  # a signal handler interrupts the wait
            print(f"mlflow server exited on its own with status {status}", file=sys.stderr)
            return status or 1
    except _Stop:
        print("Stopping the tracking server ...", flush=True)
    except (RuntimeError, TimeoutError) as exc:
        print(f"studies.server: {exc}", file=sys.stderr)
        return 1
    print("Tracking server stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
