"""Durable training state: atomic, verified, rotated checkpoint files.

One checkpoint is `step_<step>.pt` (a `torch.save` of tensors and plain containers only, so it loads
with `weights_only=True`) plus `step_<step>.pt.sha256`. Writing goes temp file -> fsync -> rename ->
fsync(dir) for the .pt, then the same for the .sha256: the digest file is the commit marker, so a crash
at any point leaves either a complete, verifiable checkpoint or one that `load_latest` skips. Loading
walks from the newest step down and takes the first whose digest matches and which unpickles; a corrupt
or half-written one is reported and the previous one is used. The last `keep_last` checkpoints are kept,
and every one saved with keep=True (a branch point, docs/branches.md: `<name>.keep` marks it, written first).

Sharded runs (FSDP, EP; moe.parallel.layout) write `step_<step>.dcp/` instead: every rank writes its shards
with torch.distributed.checkpoint (DCP) plus, from rank 0, `train_state.pt` (step, plan, loader, RNG);
then rank 0 writes `step_<step>.dcp.sha256`, the digest of every file in the folder, as the same kind of
commit marker. `load_checkpoint` of a sharded checkpoint returns the train state with `"sharded"`: the
folder; `load_sharded` fills any layout's tensors from it (DCP reshards: 2 ranks -> 1, 1 -> 2, EP -> none).

Temp files of a writer that was killed (`.step_<step>.pt.<pid>.tmp`) are removed the next time the
folder is saved to or loaded from, unless a live writer still holds them (an flock taken while writing).
A full disk is reported as OSError(ENOSPC) naming the folder, not as torch's `unexpected pos`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
"""Version of the checkpoint layout; a different version is refused rather than half-loaded."""
_NAME = re.compile(r"^step_(\d{9})\.(pt|dcp)$")
_TEMP = re.compile(r"^\.step_\d{9}\.(?:pt|dcp)[^/]*\.(\d+)\.tmp$")
TRAIN_STATE = "train_state.pt"
"""The non-tensor part of a sharded checkpoint (inside its folder)."""
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written by an incompatible run."""


def checkpoint_path(directory: Path, step: int, sharded: bool | None = None) -> Path:
    """The checkpoint of `step`: the .pt file, or the .dcp folder of a sharded run (sharded=None: the
    folder when it exists, else the file)."""
    pt, dcp = Path(directory) / f"step_{step:09d}.pt", Path(directory) / f"step_{step:09d}.dcp"
    if sharded is None:
        return dcp if dcp.is_dir() and not pt.exists() else pt
    return dcp if sharded else pt


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _keep_path(path: Path) -> Path:
    return path.with_name(path.name + ".keep")


def _is_sharded(path: Path) -> bool:
    return Path(path).suffix == ".dcp"


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


def _disk_full(path: Path, exc: BaseException) -> OSError | None:
    """OSError(ENOSPC) naming the folder when `exc` is (or hides) a full disk; None otherwise.

    torch.save reports a failed write as `RuntimeError: [enforce fail at inline_container.cc] ...
    unexpected pos`, without the errno: then the free space decides."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or (
        any("unexpected pos" in str(e) or "No space left" in str(e) for e in chain)
        and shutil.disk_usage(path.parent).free < _LOW_SPACE
    ):
        free = shutil.disk_usage(path.parent).free
        return OSError(
            errno.ENOSPC,
            f"no space left on {path.parent} writing {path.name} "
            f"({free / 2**20:.1f} MiB free): {type(exc).__name__}: {exc}",
        )
    return None


_LOW_SPACE = 64 << 20
"""Free bytes below which a write failure without an errno is taken for a full disk."""


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) into a temp file beside `path`, fsync it, rename it over `path`, fsync the folder.

    The temp file is flock-ed while it is written, so a cleaner can tell a live writer's file from one
    a killed writer left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        full = _disk_full(path, exc)
        if full is not None:
            raise full from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove temp files that killed writers left in `directory`; returns what was removed.

    A temp file is kept while a writer holds its lock, and while the process named in it is alive
    and the file is less than a minute old (the moment between creating and locking it)."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            young = time.time() - p.stat().st_mtime < 60
            if young and _writer_alive(int(m.group(1))):
                continue
            with open(p, "rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d stale checkpoint temp file(s) in %s", len(removed), directory)
    return removed


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, newest first (verified or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _manifest(folder: Path) -> str:
    """One `<sha256>  <name>` line per file of a sharded checkpoint folder, sorted by name."""
    return "".join(f"{_sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file())


def is_committed(path: Path) -> bool:
    """Whether a checkpoint's commit marker (its digest file) exists: it was written to the end."""
    return _digest_path(Path(path)).exists()


def verify(path: Path) -> None:
    """Raise CheckpointError unless `path` and its digest file exist and agree."""
    digest = _digest_path(path)
    if _is_sharded(path):
        if not path.is_dir() or not digest.is_file():
            raise CheckpointError(f"{path.name}: incomplete (no {digest.name}: the write did not finish)")
        for line in digest.read_text().splitlines():
            want, name = line.split("  ", 1)
            if not (path / name).is_file():
                raise CheckpointError(f"{path.name}: {name} listed in {digest.name} is missing")
            if (got := _sha256(path / name)) != want:
                raise CheckpointError(
                    f"{path.name}/{name}: sha256 {got[:12]}... does not match {digest.name}"
                )
        return
    if not path.is_file() or not digest.is_file():
        raise CheckpointError(f"{path.name}: incomplete (no {digest.name}: the write did not finish)")
    want = digest.read_text().strip()
    got = _sha256(path)
    if got != want:
        raise CheckpointError(
            f"{path.name}: sha256 {got[:12]}... does not match {digest.name} ({want[:12]}...)"
        )


def save_checkpoint(
    directory: Path, step: int, state: Mapping[str, Any], keep_last: int, keep: bool = False
) -> Path:
    """Write `state` (tensors and plain containers) as the checkpoint of `step`; keep the newest keep_last
    and those saved with keep=True."""
    if keep_last < 1:
        raise ValueError(f"train.keep_last={keep_last} must be >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory)
    path = checkpoint_path(directory, step, sharded=False)
    if keep:  # before the checkpoint: a kill between the two never leaves it unmarked
        _keep_path(path).touch()
    _atomic_write(path, lambda f: torch.save({"format": FORMAT, "step": step, **state}, f))
    _atomic_write(_digest_path(path), lambda f: f.write(f"{_sha256(path)}\n".encode()))
    _rotate(directory, keep_last)
    return path


def _remove(path: Path) -> None:
    _digest_path(path).unlink(missing_ok=True)  # digest first: a half-deleted pair is never "valid"
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rotate(directory: Path, keep_last: int) -> None:
    for _, old in list_checkpoints(directory)[keep_last:]:
        if not _keep_path(old).exists():
            _remove(old)


def save_sharded(
    directory: Path,
    step: int,
    tensors: Mapping[str, Any],
    state: Mapping[str, Any],
    keep_last: int,
    keep: bool = False,
) -> Path:
    """Every rank: write this rank's shards of `tensors` (a nested dict of tensors / DTensors with
    global shapes) with DCP; rank 0 also writes `state` (plain values) and, once every rank's shards
    are on disk, the digest marker. Returns the checkpoint folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if keep_last < 1:
        raise ValueError(f"train.keep_last={keep_last} must be >= 1")
    dist_on = dist.is_available() and dist.is_initialized()
    main = not dist_on or dist.get_rank() == 0
    directory = Path(directory)
    path = checkpoint_path(directory, step, sharded=True)
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(directory)
        if path.exists() or _digest_path(path).exists():  # a killed earlier attempt at this step
            _remove(path)
        path.mkdir()
        if keep:
            _keep_path(path).touch()
    if dist_on:
        dist.barrier()
    try:
        dcp.save(dict(tensors), checkpoint_id=str(path))
        if main:
            _atomic_write(
                path / TRAIN_STATE, lambda f: torch.save({"format": FORMAT, "step": step, **state}, f)
            )
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001 - DCP wraps the per-rank errors
        full = _disk_full(path / TRAIN_STATE, exc)
        if full is not None:
            raise full from exc
        raise
    if dist_on:
        dist.barrier()  # every rank's shards (and DCP's .metadata) are written
    if main:
        for p in path.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(path)
        _atomic_write(_digest_path(path), lambda f: f.write(_manifest(path).encode()))
        _rotate(directory, keep_last)
    return path


def load_sharded(path: Path, tensors: Mapping[str, Any]) -> None:
    """Fill `tensors` (same keys as saved; any layout's tensors or DTensors) in place from a sharded
    checkpoint; DCP reads each rank's part of every tensor, whatever layout wrote it."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(dict(tensors), checkpoint_id=str(path))
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001 - a missing key or shape mismatch: say which checkpoint
        raise CheckpointError(f"{Path(path).name}: DCP load failed ({type(exc).__name__}: {exc})") from exc


def model_weights(state: Mapping[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict of a loaded checkpoint, in one process: a plain checkpoint's "model",
    or a sharded one's tensors read by DCP into `model`'s own (same config, any layout that wrote it)."""
    if "sharded" not in state:
        return state["model"]
    weights = model.state_dict()
    load_sharded(Path(state["sharded"]), {"model": weights})  # only the model's keys: no optimiser state
    return weights


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load one checkpoint; CheckpointError if it is unusable. For a sharded checkpoint the
    tensors stay on disk: the result has `"sharded"`, the folder to pass to `load_sharded`."""
    verify(path)
    path = Path(path)
    file = path / TRAIN_STATE if _is_sharded(path) else path
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file cannot be used
        raise CheckpointError(f"{Path(path).name}: torch.load failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{Path(path).name}: format {state.get('format')!r} is not {FORMAT}")
    if _is_sharded(path):
        state["sharded"] = str(path)
    return state


def load_latest(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest usable checkpoint in `directory` (skipping corrupt or incomplete ones), or None."""
    clean_stale_temps(directory)
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
