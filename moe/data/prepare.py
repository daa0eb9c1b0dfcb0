"""Data pipeline: corpus -> byte-level BPE -> cached, memory-mapped token shards -> batches.

`prepare_data` turns a `DataConfig` into two flat token files (train.bin, val.bin) plus meta.json and
tokenizer.json, cached under `cache_dir/<fingerprint>/`. The fingerprint hashes the corpus content, the
tokenizer settings and FORMAT_VERSION, so a different Python version (different stdlib) or a changed
folder gets a new entry, and an unchanged one is reused by every sweep point. See docs/data.md.

Shard format: raw little-endian uint16 (vocab <= 65536) or uint32 token ids, documents each followed by
the end-of-document token; meta.json beside them describes dtype, vocab_size and token counts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock

from moe.data import build as data_build
from moe.data.config import MAX_VOCAB, MIN_VOCAB, SOURCES, DataConfig, PreparedData, cache_root
from moe.data.corpus import (
    DTYPES,
    FORMAT_VERSION,
    SPECIAL_TOKENS,
    embedded_corpus,
    read_meta,
    read_token_folder,
    stdlib_root,
    text_files,
    text_folder_documents,
)
from moe.data.split import Document, cap_chars, split_documents
from moe.files import write_json_atomic

log = logging.getLogger(__name__)

# Validation ---------------------------------------------------------------------------------------


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the `data.<key>` at fault. Reads a text corpus once; never writes."""
    _check_fields(cfg)
    if cfg.source == "tokens":
        read_token_folder(_existing_folder(cfg))
        return
    if cfg.tokenizer_file is not None:
        from moe.data.hf_data import pretrained_tokenizer

        pretrained_tokenizer(cfg)
    if cfg.source == "hf":
        from moe.data.hf_data import check_source

        check_source(cfg)
    else:
        _load_split(cfg)


def _check_fields(cfg: DataConfig) -> None:
    """Checks that need no file access."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} must be one of {SOURCES}")
    if not 0.0 < cfg.val_fraction <= 0.5:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 0.5]")
    if cfg.max_chars is not None and cfg.max_chars <= 0:
        raise ValueError(f"data.max_chars={cfg.max_chars} must be positive or None")
    if cfg.tokenizer_chars is not None and cfg.tokenizer_chars <= 0:
        raise ValueError(f"data.tokenizer_chars={cfg.tokenizer_chars} must be positive or None")
    if cfg.source != "tokens" and not MIN_VOCAB <= cfg.vocab_size <= MAX_VOCAB:
        raise ValueError(
            f"data.vocab_size={cfg.vocab_size} must be in [{MIN_VOCAB}, {MAX_VOCAB}] "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens at least)"
        )
    if cfg.source == "stdlib" and cfg.path is not None:
        raise ValueError(f"data.path={cfg.path!r} is set but data.source=stdlib does not read it")
    if cfg.source != "hf" and cfg.text_column != "text":
        raise ValueError(f"data.text_column={cfg.text_column!r} is set but only data.source=hf reads it")
    if not cfg.text_column:
        raise ValueError("data.text_column='' must name a column")
    if cfg.workers < 0:
        raise ValueError(f"data.workers={cfg.workers} must be >= 0")
    if cfg.tokenizer_file is not None:
        if cfg.source == "tokens":
            raise ValueError(
                f"data.tokenizer_file={cfg.tokenizer_file!r} is set but data.source=tokens is already tokenised"
            )
        if not Path(cfg.tokenizer_file).expanduser().is_file():
            raise ValueError(f"data.tokenizer_file={cfg.tokenizer_file!r} is not an existing file")


def _existing_folder(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.source={cfg.source}")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data.path={cfg.path!r} is not an existing folder (data.source={cfg.source})")
    if not any(folder.iterdir()):
        raise ValueError(f"data.path={cfg.path!r} is an empty folder")
    return folder


def _load_documents(cfg: DataConfig) -> list[Document]:
    if cfg.source == "stdlib":
        root = stdlib_root()
        if not root.is_dir():
            raise ValueError(f"data.source=stdlib: the standard library folder {root} does not exist")
        docs = list(embedded_corpus().documents)
        where = f"data.source=stdlib ({root})"
    else:
        folder = _existing_folder(cfg)
        if not text_files(folder):
            raise ValueError(f"data.path={cfg.path!r} holds no .txt, .md or .jsonl files (data.source=text)")
        docs = text_folder_documents(folder)
        where = f"data.path={cfg.path!r}"
    if not docs:
        raise ValueError(f"{where}: the corpus is empty (every document is blank)")
    return docs


def _load_split(cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """Documents after max_chars, split; raises before any tokenizer work if either side is empty."""
    docs = cap_chars(_load_documents(cfg), cfg.max_chars)
    train, val = split_documents(docs, cfg.val_fraction)
    if not val:
        raise ValueError(
            f"data.val_fraction={cfg.val_fraction} puts none of the {len(docs)} documents in validation "
            f"(data.max_chars={cfg.max_chars}); use more documents or a larger fraction"
        )
    if not train:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} leaves no training documents of {len(docs)}")
    return train, val


# Token shards --------------------------------------------------------------------------------------


def _prepared_from_folder(folder: Path, fingerprint: str | None) -> PreparedData:
    """Checked PreparedData for a shard folder; fingerprint None means a user folder (hash it)."""
    meta, n_train, n_val = read_token_folder(folder)
    fingerprint = fingerprint if fingerprint is not None else _tokens_fingerprint(folder)
    tok = folder / "tokenizer.json"
    return PreparedData(
        train_path=folder / "train.bin",
        val_path=folder / "val.bin",
        tokenizer_path=tok if tok.is_file() else None,
        vocab_size=meta["vocab_size"],
        n_train_tokens=n_train,
        n_val_tokens=n_val,
        fingerprint=fingerprint,
        dtype=meta["dtype"],
    )


def _tokens_fingerprint(folder: Path) -> str:
    """Identity of a user shard folder without reading it all: meta, sizes and the first/last MiB."""
    h = hashlib.sha256(f"tokens-v{FORMAT_VERSION}".encode())
    h.update((folder / "meta.json").read_bytes())
    for name in ("train.bin", "val.bin"):
        path = folder / name
        size = path.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            h.update(f.read(2**20))
            f.seek(max(size - 2**20, 0))
            h.update(f.read(2**20))
    return f"tokens-{h.hexdigest()[:16]}"


def _cache_entry_ok(entry: Path) -> bool:
    """A complete entry has meta.json (written last), tokenizer.json and shards of the stated sizes."""
    try:
        meta = read_meta(entry)
        itemsize = DTYPES[meta["dtype"]].itemsize
        return (
            (entry / "tokenizer.json").is_file()
            and (entry / "train.bin").stat().st_size == meta["n_train_tokens"] * itemsize
            and (entry / "val.bin").stat().st_size == meta["n_val_tokens"] * itemsize
        )
    except (ValueError, KeyError, OSError):
        return False


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Build the shards for `cfg`, or reuse the cached ones. Safe to call from many processes at once:
    one builds (under a file lock, into a temp dir renamed into place) and the others wait and reuse."""
    _check_fields(cfg)
    if cfg.source == "tokens":
        return _prepared_from_folder(_existing_folder(cfg), None)
    cache = cache_root(cfg.cache_dir)
    if cfg.source == "hf":
        return _prepare_hf(cfg, cache)
    train, val = _load_split(cfg)
    fingerprint = data_build.fingerprint(cfg, train, val)
    entry = cache / fingerprint
    if not _cache_entry_ok(entry):
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / f"{fingerprint}.lock")):
            if not _cache_entry_ok(entry):  # another process may have built it while we waited
                _build_entry(cfg, train, val, entry)
    return _prepared_from_folder(entry, fingerprint)


def _prepare_hf(cfg: DataConfig, cache: Path) -> PreparedData:
    """data.source=hf through moe.data.hf_data's resumable streaming build, cached like the other sources."""
    from moe.data import hf_build, hf_data

    hf_data.check_source(cfg)
    settings = {
        **data_build.tokenizer_settings(cfg, cfg.tokenizer_chars),
        "source": "hf",
        "text_column": cfg.text_column,
        "max_chars": cfg.max_chars,
        "val_fraction": cfg.val_fraction,
    }
    cache.mkdir(parents=True, exist_ok=True)
    fp = hf_data.fingerprint(cfg, settings, cache)
    entry = cache / fp
    if not _cache_entry_ok(entry):
        with FileLock(str(cache / f"{fp}.lock")):
            if not _cache_entry_ok(entry):
                t0 = time.perf_counter()
                work = cache / f".partial-{fp}"
                meta = hf_build.build_resumable(
                    cfg, work, fp, lambda: data_build.make_tokenizer(cfg, lambda: hf_data.training_texts(cfg))
                )
                write_json_atomic(work / "meta.json", meta)
                _install(work, entry)
                log.info("built data cache %s in %.1f s", entry, time.perf_counter() - t0)
    return _prepared_from_folder(entry, fp)


def _build_entry(cfg: DataConfig, train: list[Document], val: list[Document], entry: Path) -> None:
    """Build in a private temp dir and rename it into place, so readers never see a partial entry."""
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        data_build.build_shards(cfg, train, val, tmp)
        _install(tmp, entry)
        log.info("built data cache %s in %.1f s", entry, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(built: Path, entry: Path) -> None:
    """Rename a finished build into place; a corrupt or partial entry is moved aside first (rename
    cannot replace a non-empty folder)."""
    if entry.exists():
        trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
        os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(built, entry)


def load_tokenizer(prepared: PreparedData):
    """The tokenizers.Tokenizer of the shards, for decoding samples."""
    if prepared.tokenizer_path is None:
        raise ValueError(
            f"data {prepared.fingerprint} has no tokenizer.json (data.source=tokens without one)"
        )
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(prepared.tokenizer_path))
