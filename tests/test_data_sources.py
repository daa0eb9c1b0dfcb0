"""User data (data.source=text and tokens) and bad data inputs refused with a ValueError naming the key."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_meta, shard, write_token_folder
from torch.testing import assert_close

from moe.data.config import MAX_VOCAB, MIN_VOCAB, DataConfig
from moe.data.loader import validation_batches
from moe.data.prepare import load_tokenizer, prepare_data, validate_data_config
from moe.data.split import split_documents


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
    # what they share with validation (moe.data.leakage): each piece between EODs lies in one of them, in order.
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
