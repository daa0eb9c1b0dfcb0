"""Data pipeline: corpus split, cached shards, concurrency, user sources, loader, validation set."""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing as mp
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.testing import assert_close

from moe.corpus import EMBEDDED_PACKAGES, embedded_corpus, stdlib_documents
from moe.data import (
    MAX_VOCAB,
    MIN_VOCAB,
    DataConfig,
    TokenLoader,
    check_budget,
    epochs_for,
    load_tokenizer,
    prepare_data,
    unigram_entropy,
    validate_data_config,
    validation_batches,
)
from moe.split import cap_chars, split_documents

# Small but real: a 300k-character hash-spread subset of the stdlib corpus with a 512-token BPE.
SMALL = dict(vocab_size=512, val_fraction=0.3, max_chars=300_000)


def small_cfg(cache: Path, **changes) -> DataConfig:
    return DataConfig(cache_dir=str(cache), **{**SMALL, **changes})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_data(small_cfg(cache)), cache


def read_meta(prepared) -> dict:
    return json.loads((prepared.train_path.parent / "meta.json").read_text())


def shard(prepared, which: str = "val") -> np.ndarray:
    path = prepared.val_path if which == "val" else prepared.train_path
    return np.fromfile(path, dtype=np.dtype(prepared.dtype).newbyteorder("<"))


def write_text_folder(folder: Path) -> dict[str, str]:
    """Ten .txt/.md documents (one nested) and six jsonl documents; returns name -> text."""
    docs = {}
    (folder / "sub").mkdir(parents=True)
    for i in range(10):
        name = f"sub/doc{i}.md" if i == 3 else f"doc{i}.txt"
        text = f"Document {i}: the quick brown fox jumps over the lazy dog {i} times.\n" * (5 + i)
        (folder / name).write_text(text)
        docs[name] = text
    lines = []
    for j in range(6):
        text = f"Record {j} says: café naïve — ünïcode ok. " * (3 + j)
        lines.append(json.dumps({"text": text, "id": j}))
        docs[f"data.jsonl:{j + 1}"] = text
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "ignored.csv").write_text("a,b\n1,2\n")
    return docs


def write_token_folder(folder: Path, train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> None:
    """The docs/data.md recipe for bringing your own tokens, line for line."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    np.asarray(train_ids, dtype=np.dtype(dtype).newbyteorder("<")).tofile(folder / "train.bin")
    np.asarray(val_ids, dtype=np.dtype(dtype).newbyteorder("<")).tofile(folder / "val.bin")
    Path(folder / "meta.json").write_text(
        json.dumps({"version": 1, "dtype": dtype, "vocab_size": vocab_size})
    )


# Corpus and split --------------------------------------------------------------------------------


def test_split_depends_only_on_document_names():
    docs = [(f"doc{i}", "x" * i) for i in range(200)]
    train, val = split_documents(docs, 0.2)
    train_rev, val_rev = split_documents(docs[::-1], 0.2)
    assert (train, val) == (train_rev, val_rev)
    # dropping documents never moves the others between splits
    _, val_half = split_documents(docs[:100], 0.2)
    assert val_half == [d for d in val if d in docs[:100]]
    assert 20 <= len(val) <= 60


def test_max_chars_subset_is_exact_and_spread_over_the_corpus():
    docs = stdlib_documents()
    capped = cap_chars(docs, 300_000)
    assert sum(len(t) for _, t in capped) == 300_000
    assert capped == cap_chars(list(reversed(docs)), 300_000)
    top_dirs = {name.split("/")[1] for name, _ in capped}
    assert len(top_dirs) > 5


def test_stdlib_corpus_excludes_tests_site_packages_and_generated_tables():
    names = [name for name, _ in stdlib_documents()]
    assert names == sorted(names)
    assert any(n.startswith("pydoc_topics/") for n in names)
    assert "stdlib/argparse.py" in names
    for bad in ("/test/", "/tests/", "idle_test", "site-packages", "__pycache__", "_sysconfigdata"):
        assert not any(bad in f"/{n}" for n in names), bad
    assert "stdlib/encodings/cp1252.py" not in names
    assert "stdlib/encodings/utf_8.py" in names


def test_embedded_corpus_adds_named_package_sources_without_tests_or_generated_files():
    corpus = embedded_corpus()
    names = [name for name, _ in corpus.documents]
    assert names == sorted(names)
    assert set(stdlib_documents()) <= set(corpus.documents)
    found = dict(corpus.packages)
    assert set(found) | set(corpus.missing) == {name for name, _ in EMBEDDED_PACKAGES}
    assert "torch" in found and found["torch"].startswith("2.")  # the README install has torch
    assert "site/torch/nn/modules/linear.py" in names
    site = [n for n in names if n.startswith("site/")]
    assert {n.split("/")[1] for n in site} == set(found)
    for bad in ("/test/", "/tests/", "/testing/", "/_vendor/", "__pycache__", "_pb2.py", "/version.py"):
        assert not any(bad in n for n in site), bad
    assert "site/torch/_inductor/fx_passes/serialized_patterns/_sfdp_pattern_1.py" not in names  # @generated
    assert "site/torch/sparse/_triton_ops_meta.py" not in names  # a table of tuned numbers


def test_missing_package_is_recorded_not_fatal():
    corpus = embedded_corpus((("submitit", "submitit"), ("no_such_package_xyz", "no-such-package-xyz")))
    assert corpus.missing == ("no_such_package_xyz",)
    assert [name for name, _ in corpus.packages] == ["submitit"]
    assert any(n.startswith("site/submitit/") for n, _ in corpus.documents)
    assert not any(n.startswith("site/no_such") for n, _ in corpus.documents)


# Building and caching ----------------------------------------------------------------------------


def test_building_twice_gives_identical_bytes(small, tmp_path):
    first, _ = small
    second = prepare_data(small_cfg(tmp_path))
    assert second.fingerprint == first.fingerprint
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (first.train_path.parent / name).read_bytes() == (second.train_path.parent / name).read_bytes()
    assert read_meta(first)["build_id"] != read_meta(second)["build_id"]


def test_shards_decode_back_to_the_documents_separated_by_eod(small):
    prepared, _ = small
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


def test_tokenizer_chars_changes_the_tokenizer_but_not_the_documents(small, tmp_path):
    full, _ = small
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


def test_second_prepare_reuses_the_cache_without_rebuilding(small):
    prepared, cache = small
    before = read_meta(prepared)["build_id"], prepared.train_path.stat().st_mtime_ns
    again = prepare_data(small_cfg(cache))
    assert again == prepared
    assert (read_meta(again)["build_id"], again.train_path.stat().st_mtime_ns) == before


@pytest.mark.parametrize("damage", ["truncate_train", "drop_meta", "garble_meta"])
def test_corrupt_cache_entry_is_detected_and_rebuilt(small, tmp_path, damage):
    reference, _ = small
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


# User data --------------------------------------------------------------------------------------


def test_text_folder_with_txt_md_and_jsonl_documents(tmp_path):
    docs = write_text_folder(tmp_path / "corpus")
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus"), vocab_size=300, val_fraction=0.5)
    cfg = replace(cfg, cache_dir=str(tmp_path / "cache"))
    validate_data_config(cfg)
    prepared = prepare_data(cfg)
    meta = read_meta(prepared)
    assert meta["n_train_docs"] + meta["n_val_docs"] == len(docs) == 16
    assert meta["n_val_docs"] > 0 and meta["n_train_docs"] > 0
    tok = load_tokenizer(prepared)
    train_docs, val_docs = split_documents(sorted(docs.items()), 0.5)
    val_ids = shard(prepared, "val")
    texts = [tok.decode(p[:-1].tolist()) for p in np.split(val_ids, np.flatnonzero(val_ids == 0) + 1)[:-1]]
    assert texts == [text for _, text in val_docs]
    # These templated documents share 32-token spans, so train.bin is the training documents less
    # what they share with validation (moe.leakage): each piece between EODs lies in one of them, in order.
    assert meta["n_train_tokens_cut_as_leaked"] > 0
    train_ids = shard(prepared, "train")
    encoded = iter(tok.encode(text).ids for _, text in train_docs)
    doc = next(encoded)
    for piece in np.split(train_ids, np.flatnonzero(train_ids == 0) + 1)[:-1]:
        piece = piece[:-1].tolist()
        while not any(doc[i : i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1)):
            doc = next(encoded)  # StopIteration (a failure) if a piece is in no later document
    # the same documents elsewhere hash to the same cache entry
    moved = tmp_path / "moved"
    (tmp_path / "corpus").rename(moved)
    assert prepare_data(replace(cfg, path=str(moved))).fingerprint == prepared.fingerprint


def test_preparing_data_reports_tokenizer_training_and_tokenisation_progress_in_a_log(tmp_path, capfd):
    write_text_folder(tmp_path / "corpus")
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus"), vocab_size=300, val_fraction=0.5)
    prepared = prepare_data(replace(cfg, cache_dir=str(tmp_path / "cache")))
    meta = read_meta(prepared)
    err = capfd.readouterr().err  # not a terminal: plain start and end lines, no redrawn bar
    assert "data: training the BPE tokenizer, vocabulary 300 (" in err
    assert f"data: tokenizing train ({meta['n_train_docs']:,} docs) ..." in err
    assert re.search(rf"data: tokenizing val done, {meta['n_val_docs']:,} docs in [0-9.]+ s", err)
    assert "\r" not in err
    prepare_data(replace(cfg, cache_dir=str(tmp_path / "cache")))
    assert "data:" not in capfd.readouterr().err, "a cached corpus is not prepared again"


def test_tokens_source_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 1000, 5000)
    val = rng.integers(0, 1000, 700)
    write_token_folder(tmp_path / "toks", train, val, vocab_size=1000)
    cfg = DataConfig(source="tokens", path=str(tmp_path / "toks"), vocab_size=8192)
    validate_data_config(cfg)
    prepared = prepare_data(cfg)
    assert (prepared.vocab_size, prepared.dtype, prepared.tokenizer_path) == (1000, "uint16", None)
    assert (prepared.n_train_tokens, prepared.n_val_tokens) == (5000, 700)
    assert prepare_data(cfg).fingerprint == prepared.fingerprint
    x_BS, y_BS = validation_batches(prepared, seq_len=16, batch_size=4, max_tokens=None)[0]  # first of all 43
    assert_close(x_BS, torch.from_numpy(val[:64].reshape(4, 16)))
    assert_close(y_BS, torch.from_numpy(val[1:65].reshape(4, 16)))
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(prepared)


def test_tokens_source_uses_uint32_above_65536(tmp_path):
    ids = np.arange(100_000, 100_100)
    write_token_folder(tmp_path / "toks", ids, ids, vocab_size=200_000)
    prepared = prepare_data(DataConfig(source="tokens", path=str(tmp_path / "toks")))
    assert prepared.dtype == "uint32"
    x_BS, _ = validation_batches(prepared, seq_len=10, batch_size=1, max_tokens=10)[0]
    assert_close(x_BS[0], torch.arange(100_000, 100_010))


# Loader and validation batches ----------------------------------------------------------------------


def test_loader_batches_are_shifted_windows_at_multiples_of_seq_len(small):
    prepared, _ = small
    tokens = torch.from_numpy(shard(prepared, "train").astype(np.int64))
    loader = TokenLoader(prepared.train_path, seq_len=32, batch_size=8, seed=0)
    windows_B = loader.window_indices(0)
    x_BS, y_BS = loader.next_batch()
    assert x_BS.shape == y_BS.shape == (8, 32) and x_BS.dtype == torch.int64
    for w, x_S, y_S in zip(windows_B.tolist(), x_BS, y_BS, strict=True):
        assert_close(x_S, tokens[w * 32 : w * 32 + 32])
        assert_close(y_S, tokens[w * 32 + 1 : w * 32 + 33])
    assert loader.windows_per_epoch == (len(tokens) - 1) // 32


def test_loader_visits_every_window_once_per_epoch(small):
    prepared, _ = small
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


def test_epochs_seen_counts_windows_drawn(small):
    prepared, _ = small
    loader = TokenLoader(prepared.train_path, seq_len=64, batch_size=8, seed=0)
    assert loader.epochs_seen == 0.0
    for _ in range(3):
        loader.next_batch()
    assert loader.epochs_seen == pytest.approx(24 / loader.windows_per_epoch)
    loader.seek(loader.windows_per_epoch)  # W batches of 8 windows = 8 epochs
    assert loader.epochs_seen == pytest.approx(8.0)
    # epochs_for agrees: tokens predicted = windows * seq_len
    assert epochs_for(prepared.n_train_tokens, 64, 24 * 64) == pytest.approx(24 / loader.windows_per_epoch)


def test_loader_stream_depends_only_on_seed(small):
    prepared, _ = small

    def batches(**kw):
        loader = TokenLoader(prepared.train_path, seq_len=16, batch_size=4, **kw)
        return torch.stack([loader.next_batch()[0] for _ in range(3)])

    assert_close(batches(seed=1), batches(seed=1))
    assert not torch.equal(batches(seed=1), batches(seed=2))
    # ranks take their share of the one stream with seek(): the loader has no rank to differ by
    assert set(inspect.signature(TokenLoader).parameters) == {"path", "seq_len", "batch_size", "seed"}


def test_batch_m_is_the_same_after_seek_and_resume(small):
    prepared, _ = small
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


def test_check_budget_refuses_more_than_one_epoch_unless_allowed(small):
    prepared, _ = small
    one_epoch = (prepared.n_train_tokens - 1) // 64 * 64
    assert check_budget(prepared, 64, one_epoch, allow_repeat=False) == 1.0
    assert check_budget(prepared, 64, one_epoch // 2, allow_repeat=False) == pytest.approx(0.5, abs=1e-3)
    too_many = 3 * one_epoch
    with pytest.raises(ValueError) as err:
        check_budget(prepared, 64, too_many, allow_repeat=False)
    message = str(err.value)
    for part in (f"train.tokens={too_many}", "3.00 epochs", f"{prepared.n_train_tokens:,}",
                 prepared.fingerprint, "data.allow_repeat=true", "data.max_chars"):  # fmt: skip
        assert part in message, part
    assert check_budget(prepared, 64, too_many, allow_repeat=True) == pytest.approx(3.0)
    assert epochs_for(prepared.n_train_tokens, 64, too_many) == pytest.approx(3.0)


def test_validation_windows_are_spread_over_the_whole_val_split_and_identical_across_calls(small):
    prepared, _ = small
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


def test_unigram_entropy_matches_the_closed_form(tmp_path):
    ids = np.array([0, 1, 2, 3] * 50 + [4] * 200)  # p = 1/8 x4, 1/2
    write_token_folder(tmp_path / "toks", ids, ids, vocab_size=5)
    expected = -(4 * (1 / 8) * math.log(1 / 8) + 0.5 * math.log(0.5))
    assert unigram_entropy(tmp_path / "toks" / "val.bin") == pytest.approx(expected)


# Bad inputs ---------------------------------------------------------------------------------------


def _text(folder: Path, files: dict[str, str]) -> DataConfig:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return DataConfig(source="text", path=str(folder))


def _tokens(folder: Path, damage: str) -> DataConfig:
    write_token_folder(folder, np.arange(100) % 50, np.arange(40) % 50, vocab_size=50)
    if damage == "odd_size":
        with open(folder / "train.bin", "ab") as f:
            f.write(b"\x01")
    elif damage == "id_too_big":
        np.array([7, 60, 3], "<u2").tofile(folder / "val.bin")
    elif damage == "no_meta":
        (folder / "meta.json").unlink()
    elif damage == "meta_lacks_dtype":
        (folder / "meta.json").write_text(json.dumps({"version": 1, "vocab_size": 50}))
    elif damage == "empty_val":
        (folder / "val.bin").write_bytes(b"")
    elif damage == "no_val":
        (folder / "val.bin").unlink()
    return DataConfig(source="tokens", path=str(folder))


BAD = {
    "missing_folder": (lambda p: DataConfig(source="text", path=str(p / "nope")), "data.path"),
    "no_path": (lambda p: DataConfig(source="tokens"), "data.path"),
    "empty_folder": (lambda p: _text(p / "empty", {}), "data.path"),
    "no_text_files": (lambda p: _text(p / "csv", {"a.csv": "x,y\n"}), r"data.path.*\.txt"),
    "blank_documents": (lambda p: _text(p / "blank", {"a.txt": "  \n", "b.md": ""}), "data.path.*empty"),
    "jsonl_without_text": (
        lambda p: _text(p / "j", {"a.jsonl": '{"text": "fine"}\n{"body": "oops"}\n'}),
        'data.path.*a.jsonl line 2 has no "text"',
    ),
    "jsonl_not_json": (lambda p: _text(p / "j2", {"a.jsonl": "{oops\n"}), "data.path.*not valid JSON"),
    "too_few_documents_for_val": (
        lambda p: _text(p / "few", {"only.txt": "one lonely document"}),
        "data.val_fraction",
    ),
    "shard_size_not_multiple": (lambda p: _tokens(p / "t", "odd_size"), r"data.path.*train.bin.*multiple"),
    "token_id_over_vocab": (
        lambda p: _tokens(p / "t", "id_too_big"),
        r"data.path.*val.bin.*60 >= .*vocab_size=50",
    ),
    "meta_missing": (lambda p: _tokens(p / "t", "no_meta"), "data.path.*meta.json"),
    "meta_lacks_dtype": (lambda p: _tokens(p / "t", "meta_lacks_dtype"), "data.path.*dtype"),
    "val_shard_empty": (lambda p: _tokens(p / "t", "empty_val"), r"data.path.*val.bin holds 0 tokens"),
    "val_shard_missing": (lambda p: _tokens(p / "t", "no_val"), r"data.path.*val.bin is missing"),
    "vocab_too_small": (lambda p: DataConfig(vocab_size=MIN_VOCAB - 1), "data.vocab_size=256"),
    "vocab_too_large": (lambda p: DataConfig(vocab_size=MAX_VOCAB + 1), "data.vocab_size"),
    "val_fraction_zero": (lambda p: DataConfig(val_fraction=0.0), r"data.val_fraction=0.0 .*\(0, 0.5\]"),
    "val_fraction_above_half": (lambda p: DataConfig(val_fraction=0.6), "data.val_fraction=0.6"),
    "max_chars_zero": (lambda p: DataConfig(max_chars=0), "data.max_chars=0"),
    "tokenizer_chars_negative": (lambda p: DataConfig(tokenizer_chars=-1), "data.tokenizer_chars=-1"),
    "unknown_source": (lambda p: DataConfig(source="web"), "data.source='web'"),
    "path_with_stdlib": (lambda p: DataConfig(path=str(p)), "data.path=.*data.source=stdlib"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_key(tmp_path, case):
    make, pattern = BAD[case]
    cfg = replace(make(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=pattern):
        validate_data_config(cfg)
    with pytest.raises(ValueError, match=pattern):
        prepare_data(cfg)
    assert not (tmp_path / "cache").exists()  # rejected before any work


def test_loader_rejects_a_shard_shorter_than_one_window(tmp_path):
    write_token_folder(tmp_path / "t", np.arange(10), np.arange(10), vocab_size=10)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(tmp_path / "t" / "train.bin", seq_len=10, batch_size=1, seed=0)


# Full default corpus -------------------------------------------------------------------------------


def default_cfg(cache: Path) -> DataConfig:
    """The data config of conf/data/stdlib.yaml (the default corpus), on a private cache."""
    fields = yaml.safe_load((Path(__file__).parents[1] / "conf" / "data" / "stdlib.yaml").read_text())
    return DataConfig(**{**fields, "cache_dir": str(cache)})


@pytest.mark.slow
def test_default_corpus_has_12m_training_tokens_records_packages_and_rebuilds_identically(tmp_path):
    t0 = time.perf_counter()
    prepared = prepare_data(default_cfg(tmp_path / "a"))
    elapsed = time.perf_counter() - t0
    meta = read_meta(prepared)
    # Its <= 60 s build-time target is measured by `python -m moe.data_bench`, not asserted here.
    print(f"\ndefault corpus: {elapsed:.1f} s, {prepared.fingerprint}, meta={json.dumps(meta)}")
    assert prepared.n_train_tokens >= 12_000_000 and prepared.n_val_tokens > 200_000
    assert prepared.vocab_size == meta["tokenizer_vocab_size"] == 2048
    assert meta["python_version"].startswith("3.")
    assert set(meta["packages"]) | set(meta["missing_packages"]) == {name for name, _ in EMBEDDED_PACKAGES}
    assert meta["packages"]["torch"].startswith("2.")
    # the preset studies' largest budget (8M tokens) fits in one epoch at their sequence lengths
    assert check_budget(prepared, 256, 8_000_000, allow_repeat=False) < 1.0
    # a second fresh build (another cache) is byte-identical under the same fingerprint
    again = prepare_data(default_cfg(tmp_path / "b"))
    assert again.fingerprint == prepared.fingerprint
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (again.train_path.parent / name).read_bytes() == (
            prepared.train_path.parent / name
        ).read_bytes()
    # a context-free model's loss is the unigram entropy; it must be well above 0 and below log(V)
    assert 4.0 < unigram_entropy(prepared.val_path) < math.log(2048)


def test_data_bench_builds_a_corpus_on_a_fresh_cache_and_reports_its_time(tmp_path):
    from moe import data_bench

    config = tmp_path / "small.yaml"
    config.write_text("source: stdlib\nvocab_size: 512\nval_fraction: 0.2\nmax_chars: 800000\n")
    row = data_bench.main(["--config", str(config)])
    assert row["wall_s"] > 0 and row["n_train_tokens"] > 10_000 and row["n_val_tokens"] > 1_000
    assert row["fingerprint"].startswith("stdlib-v512-")
