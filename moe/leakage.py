"""Train/validation leakage: how much of the validation text occurs verbatim in training.

    python -m moe.leakage [--config conf/data/stdlib.yaml] [--n 32] [--seq-len 128] [--eval-tokens 16384]
                          [data.<key>=<value> ...]

The measure (`leakage`, `measure`) is the fraction of validation tokens that lie inside at least one
n-token span (n=32 by default) which also occurs, token for token, somewhere in the training shard. Spans
that contain the end-of-document token are not counted on either side: a span must lie inside one
document, so the shared "end of one file, start of the next" junctions do not count as leaked text (the
EOD token itself is then never covered, and stays in the denominator). The fix (`remove_leaked_spans`,
run by every stdlib/text build) cuts those spans out of the training shard. docs/data.md ("Leakage")
gives the rule and the figures.

Method: every n-gram is hashed (a polynomial rolling hash mod 2^64 over a fixed random 64-bit code per
token id, built by doubling), the reference hashes are sorted, and each query n-gram passes a bitmap of
the reference's low hash bits and then a binary search. A 64-bit collision would count an unseen span
as seen; with ~2e7 training n-grams the chance per validation n-gram is ~1e-12, so the figure is exact
for practical purposes. ~20 M training tokens take ~3 s on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

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
    from moe.corpus import DTYPES

    train = np.fromfile(train_path, dtype=DTYPES[dtype])
    out, cut = without_leaked_spans(train, np.fromfile(val_path, dtype=DTYPES[dtype]), eod, n)
    if cut:
        tmp = train_path.with_name(train_path.name + ".tmp")
        out.tofile(tmp)
        tmp.replace(train_path)
    return len(out), cut


def eval_window_positions(prepared, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """Positions in val.bin of the tokens the evaluation predicts (the targets of every window that
    moe.loader.validation_batches reads). Asked of the loader itself, by handing it a shard whose
    token i is i, so this can never drift from the windows it really uses."""
    from dataclasses import replace

    from moe.loader import validation_batches

    n_val = prepared.n_val_tokens
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "val.bin"
        np.arange(n_val, dtype="<u4").tofile(index)
        fake = replace(prepared, val_path=index, dtype="uint32", vocab_size=max(n_val, 2))
        batches = validation_batches(fake, seq_len, batch_size=64, max_tokens=max_tokens)
        return np.concatenate([y.numpy().reshape(-1) for _, y in batches]).astype(np.int64)


def measure(prepared, n: int = SPAN, seq_len: int | None = None, max_tokens: int | None = None) -> dict:
    """Leakage of a prepared data set: over the whole val split and, with seq_len, over the
    evaluation windows (seq_len, max_tokens as validation_batches takes them)."""
    from moe.corpus import open_shard, read_meta

    eod = read_meta(prepared.train_path.parent).get("eod_id")  # None for a tokens folder without one
    train = open_shard(prepared.train_path, prepared.dtype)
    val = open_shard(prepared.val_path, prepared.dtype)
    mask = covered_positions(train, val, n, eod)
    row = {
        "fingerprint": prepared.fingerprint,
        "n": n,
        "n_train_tokens": int(len(train)),
        "n_val_tokens": int(len(val)),
        "val_leaked_fraction": round(float(mask.mean()) if len(mask) else 0.0, 6),
    }
    if seq_len is not None:
        pos = eval_window_positions(prepared, seq_len, max_tokens)
        row |= {"eval_tokens": int(len(pos)), "eval_leaked_fraction": round(float(mask[pos].mean()), 6)}
        per_window = mask[pos].reshape(-1, seq_len).mean(axis=1)
        row["eval_windows_over_half_leaked"] = f"{int((per_window > 0.5).sum())} of {len(per_window)}"
    return row


# CLI -------------------------------------------------------------------------------------------------

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "data" / "stdlib.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the flag, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _fits(value, hint) -> bool:
    """Whether a YAML value fits a DataConfig annotation (int | None, Literal[...], str, ...)."""
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    kinds = tuple(typing.get_args(hint)) or (hint,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # YAML's true is an int to isinstance
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _data_config(config: Path, overrides: list[str]):
    """DataConfig from a conf/data/*.yaml file plus `data.<key>=<value>` overrides."""
    from moe.data import DataConfig

    if not config.is_file():
        raise ValueError(f"--config={str(config)!r} is not an existing file")
    values = yaml.safe_load(config.read_text()) or {}
    hints = typing.get_type_hints(DataConfig)
    for key in values:
        if key not in hints:
            raise ValueError(f"--config={str(config)!r} has data.{key}, which is not a data key")
    for item in overrides:
        key, sep, text = item.partition("=")
        name = key.removeprefix("data.")
        if not sep or not key.startswith("data.") or name not in hints:
            raise ValueError(f"{item!r} is not a data.<key>=<value> override (keys: {', '.join(hints)})")
        values[name] = yaml.safe_load(text)
        if not _fits(values[name], hints[name]):
            raise ValueError(f"{key}={text!r} is not of type {hints[name]}")
    return DataConfig(**values)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m moe.leakage", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a conf/data/*.yaml file")
    p.add_argument("--n", type=_positive, default=SPAN, help="span length in tokens")
    p.add_argument("--seq-len", type=_positive, default=128, help="evaluation window (model.seq_len)")
    p.add_argument("--eval-tokens", type=_positive, default=16384, help="train.eval_tokens")
    p.add_argument("overrides", nargs="*", help="data.<key>=<value>, as for python -m studies.run")
    args = p.parse_args(argv)
    if args.eval_tokens < args.seq_len:  # refused before a corpus is built, not after
        p.error(f"argument --eval-tokens: {args.eval_tokens} must be >= --seq-len={args.seq_len}")
    try:
        from moe.data import prepare_data

        prepared = prepare_data(_data_config(args.config, args.overrides))
        row = measure(prepared, args.n, args.seq_len, args.eval_tokens)
    except ValueError as e:
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
