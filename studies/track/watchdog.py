"""`python -m studies.track.watchdog PARENT_PID GROUP`: started beside an `mlflow server` process group
(studies.server.running_server). Once the process that started the server is gone (SIGKILL, an OOM kill:
no `finally` of its own runs), this process's parent changes, and it ends the server's whole group,
SIGTERM then SIGKILL, so no mlflow/uvicorn process is left serving. Imports nothing heavy."""

from __future__ import annotations

import os
import signal
import sys
import time


def main(parent: int, group: int, poll_s: float = 0.5, grace_s: float = 10.0) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        time.sleep(grace_s)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
