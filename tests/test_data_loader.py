"""The token loader: shifted windows, epochs, seeds, seek and resume, the token budget, validation batches."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from helpers import shard, write_token_folder
from torch.testing import assert_close

from moe.data.loader import TokenLoader, check_budget, epochs_for, validation_batches


def test_loader_batches_are_shifted_windows_at_multiples_of_seq_len(small_corpus):
    prepared, _ = small_corpus
    tokens = torch.from_numpy(shard(prepared, "train").astype(np.int64))
    loader = TokenLoader(prepared.train_path, seq_len=32, batch_size=8, seed=0)
    windows_B = loader.window_indices(0)
    x_BS, y_BS = loader.next_batch()
    assert x_BS.shape == y_BS.shape == (8, 32) and x_BS.dtype == torch.int64
    for w, x_S, y_S in zip(windows_B.tolist(), x_BS, y_BS, strict=True):
        assert_close(x_S, tokens[w * 32 : w * 32 + 32])
        assert_close(y_S, tokens[w * 32 + 1 : w * 32 + 33])
    assert loader.windows_per_epoch == (len(tokens) - 1) // 32


def test_loader_visits_every_window_once_per_epoch(small_corpus):
    prepared, _ = small_corpus
    # batch_size 7 does not divide W, so batches straddle the epoch boundaries
    loader = TokenLoader(prepared.train_path, seq_len=64, batch_size=7, seed=5)
    W = loader.windows_per_epoch
    n_batches = 3 * W // 7 + 1
    tokens = shard(prepared, "train")
    starts = []
    for _ in range(n_batches):
        x_BS, _ = loader.next_batch()
        starts.extend(x_BS[:, 0].tolist())
    seen = np.concatenate([loader.window_indices(m) for m in range(n_batches)])
    assert [tokens[w * 64] for w in seen] == starts  # window_indices is what next_batch served
    for epoch in range(3):
        assert sorted(seen[epoch * W : (epoch + 1) * W].tolist()) == list(range(W))
    assert not np.array_equal(seen[:W], seen[W : 2 * W])  # each epoch has its own order
    assert not np.array_equal(seen[:W], np.arange(W))  # and it is shuffled


def test_epochs_seen_counts_windows_drawn(small_corpus):
    prepared, _ = small_corpus
    loader = TokenLoader(prepared.train_path, seq_len=64, batch_size=8, seed=0)
    assert loader.epochs_seen == 0.0
    for _ in range(3):
        loader.next_batch()
    assert loader.epochs_seen == pytest.approx(24 / loader.windows_per_epoch)
    loader.seek(loader.windows_per_epoch)  # W batches of 8 windows = 8 epochs
    assert loader.epochs_seen == pytest.approx(8.0)
    # epochs_for agrees: tokens predicted = windows * seq_len
    assert epochs_for(prepared.n_train_tokens, 64, 24 * 64) == pytest.approx(24 / loader.windows_per_epoch)


def test_loader_stream_depends_only_on_seed(small_corpus):
    prepared, _ = small_corpus

    def batches(**kw):
        loader = TokenLoader(prepared.train_path, seq_len=16, batch_size=4, **kw)
        return torch.stack([loader.next_batch()[0] for _ in range(3)])

    assert_close(batches(seed=1), batches(seed=1))
    assert not torch.equal(batches(seed=1), batches(seed=2))
    # ranks take their share of the one stream with seek(): the loader has no rank to differ by
    assert set(inspect.signature(TokenLoader).parameters) == {"path", "seq_len", "batch_size", "seed"}


def test_batch_m_is_the_same_after_seek_and_resume(small_corpus):
    prepared, _ = small_corpus
    loader = TokenLoader(prepared.train_path, seq_len=16, batch_size=4, seed=3)
    for _ in range(5):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = [loader.next_batch() for _ in range(4)]
    resumed = TokenLoader(prepared.train_path, seq_len=16, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch() for _ in range(4)], strict=True):
        assert_close(rx, x)
        assert_close(ry, y)
    # seek jumps straight to batch 7 (even across an epoch: batch W of 4 windows is in epoch 4)
    sought = TokenLoader(prepared.train_path, seq_len=16, batch_size=4, seed=3)
    sought.seek(7)
    assert_close(sought.next_batch()[0], expected[2][0])
    far = sought.windows_per_epoch + 3
    sought.seek(far)
    after_far = sought.next_batch()[0]
    loader.seek(far)
    assert_close(loader.next_batch()[0], after_far)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(prepared.train_path, seq_len=16, batch_size=4, seed=4).load_state_dict(state)


def test_check_budget_refuses_more_than_one_epoch_unless_allowed(small_corpus):
    prepared, _ = small_corpus
    one_epoch = (prepared.n_train_tokens - 1) // 64 * 64
    assert check_budget(prepared, 64, one_epoch, allow_repeat=False) == 1.0
    assert check_budget(prepared, 64, one_epoch // 2, allow_repeat=False) == pytest.approx(0.5, abs=1e-3)
    too_many = 3 * one_epoch
    with pytest.raises(ValueError) as err:
        check_budget(prepared, 64, too_many, allow_repeat=False)
    message = str(err.value)
    for part in (
        f"train.tokens={too_many}",
        "3.00 epochs",
        f"{prepared.n_train_tokens:,}",
        prepared.fingerprint,
        "data.allow_repeat=true",
        "data.max_chars",
    ):
        assert part in message, part
    assert check_budget(prepared, 64, too_many, allow_repeat=True) == pytest.approx(3.0)
    assert epochs_for(prepared.n_train_tokens, 64, too_many) == pytest.approx(3.0)


def test_validation_windows_are_spread_over_the_whole_val_split_and_identical_across_calls(small_corpus):
    prepared, _ = small_corpus
    a = validation_batches(prepared, seq_len=32, batch_size=3, max_tokens=32 * 7)
    b = validation_batches(prepared, seq_len=32, batch_size=3, max_tokens=32 * 7)
    assert [x.shape[0] for x, _ in a] == [3, 3, 1]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert_close(xa, xb)
        assert_close(ya, yb)
    val = torch.from_numpy(shard(prepared).astype(np.int64))
    n_all = (len(val) - 1) // 32
    assert n_all > 3 * 7  # the cap leaves most windows out: which ones are taken matters
    starts = [
        i * n_all // 7 * 32 for i in range(7)
    ]  # evenly spaced, the first at 0, the last in the last 7th
    assert starts[-1] >= (n_all - n_all // 7 - 1) * 32
    assert_close(torch.cat([x for x, _ in a]), torch.stack([val[s : s + 32] for s in starts]))
    assert_close(torch.cat([y for _, y in a]), torch.stack([val[s + 1 : s + 33] for s in starts]))
    everything = validation_batches(prepared, seq_len=32, batch_size=64, max_tokens=None)
    assert_close(torch.cat([x for x, _ in everything]).flatten(), val[: n_all * 32])  # uncapped: every window


def test_loader_rejects_a_shard_shorter_than_one_window(tmp_path):
    write_token_folder(tmp_path / "t", np.arange(10), np.arange(10), vocab_size=10)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(tmp_path / "t" / "train.bin", seq_len=10, batch_size=1, seed=0)
