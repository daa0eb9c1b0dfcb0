"""Train/validation leakage: how much of the validation text occurs verbatim in training.

    python -m moe.data.leakage [--config conf/data/stdlib.yaml] [--n 32] [--seq-len 128] [--eval-tokens 16384]
                          [data.<key>=<value> ...]

The measure (`leakage`, `measure`) is the fraction of validation tokens that lie inside at least one
n-token span (n=32 by default) which also occurs, token for token, somewhere in the training shard. Spans
that contain the end-of-document token are not counted on either side: a span must lie inside one
document, so the shared "end of one file, start of the next" junctions do not count as leaked text (the
EOD token itself is then never covered, and stays in the denominator). The fix (`remove_leaked_spans`,
run by every stdlib/text build) cuts those spans out of the training shard. docs/data.md ("Leakage")
gives the rule and the figures.

The hashing, the measure and the cut live in moe.data.spans.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import typing
from pathlib import Path

import numpy as np
import yaml

from moe.data.spans import SPAN, covered_positions


def eval_window_positions(prepared, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """Positions in val.bin of the tokens the evaluation predicts (the targets of every window that
    moe.data.loader.validation_batches reads). Asked of the loader itself, by handing it a shard whose
    token i is i, so this can never drift from the windows it really uses."""
    from dataclasses import replace

    from moe.data.loader import validation_batches

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
    from moe.data.corpus import open_shard, read_meta

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

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "data" / "stdlib.yaml"


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
    from moe.data.config import DataConfig

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
    p = _Parser(prog="python -m moe.data.leakage", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a conf/data/*.yaml file")
    p.add_argument("--n", type=_positive, default=SPAN, help="span length in tokens")
    p.add_argument("--seq-len", type=_positive, default=128, help="evaluation window (model.seq_len)")
    p.add_argument("--eval-tokens", type=_positive, default=16384, help="train.eval_tokens")
    p.add_argument("overrides", nargs="*", help="data.<key>=<value>, as for python -m studies.run")
    args = p.parse_args(argv)
    if args.eval_tokens < args.seq_len:  # refused before a corpus is built, not after
        p.error(f"argument --eval-tokens: {args.eval_tokens} must be >= --seq-len={args.seq_len}")
    try:
        from moe.data.prepare import prepare_data

        prepared = prepare_data(_data_config(args.config, args.overrides))
        row = measure(prepared, args.n, args.seq_len, args.eval_tokens)
    except ValueError as e:
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
