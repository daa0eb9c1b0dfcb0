"""Checkpoint files on disk: temp files of killed writers, a full disk, and the sharded (DCP) layout."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from moe.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_step,
    load_checkpoint,
    load_latest,
    load_sharded,
    save_checkpoint,
    save_sharded,
)

ROOT = Path(__file__).resolve().parents[1]
STATE = {"model": {"w": torch.arange(6.0)}, "plan": {"steps": 3}}


def writer(directory: Path, step: int, then: str) -> subprocess.Popen:
    """A process that starts writing the checkpoint of `step` and then `then`s: 'die' (SIGKILL itself
    mid-write) or 'wait' (hold the half-written temp file until `directory/go` appears)."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from moe.train.checkpoint import _atomic_write, checkpoint_path
        def write(f):
            f.write(b"half a checkpoint")
            f.flush()
            print("writing", flush=True)
            if {then!r} == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            while not Path({str(directory)!r}, "go").exists():
                time.sleep(0.05)
        _atomic_write(checkpoint_path(Path({str(directory)!r}), {step}), write)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_temp_files_a_killed_writer_left_are_removed_on_the_next_save(tmp_path):
    proc = writer(tmp_path, 40, "die")
    assert proc.wait(timeout=30) == -9
    assert temps(tmp_path) == [f".step_000000040.pt.{proc.pid}.tmp"]
    save_checkpoint(tmp_path, 41, STATE, keep_last=2)
    assert temps(tmp_path) == []
    assert latest_step(tmp_path) == 41


def test_temp_files_a_killed_writer_left_are_removed_when_the_folder_is_loaded_from(tmp_path):
    save_checkpoint(tmp_path, 39, STATE, keep_last=2)
    proc = writer(tmp_path, 40, "die")
    proc.wait(timeout=30)
    assert len(temps(tmp_path)) == 1
    assert load_latest(tmp_path)["step"] == 39
    assert temps(tmp_path) == []


def test_the_temp_file_of_a_live_writer_is_kept_and_its_checkpoint_completes(tmp_path):
    proc = writer(tmp_path, 40, "wait")
    try:
        held = temps(tmp_path)
        assert held == [f".step_000000040.pt.{proc.pid}.tmp"]
        os.utime(tmp_path / held[0], (time.time() - 3600, time.time() - 3600))  # old, but its lock is held
        save_checkpoint(tmp_path, 39, STATE, keep_last=2)
        load_latest(tmp_path)
        assert temps(tmp_path) == held
    finally:
        (tmp_path / "go").touch()
        assert proc.wait(timeout=30) == 0
    assert checkpoint_path(tmp_path, 40).read_bytes() == b"half a checkpoint"
    assert temps(tmp_path) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (needs root): a real file system that runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_is_reported_as_no_space_left_naming_the_folder(full_disk):
    ckpt = full_disk / "checkpoints"
    big = {"model": {"w": torch.zeros(1 << 18)}}  # 1 MiB of weights, 4x the disk
    with pytest.raises(OSError, match=f"no space left on {ckpt}") as info:
        save_checkpoint(ckpt, 7, big, keep_last=2)
    assert info.value.errno == errno.ENOSPC
    assert temps(ckpt) == [] and latest_step(ckpt) is None  # nothing half-written is left to resume from


def test_a_full_disk_during_a_sharded_save_is_reported_as_no_space_left(full_disk):
    ckpt = full_disk / "checkpoints"
    with pytest.raises(OSError, match=f"no space left on .*{ckpt.name}") as info:
        save_sharded(ckpt, 7, {"model": {"w": torch.zeros(1 << 18)}}, {"plan": {}}, keep_last=2)
    assert info.value.errno == errno.ENOSPC
    assert latest_step(ckpt) is None


def test_a_sharded_checkpoint_loads_into_fresh_tensors_and_its_digest_catches_corruption(tmp_path):
    tensors = {
        "model": {"w": torch.randn(4, 3)},
        "optim": {"w": {"exp_avg": torch.randn(4, 3), "step": torch.tensor(5.0)}},
    }
    path = save_sharded(tmp_path, 5, tensors, {"plan": {"steps": 9}}, keep_last=1)
    assert path == checkpoint_path(tmp_path, 5) == tmp_path / "step_000000005.dcp"
    state = load_checkpoint(path)
    assert state["step"] == 5 and state["plan"] == {"steps": 9} and state["sharded"] == str(path)
    fresh = {
        "model": {"w": torch.zeros(4, 3)},
        "optim": {"w": {"exp_avg": torch.zeros(4, 3), "step": torch.tensor(0.0)}},
    }
    load_sharded(state["sharded"], fresh)
    assert_close(fresh, tensors)
    save_sharded(tmp_path, 6, tensors, {"plan": {"steps": 9}}, keep_last=1)
    assert not path.exists() and latest_step(tmp_path) == 6  # rotated, like the .pt files
    shard = next(checkpoint_path(tmp_path, 6).glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(checkpoint_path(tmp_path, 6))
