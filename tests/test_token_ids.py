"""Token ids outside a shard's vocab_size are caught where they are read, naming file and offset.

Validation (moe.data.corpus.check_shard) samples 64 slices of each shard; an id between the slices used to
reach the embedding and fail mid-training as `IndexError: index out of range in self`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe.data.config import DataConfig
from moe.data.corpus import check_shard, read_meta
from moe.data.loader import TokenLoader, validation_batches
from moe.data.prepare import prepare_data

VOCAB = 1000
N_TOKENS = 64 * 4096 * 4  # the 64 sampled slices of 4096 tokens leave gaps of ~12k tokens between them


def _token_folder(tmp_path, bad_train: int | None = None, bad_val: int | None = None):
    rng = np.random.default_rng(0)
    folder = tmp_path / "tokens"
    folder.mkdir()
    for name, bad in (("train", bad_train), ("val", bad_val)):
        ids = rng.integers(0, VOCAB, N_TOKENS, dtype=np.uint16)
        if bad is not None:
            ids[bad] = VOCAB + 4000
        ids.astype("<u2").tofile(folder / f"{name}.bin")
    (folder / "meta.json").write_text(json.dumps({"version": 1, "dtype": "uint16", "vocab_size": VOCAB}))
    return folder


def _between_sampled_slices() -> int:
    """An offset that check_shard's 64 sampled slices do not cover."""
    starts = np.linspace(0, N_TOKENS - 4096, num=64, dtype=np.int64)
    return int(starts[0] + 4096 + 100)


def test_sampled_validation_misses_an_id_between_its_slices(tmp_path):
    folder = _token_folder(tmp_path, bad_train=_between_sampled_slices())
    assert check_shard(folder, "train", read_meta(folder)) == N_TOKENS  # the premise of the loader check


def test_loader_names_file_and_offset_of_an_out_of_range_id(tmp_path):
    bad = _between_sampled_slices()
    prepared = prepare_data(DataConfig(source="tokens", path=str(_token_folder(tmp_path, bad_train=bad))))
    loader = TokenLoader(prepared.train_path, seq_len=64, batch_size=256, seed=0)
    n_batches = loader.windows_per_epoch // 256 + 1
    with pytest.raises(
        ValueError, match=rf"train\.bin has token id 5000 >= vocab_size=1000 .* at offset {bad} "
    ):
        for _ in range(n_batches):  # one epoch reads every window, so the bad id is reached
            loader.next_batch()


def test_loader_batches_of_in_range_ids_pass_the_check(tmp_path):
    prepared = prepare_data(DataConfig(source="tokens", path=str(_token_folder(tmp_path))))
    loader = TokenLoader(prepared.train_path, seq_len=64, batch_size=256, seed=0)
    for _ in range(loader.windows_per_epoch // 256):
        x_BS, y_BS = loader.next_batch()
        assert int(x_BS.max()) < VOCAB and int(y_BS.max()) < VOCAB


def test_validation_windows_name_the_val_shard_and_offset(tmp_path):
    bad = _between_sampled_slices()
    prepared = prepare_data(DataConfig(source="tokens", path=str(_token_folder(tmp_path, bad_val=bad))))
    with pytest.raises(ValueError, match=rf"val\.bin has token id 5000 .* at offset {bad} "):
        validation_batches(prepared, seq_len=64, batch_size=32, max_tokens=None)
