"""Benchmark: build the default embedded corpus on a fresh cache (target: <= 60 s on a 2-core laptop).

    python -m moe.data.bench [--config conf/data/stdlib.yaml]

Prints the wall time of `prepare_data` into a temporary cache (deleted afterwards), the tokenizer-training
and encoding times meta.json records, and the token counts. A timing lives here, not in a test: the
machines that run the tests are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from moe.data.config import DataConfig
from moe.data.corpus import read_meta
from moe.data.prepare import prepare_data

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "data" / "stdlib.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a conf/data/*.yaml file")
    args = p.parse_args(argv)
    fields = yaml.safe_load(args.config.read_text())
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        prepared = prepare_data(DataConfig(**{**fields, "cache_dir": cache}))
        wall = time.perf_counter() - t0
        meta = read_meta(prepared.train_path.parent)
    row = {
        "wall_s": round(wall, 1),
        "tokenizer_train_s": meta["tokenizer_train_s"],
        "encode_s": meta["encode_s"],
        "n_train_tokens": prepared.n_train_tokens,
        "n_val_tokens": prepared.n_val_tokens,
        "fingerprint": prepared.fingerprint,
    }
    print(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
