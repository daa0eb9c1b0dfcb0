"""Batches from prepared token shards: epoch-based sampling without replacement, the budget check and
the fixed validation windows. See docs/data.md.

Shapes: B = batch size, S = sequence length.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe.data.config import PreparedData
from moe.data.corpus import open_shard, read_meta


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, vocab_size: int, path: Path
) -> tuple[Tensor, Tensor]:
    """(x, y) of the windows at `starts`. Every id is bound-checked here (one max over the batch,
    ~1 us): validation samples only 64 slices of a shard, and an id the embedding cannot index would
    otherwise fail mid-training as an IndexError that names neither the file nor the offset."""
    idx_BS = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w_BS = tokens[idx_BS].astype(np.int64)
    if w_BS.size and int(w_BS.max()) >= vocab_size:
        row, col = np.argwhere(w_BS >= vocab_size)[np.argmin(idx_BS[w_BS >= vocab_size])]
        offset = int(idx_BS[row, col])
        raise ValueError(
            f"{path} has token id {int(w_BS[row, col])} >= vocab_size={vocab_size} (meta.json) at offset "
            f"{offset} (token index; byte {offset * tokens.itemsize}): the shard does not match its "
            "meta.json, so rebuild it or fix vocab_size"
        )
    w = torch.from_numpy(w_BS)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def epochs_for(n_train_tokens: int, seq_len: int, tokens: int) -> float:
    """Epochs that a run of `tokens` training tokens sees of a shard of `n_train_tokens`: one epoch is
    W = (n_train_tokens - 1) // seq_len windows, each predicting seq_len tokens (TokenLoader's windows)."""
    windows = _windows_per_epoch(n_train_tokens, seq_len)
    return tokens / (windows * seq_len)


def _windows_per_epoch(n_tokens: int, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    windows = (n_tokens - 1) // seq_len
    if windows < 1:
        raise ValueError(f"a shard of {n_tokens} tokens holds no window of seq_len+1={seq_len + 1} tokens")
    return windows


def check_budget(prepared: PreparedData, seq_len: int, tokens: int, allow_repeat: bool) -> float:
    """Epochs of the training split that `tokens` training tokens take; raises ValueError when that is
    more than one epoch and repetition was not allowed (data.allow_repeat)."""
    windows = _windows_per_epoch(prepared.n_train_tokens, seq_len)
    epochs = epochs_for(prepared.n_train_tokens, seq_len, tokens)
    if tokens > windows * seq_len and not allow_repeat:
        raise ValueError(
            f"train.tokens={tokens} is {epochs:.2f} epochs of the {prepared.n_train_tokens:,} training tokens "
            f"of data {prepared.fingerprint} (one epoch = {windows:,} windows of seq_len={seq_len}): set "
            f"data.allow_repeat=true to repeat data, or use a larger corpus (raise data.max_chars, or "
            "data.source=text with more text)"
        )
    return epochs


class TokenLoader:
    """Windows of seq_len+1 tokens from a memory-mapped shard, each seen once per epoch.

    The shard is cut into W windows starting at multiples of seq_len (neighbours share one token, so
    every token is predicted once per epoch). Stream position p is window perm_e[p % W] of epoch
    e = p // W, where perm_e is a permutation drawn from (seed, e); batch m is positions
    [m*B, (m+1)*B). Batch m thus depends only on (seed, m): the state is one counter and resume is
    exact. Data-parallel ranks read the one stream and take their share of it with seek(), so no window
    is repeated across ranks either."""

    def __init__(self, path: Path, seq_len: int, batch_size: int, seed: int):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        self.path = Path(path)
        meta = read_meta(self.path.parent)
        self.tokens = open_shard(self.path, meta["dtype"])
        self.vocab_size = int(meta["vocab_size"])
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"{self.path} holds {len(self.tokens)} tokens, fewer than seq_len+1={seq_len + 1}"
            )
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed = seed
        self.step = 0
        self._windows_per_epoch = _windows_per_epoch(len(self.tokens), seq_len)
        self._perms: dict[int, np.ndarray] = {}  # at most two epochs: a batch may straddle a boundary

    @property
    def windows_per_epoch(self) -> int:
        """W: the non-overlapping windows of the shard, each drawn once per epoch."""
        return self._windows_per_epoch

    @property
    def epochs_seen(self) -> float:
        """Windows drawn so far (batches before `step`) divided by windows_per_epoch."""
        return self.step * self.batch_size / self._windows_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # sha256 mixes (seed, epoch) so nearby seeds or epochs give unrelated orders
            key = hashlib.sha256(f"{self.seed}/epoch/{epoch}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = torch.randperm(self._windows_per_epoch, generator=gen).numpy()
        return self._perms[epoch]

    def window_indices(self, step: int) -> np.ndarray:
        """The window numbers (0 .. W-1) of batch `step`, in batch order."""
        positions_B = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epoch_B, slot_B = np.divmod(positions_B, self._windows_per_epoch)
        windows_B = np.empty_like(positions_B)
        for epoch in np.unique(epoch_B):
            mine = epoch_B == epoch
            windows_B[mine] = self._permutation(int(epoch))[slot_B[mine]]
        return windows_B

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x_BS, y_BS) int64 with y_BS[:, i] = x_BS[:, i + 1] in the stream."""
        starts_B = self.window_indices(self.step) * self.seq_len
        self.step += 1
        return _windows(self.tokens, starts_B, self.seq_len, self.vocab_size, self.path)

    def seek(self, step: int) -> None:
        """Make batch number `step` of the stream the next one (data-parallel ranks pick their share)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        self.step = step

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_tokens": len(self.tokens),
            "sampling": "epochs",
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "n_tokens", "sampling"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)} but this loader has {key}={mine}")
        self.step = int(state["step"])


VAL_WINDOWS = "spread"
"""How validation_batches places its windows; recorded with each run (TrainPlan.val_windows, the
data.val_windows param) so that val losses measured on different tokens are never compared or mixed.
Runs without it took the first windows of the split."""


def validation_batches(
    prepared: PreparedData, seq_len: int, batch_size: int, max_tokens: int | None
) -> list[tuple[Tensor, Tensor]]:
    """Non-overlapping windows of the val shard, spread evenly over all of it (VAL_WINDOWS), in order:
    identical for every sweep point with the same data config. max_tokens caps the predicted tokens
    (windows * seq_len); the windows then sample every part of the split, not only its first
    documents. The last batch may be smaller than batch_size, so average the loss over tokens, not
    over batches."""
    tokens = open_shard(prepared.val_path, prepared.dtype)
    n_all = (len(tokens) - 1) // seq_len
    n_windows = n_all if max_tokens is None else min(n_all, max_tokens // seq_len)
    if n_windows < 1:
        raise ValueError(
            f"validation needs seq_len+1={seq_len + 1} tokens; the val shard has {len(tokens)} and "
            f"max_tokens={max_tokens} (raise data.val_fraction or the eval token budget)"
        )
    starts = np.arange(n_windows, dtype=np.int64) * n_all // n_windows * seq_len
    return [
        _windows(tokens, starts[i : i + batch_size], seq_len, prepared.vocab_size, prepared.val_path)
        for i in range(0, n_windows, batch_size)
    ]
