"""data.source=hf, the build: one streaming pass that encodes the documents (moe.data.hf_data reads
them) into the token shards, in `data.workers` processes, resumable from its last progress record.

The build lives in `<cache>/.partial-<fingerprint>/` and records its position in progress.json every
CHECKPOINT_BATCHES batches (after an fsync of the shards): an interrupted build resumes there. At most
2 batches per worker are in flight and results are written in stream order, so the shards do not
depend on the worker count.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import time
import uuid
from pathlib import Path

import numpy as np

from moe.data.corpus import DTYPES, EOD_TOKEN, FORMAT_VERSION, dtype_for_vocab, unigram_entropy
from moe.data.hf_data import BATCH_DOCS, capped_texts
from moe.data.split import unit_hash

log = logging.getLogger(__name__)

_WORKER: dict = {}
"""A worker process's tokenizer and settings (set by _init_worker)."""

CHECKPOINT_BATCHES = 8
"""Batches between progress checkpoints (fsync of the shards + progress.json)."""
PROGRESS_EVERY_S = 10.0


def build_resumable(cfg, work: Path, fp: str, make_tokenizer) -> dict:
    """data.source=hf: one streaming pass into `work` (`.partial-<fingerprint>/`, which survives an
    interruption and is resumed) and the meta.json content; moe.data.prepare writes it and installs the entry.
    make_tokenizer() -> (tokenizer, eod id): trains the BPE or loads data.tokenizer_file."""
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if cfg.tokenizer_file is None and (work / "tokenizer.json").is_file():  # resumed: reuse it
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(work / "tokenizer.json"))
        eod = tokenizer.token_to_id(EOD_TOKEN)
    else:
        tokenizer, eod = make_tokenizer()
        tokenizer.save(str(work / ".tokenizer.json.tmp"))
        os.replace(work / ".tokenizer.json.tmp", work / "tokenizer.json")
    t1 = time.perf_counter()
    counts = build(cfg, work, tokenizer, eod, fp)
    if counts["n_val_docs"] == 0 or counts["n_train_docs"] == 0:
        n_docs = counts["n_train_docs"] + counts["n_val_docs"]
        raise ValueError(
            f"data.val_fraction={cfg.val_fraction} splits the {n_docs} documents of "
            f"data.path={cfg.path!r} into {counts['n_train_docs']} train / "
            f"{counts['n_val_docs']} validation: both need some"
        )
    dtype = dtype_for_vocab(cfg.vocab_size)
    meta = {
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
        "eod_id": eod,
        "tokenizer_file": cfg.tokenizer_file,
        "source": "hf",
        "path": cfg.path,
        "text_column": cfg.text_column,
        **counts,
        "val_unigram_entropy_nats": unigram_entropy(work / "val.bin", dtype),
        "tokenizer_train_s": round(t1 - t0, 3),
        "build_id": uuid.uuid4().hex,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (work / "progress.json").unlink()
    return meta


# The streaming build ---------------------------------------------------------------------------


def _init_worker(tokenizer_json: str, eod: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eod=eod, dtype=dtype)


def _encode(texts: list[str], is_val: list[bool]) -> tuple[bytes, int, bytes, int]:
    """Train and val token bytes (each document followed by EOD) of one batch, in order."""
    tok, eod, dt = _WORKER["tok"], _WORKER["eod"], DTYPES[_WORKER["dtype"]]
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for enc, val in zip(tok.encode_batch_fast(texts, add_special_tokens=False), is_val, strict=True):
        parts[val].append(np.asarray(enc.ids + [eod], dtype=dt))
    out = []
    for val in (False, True):
        arr = np.concatenate(parts[val]) if parts[val] else np.zeros(0, dt)
        out += [arr.tobytes(), len(arr)]
    return tuple(out)


def _batches(cfg, progress: dict):
    """Batches ([texts], [is_val]) of the stream after progress['rows'], with the row after each."""
    texts, flags = [], []
    for row, text in capped_texts(cfg, progress["rows"], progress["chars"]):
        texts.append(text)
        flags.append(unit_hash(text, "val") < cfg.val_fraction)
        if len(texts) == BATCH_DOCS:
            yield texts, flags, row, sum(map(len, texts))
            texts, flags = [], []
    if texts:
        yield texts, flags, None, sum(map(len, texts))


def _save_progress(work: Path, progress: dict, files) -> None:
    for f in files:
        f.flush()
        os.fsync(f.fileno())
    tmp = work / ".progress.json.tmp"
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, work / "progress.json")


def build(cfg, work: Path, tokenizer, eod: int, fp: str) -> dict:
    """Stream the dataset into work/{train,val}.bin (resuming from work/progress.json); returns counts."""
    dtype = dtype_for_vocab(cfg.vocab_size)
    itemsize = DTYPES[dtype].itemsize
    progress = {"fingerprint": fp, "rows": 0, "chars": 0, "docs": [0, 0], "tokens": [0, 0], "done": False}
    saved = work / "progress.json"
    if saved.is_file() and json.loads(saved.read_text()).get("fingerprint") == fp:
        progress = json.loads(saved.read_text())
        log.info("data %s: resuming the build after row %d", fp, progress["rows"])
    files = []
    for name, n in zip(("train", "val"), progress["tokens"], strict=True):
        path = work / f"{name}.bin"
        path.touch()
        os.truncate(path, n * itemsize)  # drop what was written after the last checkpoint
        files.append(open(path, "ab"))  # noqa: SIM115 - closed in finally
    resumed_rows = progress["rows"]
    t0 = last_report = time.perf_counter()
    _init_worker(tokenizer.to_str(), eod, dtype)
    pool = None
    if cfg.workers > 0:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold tokenizer threads
        pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(tokenizer.to_str(), eod, dtype))
    pending: collections.deque = collections.deque()
    try:
        n_batches = 0

        def drain_one() -> None:
            nonlocal n_batches, last_report
            result, end_row, n_chars, n_docs = pending.popleft()
            tr, n_tr, va, n_va = result.get() if pool is not None else result
            files[0].write(tr)
            files[1].write(va)
            progress["tokens"][0] += n_tr
            progress["tokens"][1] += n_va
            progress["docs"][0] += n_docs[0]
            progress["docs"][1] += n_docs[1]
            progress["chars"] += n_chars
            n_batches += 1
            if end_row is not None:
                progress["rows"] = end_row
                if n_batches % CHECKPOINT_BATCHES == 0:
                    _save_progress(work, progress, files)
            if time.perf_counter() - last_report > PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                rate = (progress["chars"] / 1e6) / max(last_report - t0, 1e-9)
                log.info(
                    "data %s: %d rows, %.1f M chars, %d tokens (%.1f M chars/s)",
                    fp,
                    progress["rows"],
                    progress["chars"] / 1e6,
                    sum(progress["tokens"]),
                    rate,
                )

        stream = () if progress["done"] else _batches(cfg, progress)  # done: killed before the rename
        for texts, flags, end_row, n_chars in stream:
            n_docs = (flags.count(False), flags.count(True))
            if pool is not None:
                result = pool.apply_async(_encode, (texts, flags))
            else:
                result = _encode(texts, flags)
            pending.append((result, end_row, n_chars, n_docs))
            while len(pending) > 2 * max(cfg.workers, 1) - 1 or (pool is None and pending):
                drain_one()
        while pending:
            drain_one()
        progress["done"] = True
        _save_progress(work, progress, files)
    finally:
        for f in files:
            f.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if progress["docs"] == [0, 0]:
        raise ValueError(
            f"data.path={cfg.path!r} is an empty dataset: every {cfg.text_column!r} is blank or missing"
        )
    return {
        "n_train_tokens": progress["tokens"][0],
        "n_val_tokens": progress["tokens"][1],
        "n_train_docs": progress["docs"][0],
        "n_val_docs": progress["docs"][1],
        "n_chars": progress["chars"],
        "resumed_after_row": resumed_rows,
        "encode_s": round(time.perf_counter() - t0, 3),
    }
