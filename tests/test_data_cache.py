"""Prepared corpora and their cache: identical bytes, reuse, corrupt entries rebuilt, one concurrent build."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from helpers import read_meta, shard, small_cfg

from moe.data.prepare import load_tokenizer, prepare_data


def test_building_twice_gives_identical_bytes(small_corpus, tmp_path):
    first, _ = small_corpus
    second = prepare_data(small_cfg(tmp_path))
    assert second.fingerprint == first.fingerprint
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (first.train_path.parent / name).read_bytes() == (second.train_path.parent / name).read_bytes()
    assert read_meta(first)["build_id"] != read_meta(second)["build_id"]


def test_shards_decode_back_to_the_documents_separated_by_eod(small_corpus):
    prepared, _ = small_corpus
    meta = read_meta(prepared)
    tok = load_tokenizer(prepared)
    eod = meta["eod_id"]
    val = shard(prepared)
    assert val[-1] == eod and val.max() < prepared.vocab_size
    assert len(val) == prepared.n_val_tokens == meta["n_val_tokens"]
    pieces = np.split(val, np.flatnonzero(val == eod) + 1)[:-1]
    assert len(pieces) == meta["n_val_docs"]
    decoded = "".join(tok.decode(p[:-1].tolist()) for p in pieces)
    assert len(decoded) == meta["n_val_chars"]


def test_tokenizer_chars_changes_the_tokenizer_but_not_the_documents(small_corpus, tmp_path):
    full, _ = small_corpus
    subset = prepare_data(small_cfg(tmp_path, tokenizer_chars=50_000))
    assert subset.fingerprint != full.fingerprint
    meta, full_meta = read_meta(subset), read_meta(full)
    assert meta["n_tokenizer_chars"] == 50_000 < full_meta["n_tokenizer_chars"] == full_meta["n_train_chars"]
    for key in ("n_train_docs", "n_val_docs", "n_train_chars", "n_val_chars"):
        assert meta[key] == full_meta[key], key
    # a cap above the training split binds nothing and keeps the fingerprint
    assert prepare_data(small_cfg(tmp_path, tokenizer_chars=10**9)).fingerprint == full.fingerprint
    decoded = load_tokenizer(subset).decode(shard(subset)[:2000].tolist())  # still lossless
    assert decoded == load_tokenizer(full).decode(shard(full)[:2000].tolist())[: len(decoded)]


def test_second_prepare_reuses_the_cache_without_rebuilding(small_corpus):
    prepared, cache = small_corpus
    before = read_meta(prepared)["build_id"], prepared.train_path.stat().st_mtime_ns
    again = prepare_data(small_cfg(cache))
    assert again == prepared
    assert (read_meta(again)["build_id"], again.train_path.stat().st_mtime_ns) == before


@pytest.mark.parametrize("damage", ["truncate_train", "drop_meta", "garble_meta"])
def test_corrupt_cache_entry_is_detected_and_rebuilt(small_corpus, tmp_path, damage):
    reference, _ = small_corpus
    prepared = prepare_data(small_cfg(tmp_path))
    entry = prepared.train_path.parent
    old_id = read_meta(prepared)["build_id"]
    if damage == "truncate_train":
        with open(prepared.train_path, "r+b") as f:
            f.truncate(prepared.train_path.stat().st_size // 2)
    elif damage == "drop_meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    rebuilt = prepare_data(small_cfg(tmp_path))
    assert read_meta(rebuilt)["build_id"] != old_id
    assert rebuilt.train_path.read_bytes() == reference.train_path.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [prepared.fingerprint]


def _prepare_in_child(cache: str, barrier, results) -> None:
    barrier.wait()  # all three enter prepare_data together
    prepared = prepare_data(small_cfg(Path(cache)))
    results.put((prepared.fingerprint, read_meta(prepared)["build_id"]))


@pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods(), reason="needs fork (spawn re-imports torch: slow)"
)
def test_concurrent_prepare_from_three_processes_builds_once(tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(set(got)) == 1  # same fingerprint and the same single build
    entries = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert entries == [got[0][0]]  # no temp or duplicate directories left behind
