"""Atomic file writes (stdlib only): the data cache's meta.json and the run folders (records.runfiles)
share this one, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path | str, obj: Mapping[str, Any]) -> None:
    """Write `obj` as JSON to a temp file beside `path`, fsync it, and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
