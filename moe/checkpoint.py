"""Durable training state: atomic, verified, rotated checkpoint files.

One checkpoint is `step_<step>.pt` (a `torch.save` of tensors and plain containers only, so it loads
with `weights_only=True`) plus `step_<step>.pt.sha256`. Writing goes temp file -> fsync -> rename ->
fsync(dir) for the .pt, then the same for the .sha256: the digest file is the commit marker, so a crash
at any point leaves either a complete, verifiable checkpoint or one that `load_latest` skips. Loading
walks from the newest step down and takes the first whose digest matches and which unpickles; a corrupt
or half-written one is reported and the previous one is used. The last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1
"""Version of the checkpoint layout; a different version is refused rather than half-loaded."""
_NAME = re.compile(r"^step_(\d{9})\.pt$")
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written by an incompatible run."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.pt"


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) into a temp file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, newest first (verified or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def verify(path: Path) -> None:
    """Raise CheckpointError unless `path` and its digest file exist and agree."""
    digest = _digest_path(path)
    if not path.is_file() or not digest.is_file():
        raise CheckpointError(f"{path.name}: incomplete (no {digest.name}: the write did not finish)")
    want = digest.read_text().strip()
    got = _sha256(path)
    if got != want:
        raise CheckpointError(
            f"{path.name}: sha256 {got[:12]}... does not match {digest.name} ({want[:12]}...)"
        )


def save_checkpoint(directory: Path, step: int, state: Mapping[str, Any], keep_last: int) -> Path:
    """Write `state` (tensors and plain containers) as the checkpoint of `step`; keep the newest keep_last."""
    if keep_last < 1:
        raise ValueError(f"train.keep_last={keep_last} must be >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    _atomic_write(path, lambda f: torch.save({"format": FORMAT, "step": step, **state}, f))
    _atomic_write(_digest_path(path), lambda f: f.write(f"{_sha256(path)}\n".encode()))
    for _, old in list_checkpoints(directory)[keep_last:]:
        _digest_path(old).unlink(missing_ok=True)  # digest first: a half-deleted pair is never "valid"
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load one checkpoint; CheckpointError if it is unusable."""
    verify(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file cannot be used
        raise CheckpointError(f"{Path(path).name}: torch.load failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{Path(path).name}: format {state.get('format')!r} is not {FORMAT}")
    return state


def load_latest(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest usable checkpoint in `directory` (skipping corrupt or incomplete ones), or None."""
    for _, path in list_checkpoints(directory):
        try:
            return load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s, falling back to the previous one", exc)
    return None


def latest_step(directory: Path) -> int | None:
    """Step of the newest checkpoint whose digest verifies (no unpickling: cheap enough for a planner)."""
    for step, path in list_checkpoints(directory):
        try:
            verify(path)
            return step
        except CheckpointError:
            continue
    return None


# RNG state as weights_only-loadable values -------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) generator states."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(mt), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })  # fmt: skip
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
