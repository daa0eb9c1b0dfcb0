"""Verbatim n-token spans shared by two token streams: the hashing, the measure and the cut the data
build applies to the training shard (docs/data.md, "Leakage"; moe.data.leakage measures a prepared data set).

Method: every n-gram is hashed (a polynomial rolling hash mod 2^64 over a fixed random 64-bit code per
token id, built by doubling), the reference hashes are sorted, and each query n-gram passes a bitmap of
the reference's low hash bits and then a binary search. A 64-bit collision would count an unseen span
as seen; with ~2e7 training n-grams the chance per validation n-gram is ~1e-12, so the figure is exact
for practical purposes. ~20 M training tokens take ~3 s on one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe.data.corpus import DTYPES

SPAN = 32
"""Default n: a 32-token span (~100 characters of code) shared verbatim is copied text, not chance."""
HASH_SEED = 0x5EED_1EA4
BASE = 0x9E3779B97F4A7C15  # odd, so multiplying by it is a bijection mod 2^64
CHUNK = 1 << 22  # n-grams hashed per slice: bounds temporary memory to a few x 32 MiB


@dataclass(frozen=True)
class Leakage:
    n: int
    """Span length in tokens."""
    n_val_tokens: int
    """Validation tokens measured (the denominator)."""
    n_leaked_tokens: int
    """Validation tokens inside at least one n-token span that occurs in training."""

    @property
    def fraction(self) -> float:
        return self.n_leaked_tokens / self.n_val_tokens if self.n_val_tokens else 0.0


def _token_codes(vocab: int) -> np.ndarray:
    """A fixed random odd 64-bit code per token id, so the hash does not depend on id arithmetic."""
    rng = np.random.default_rng(HASH_SEED)
    return rng.integers(0, 2**63, size=vocab, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _window_hashes(codes_seq: np.ndarray, n: int) -> np.ndarray:
    """h[i] = sum_j codes_seq[i + j] * BASE^(n-1-j) mod 2^64 for every window of n, built by doubling
    (h(a ++ b) = h(a) * BASE^len(b) + h(b)): log2(n) passes over the array instead of n."""
    length = len(codes_seq)
    out, out_len = None, 0
    block, block_len = codes_seq, 1
    with np.errstate(over="ignore"):  # uint64 wraps mod 2^64, which is the hash
        while True:
            if n & block_len:  # append a block of this length: the bits of n add up to n
                if out is None:
                    out = block
                else:
                    m = length - out_len - block_len + 1
                    out = out[:m] * np.uint64(pow(BASE, block_len, 2**64)) + block[out_len : out_len + m]
                out_len += block_len
            if 2 * block_len > n:
                return out
            m = length - 2 * block_len + 1
            block = block[:m] * np.uint64(pow(BASE, block_len, 2**64)) + block[block_len : block_len + m]
            block_len *= 2


def ngram_hashes(
    tokens: np.ndarray, n: int, codes: np.ndarray, eod: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(hash of the n-gram starting at each kept position, those start positions). Positions whose
    n-gram holds `eod` are dropped."""
    tokens = np.asarray(tokens)
    count = len(tokens) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    hashes = _window_hashes(codes[tokens.astype(np.intp)], n)
    starts = np.arange(count, dtype=np.int64)
    if eod is not None:
        # an n-gram holds EOD iff the count of EODs up to its end exceeds the count before its start
        seen = np.concatenate([[0], np.cumsum(tokens == eod, dtype=np.int64)])
        keep = seen[n:] == seen[:count]
        hashes, starts = hashes[keep], starts[keep]
    return hashes, starts


def _chunked_hashes(tokens: np.ndarray, n: int, codes: np.ndarray, eod: int | None):
    """ngram_hashes of CHUNK windows at a time (bounded temporaries), starts relative to `tokens`."""
    for lo in range(0, max(len(tokens) - n + 1, 0), CHUNK):
        hashes, starts = ngram_hashes(tokens[lo : lo + CHUNK + n - 1], n, codes, eod)
        yield hashes, starts + lo


def covered_positions(
    reference: np.ndarray, tokens: np.ndarray, n: int = SPAN, eod: int | None = None
) -> np.ndarray:
    """Boolean mask over `tokens`: True where the token lies inside an n-gram that also occurs in
    `reference` (n-grams holding `eod` excluded on both sides)."""
    if n < 1:
        raise ValueError(f"leakage n={n} must be >= 1")
    tokens = np.asarray(tokens)
    vocab = int(max(np.max(reference, initial=0), np.max(tokens, initial=0))) + 1
    codes = _token_codes(vocab)
    ref = [h for h, _ in _chunked_hashes(np.asarray(reference), n, codes, eod)]
    ref_h = np.sort(np.concatenate(ref)) if ref else np.zeros(0, np.uint64)  # np.unique is far slower
    delta = np.zeros(len(tokens) + 1, np.int64)
    if len(ref_h):
        # a bitmap of the reference's low hash bits rejects most misses in one lookup; binary search
        # of 2e7 random queries would dominate the time otherwise
        bits = 1 << min(26, max(16, int(len(ref_h)).bit_length() + 4))
        mask = np.uint64(bits - 1)
        table = np.zeros(bits, bool)
        table[(ref_h & mask).astype(np.intp)] = True
        for hashes, starts in _chunked_hashes(tokens, n, codes, eod):
            maybe = table[(hashes & mask).astype(np.intp)]
            hashes, starts = hashes[maybe], starts[maybe]
            at = np.minimum(np.searchsorted(ref_h, hashes), len(ref_h) - 1)
            hit = starts[ref_h[at] == hashes]
            # mark [start, start + n) of every hit: +1 at the start, -1 after the end, then a running sum
            np.add.at(delta, hit, 1)
            np.add.at(delta, hit + n, -1)
    return np.cumsum(delta[:-1]) > 0


def leakage(train: np.ndarray, val: np.ndarray, n: int = SPAN, eod: int | None = None) -> Leakage:
    """The fraction of `val` tokens inside an n-token span seen verbatim in `train` (see module doc)."""
    mask = covered_positions(train, val, n, eod)
    return Leakage(n=n, n_val_tokens=len(mask), n_leaked_tokens=int(mask.sum()))


def without_leaked_spans(
    train: np.ndarray, val: np.ndarray, eod: int, n: int = SPAN
) -> tuple[np.ndarray, int]:
    """(train with every token inside an n-gram that occurs in `val` cut out, tokens cut). Each cut
    run becomes one `eod`, since the text breaks there; a cut next to a document boundary (or a whole
    document cut) leaves a single `eod`, never two in a row. No n-gram of the result without `eod`
    then occurs in `val`: its leakage is 0 by construction."""
    train = np.asarray(train)
    cut = covered_positions(val, train, n, eod)
    if not cut.any():
        return train, 0
    first = cut & ~np.concatenate([[False], cut[:-1]])  # the first token of each cut run
    out = np.where(first, np.asarray(eod, train.dtype), train)[~cut | first]
    doubled = np.concatenate([[True], out[1:] == out[:-1]]) & (out == eod)  # a leading eod, or a repeat
    if len(train) and train[0] == eod:
        doubled[0] = False  # the shard itself started with eod: keep what was there
    out = out[~doubled]
    return out, int(cut.sum())


def remove_leaked_spans(
    train_path: Path, val_path: Path, dtype: str, eod: int, n: int = SPAN
) -> tuple[int, int]:
    """Rewrite the train shard without the spans it shares with the val shard (without_leaked_spans);
    returns (train tokens now, tokens cut)."""
    train = np.fromfile(train_path, dtype=DTYPES[dtype])
    out, cut = without_leaked_spans(train, np.fromfile(val_path, dtype=DTYPES[dtype]), eod, n)
    if cut:
        tmp = train_path.with_name(train_path.name + ".tmp")
        out.tofile(tmp)
        tmp.replace(train_path)
    return len(out), cut
