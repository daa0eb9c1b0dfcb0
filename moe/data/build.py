"""Building a cache entry for data.source=stdlib/text: the fingerprint that names it, the tokenizer, the
shards and meta.json. moe.data.prepare decides when to build (cache, lock, install); this module says what.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

from moe.data.config import DataConfig
from moe.data.corpus import (
    BPE_MIN_FREQUENCY,
    CORPUS_VERSION,
    EOD_TOKEN,
    FORMAT_VERSION,
    SPECIAL_TOKENS,
    dtype_for_vocab,
    embedded_corpus,
    hash_documents,
    train_tokenizer,
    unigram_entropy,
    write_shard,
)
from moe.data.progress import stage
from moe.data.spans import SPAN, remove_leaked_spans
from moe.data.split import Document, cap_chars
from moe.files import write_json_atomic


def tokenizer_cap(cfg: DataConfig, train: list[Document]) -> int | None:
    """data.tokenizer_chars if it binds, else None: a cap above the training split changes nothing,
    so it must not change the fingerprint either."""
    cap = cfg.tokenizer_chars
    return cap if cap is not None and cap < sum(len(t) for _, t in train) else None


def tokenizer_settings(cfg: DataConfig, tokenizer_cap: int | None) -> dict:
    """What decides the tokenizer: a pretrained file's content, or the BPE recipe."""
    if cfg.tokenizer_file is not None:
        from moe.data.hf_data import file_digest

        return {
            "format": FORMAT_VERSION,
            "corpus": CORPUS_VERSION,
            "vocab_size": cfg.vocab_size,
            "tokenizer_file_sha256": file_digest(Path(cfg.tokenizer_file).expanduser()),
        }
    return {
        "format": FORMAT_VERSION,
        "corpus": CORPUS_VERSION,
        "tokenizer_chars": tokenizer_cap,
        "vocab_size": cfg.vocab_size,
        "specials": SPECIAL_TOKENS,
        "min_frequency": BPE_MIN_FREQUENCY,
    }


def fingerprint(cfg: DataConfig, train: list[Document], val: list[Document]) -> str:
    h = hashlib.sha256()
    # the leak span decides what build_shards cuts from train.bin; tokenizer_settings (shared with the
    # hf source, which cuts nothing) must not carry it
    settings = {**tokenizer_settings(cfg, tokenizer_cap(cfg, train)), "leak_span": SPAN}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for part, docs in (("train", train), ("val", val)):
        h.update(part.encode())
        hash_documents(h, docs)
    return f"{cfg.source}-v{cfg.vocab_size}-{h.hexdigest()[:16]}"


def build_shards(cfg: DataConfig, train: list[Document], val: list[Document], out: Path) -> None:
    """Write tokenizer.json, train.bin, val.bin into `out`, then meta.json last (it marks completion).
    train.bin is cut of every span of SPAN tokens that also occurs in val.bin (moe.data.leakage)."""
    dtype = dtype_for_vocab(cfg.vocab_size)
    t0 = time.perf_counter()
    tokenizer_docs = [] if cfg.tokenizer_file else cap_chars(train, tokenizer_cap(cfg, train))
    tokenizer, eod = make_tokenizer(cfg, lambda: [text for _, text in tokenizer_docs])
    t1 = time.perf_counter()
    tokenizer.save(str(out / "tokenizer.json"))
    write_shard(tokenizer, train, out / "train.bin", dtype, eod)
    n_val = write_shard(tokenizer, val, out / "val.bin", dtype, eod)
    t2 = time.perf_counter()
    with stage(f"cutting training spans of {SPAN} tokens seen in validation", unit="tokens") as advance:
        n_train, n_cut = remove_leaked_spans(out / "train.bin", out / "val.bin", dtype, eod, SPAN)
        advance(n_cut)
    meta = {
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
        "eod_id": eod,
        "tokenizer_file": cfg.tokenizer_file,
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "leak_span": SPAN,
        "n_train_tokens_cut_as_leaked": n_cut,
        "source": cfg.source,
        "n_train_docs": len(train),
        "n_val_docs": len(val),
        "n_train_chars": sum(len(t) for _, t in train),
        "n_val_chars": sum(len(t) for _, t in val),
        "n_tokenizer_chars": sum(len(t) for _, t in tokenizer_docs),
        **provenance(cfg),
        "val_unigram_entropy_nats": unigram_entropy(out / "val.bin", dtype),
        "tokenizer_train_s": round(t1 - t0, 3),
        "encode_s": round(t2 - t1, 3),
        "leak_cut_s": round(time.perf_counter() - t2, 3),
        "build_id": uuid.uuid4().hex,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out / "meta.json", meta)


def make_tokenizer(cfg: DataConfig, texts):
    """(tokenizer, eod id): data.tokenizer_file's, or a BPE trained on texts()."""
    if cfg.tokenizer_file is not None:
        from moe.data.hf_data import pretrained_tokenizer

        return pretrained_tokenizer(cfg)
    tokenizer = train_tokenizer(texts(), cfg.vocab_size)
    return tokenizer, tokenizer.token_to_id(EOD_TOKEN)


def provenance(cfg: DataConfig) -> dict:
    """Where an embedded corpus came from: the interpreter and the package versions that were read.
    Informational only; the fingerprint hashes the content itself."""
    if cfg.source != "stdlib":
        return {}
    corpus = embedded_corpus()
    return {
        "python_version": corpus.python,
        "packages": dict(corpus.packages),
        "missing_packages": list(corpus.missing),
    }
