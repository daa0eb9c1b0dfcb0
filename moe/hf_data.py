"""data.source=hf: local parquet / arrow / jsonl(.gz/.zst) datasets read through Hugging Face `datasets`,
tokenised in one streaming pass into the token shard format of moe.corpus (see docs/data.md).

- Reading streams (`load_dataset(..., streaming=True)`, or `load_from_disk` for a save_to_disk folder),
  BATCH_DOCS documents at a time, only the text column: memory does not grow with the corpus.
- Documents go to validation by a hash of their text (identical documents land on the same side);
  data.max_chars keeps the first max_chars characters in stream order.
- Encoding runs in `data.workers` processes (0: this process, with the tokenizers library's threads);
  at most 2 batches per worker are in flight, and results are written in stream order, so the shards
  do not depend on the worker count.
- The build lives in `<cache>/.partial-<fingerprint>/` and records its position in progress.json
  every CHECKPOINT_BATCHES batches (after an fsync of the shards): an interrupted build resumes there.
- The fingerprint hashes the settings, the tokenizer and every data file's bytes (the digest of a
  file is memoised by path, size and mtime, so an unchanged corpus is not re-read on every call).

`datasets` is imported lazily (the `hf` extra); a pretrained tokenizer needs only `tokenizers`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import time
import uuid
from pathlib import Path

import numpy as np

from moe.corpus import DTYPES, EOD_TOKEN, FORMAT_VERSION, dtype_for_vocab, unigram_entropy
from moe.split import unit_hash

log = logging.getLogger(__name__)

BATCH_DOCS = 512
"""Documents read and encoded per batch."""
CHECKPOINT_BATCHES = 8
"""Batches between progress checkpoints (fsync of the shards + progress.json)."""
PROGRESS_EVERY_S = 10.0
PARQUET, JSON, ARROW = "parquet", "json", "arrow"
SUFFIXES = {".parquet": PARQUET, ".jsonl": JSON, ".jsonl.gz": JSON, ".jsonl.zst": JSON, ".json.gz": JSON}
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
"""End-of-document tokens looked for, in this order, in a pretrained tokenizer."""


def _suffix(path: Path) -> str | None:
    name = path.name
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def dataset_files(path_str: str | None) -> tuple[str, Path, list[Path]]:
    """(kind, root, data files) of data.path: a save_to_disk folder (arrow), or parquet / jsonl files."""
    if path_str is None:
        raise ValueError("data.path is required for data.source=hf")
    root = Path(path_str).expanduser()
    if not root.exists():
        raise ValueError(f"data.path={path_str!r} does not exist (data.source=hf)")
    if root.is_dir() and (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        return ARROW, root, sorted(root.glob("*.arrow")) + [root / "state.json"]
    if root.is_dir() and (root / "dataset_dict.json").is_file():
        return ARROW, root, sorted(root.rglob("*.arrow")) + sorted(root.rglob("state.json"))
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    )
    kinds = {SUFFIXES[s] for f in files if (s := _suffix(f)) is not None}
    files = [f for f in files if _suffix(f) is not None]
    if not files:
        raise ValueError(
            f"data.path={path_str!r} holds no dataset: expected a save_to_disk folder or "
            f"{', '.join(SUFFIXES)} files (data.source=hf)"
        )
    if len(kinds) > 1:
        raise ValueError(f"data.path={path_str!r} mixes parquet and json files; point data.path at one kind")
    return kinds.pop(), root, files


def _open(cfg, skip: int = 0):
    """The dataset as an iterable of batches {text_column: [...]}, starting after `skip` rows."""
    import datasets

    kind, root, files = dataset_files(cfg.path)
    if kind == ARROW:
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(
                    f"data.path={cfg.path!r} is a DatasetDict without a 'train' split ({list(ds)})"
                )
            ds = ds["train"]
        columns = ds.column_names
        ds = ds.to_iterable_dataset()
    else:
        if kind == PARQUET:  # the parquet reader fails on a file of no rows (batch size 0): leave those out
            import pyarrow.parquet as pq

            files = [f for f in files if pq.ParquetFile(f).metadata.num_rows > 0]
            if not files:
                raise ValueError(f"data.path={cfg.path!r} is an empty dataset (no rows; data.source=hf)")
            import pyarrow.dataset as pds

            # pre_buffer would read a whole file's column chunks up front: memory then grows with file size
            extra = {"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)}
        else:
            extra = {}
        ds = datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", streaming=True, **extra
        )
        columns = ds.column_names
    if columns is not None and cfg.text_column not in columns:
        raise ValueError(
            f"data.text_column={cfg.text_column!r} is not a column of data.path={cfg.path!r} (columns: {columns})"
        )
    ds = ds.select_columns([cfg.text_column])
    return ds.skip(skip).iter(batch_size=BATCH_DOCS) if skip else ds.iter(batch_size=BATCH_DOCS)


def check_source(cfg) -> None:
    """Cheap checks of an hf source (reads the first batch only): path, format, column, not empty."""
    batch = next(iter(_open(cfg)), None)
    if batch is None or not batch.get(cfg.text_column):
        raise ValueError(f"data.path={cfg.path!r} is an empty dataset (no rows; data.source=hf)")


# Pretrained tokenizers ---------------------------------------------------------------------------


def pretrained_tokenizer(cfg):
    """(Tokenizer, eod id) of data.tokenizer_file, checked against data.vocab_size and the shard dtype."""
    from tokenizers import Tokenizer

    path = Path(cfg.tokenizer_file).expanduser()
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
        raise ValueError(
            f"data.tokenizer_file={cfg.tokenizer_file!r} is not a tokenizers file ({exc})"
        ) from exc
    vocab = tok.get_vocab(with_added_tokens=True)
    n_ids = max(vocab.values()) + 1
    if n_ids > cfg.vocab_size:
        dtype = dtype_for_vocab(cfg.vocab_size)
        raise ValueError(
            f"data.tokenizer_file={cfg.tokenizer_file!r} has ids up to {n_ids - 1}, which do not fit "
            f"data.vocab_size={cfg.vocab_size} (shard dtype {dtype}, the model's vocabulary): set "
            f"data.vocab_size >= {n_ids} (uint16 shards hold up to 65536 ids, uint32 beyond)"
        )
    eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
    if eod is None:
        raise ValueError(
            f"data.tokenizer_file={cfg.tokenizer_file!r} has none of the end-of-document tokens {EOD_CANDIDATES}"
        )
    return tok, eod


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _memo_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of a file, memoised under memo_dir by (absolute path, size, mtime_ns)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = memo_dir / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_digest(path)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{key}.{os.getpid()}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, memo)
    return digest


def fingerprint(cfg, settings: dict, cache: Path) -> str:
    """Identity of an hf build: `settings` plus every data file's relative path and content digest."""
    _, root, files = dataset_files(cfg.path)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{_memo_digest(f, cache / '.filehash')}\n".encode())
    return f"hf-v{cfg.vocab_size}-{h.hexdigest()[:16]}"


def build_resumable(cfg, work: Path, fp: str, make_tokenizer) -> dict:
    """data.source=hf: one streaming pass into `work` (`.partial-<fingerprint>/`, which survives an
    interruption and is resumed) and the meta.json content; moe.data writes it and installs the entry.
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
    meta = {"version": FORMAT_VERSION, "dtype": dtype, "vocab_size": cfg.vocab_size,
            "tokenizer_vocab_size": tokenizer.get_vocab_size(), "eod_id": eod,
            "tokenizer_file": cfg.tokenizer_file, "source": "hf", "path": cfg.path,
            "text_column": cfg.text_column, **counts,
            "val_unigram_entropy_nats": unigram_entropy(work / "val.bin", dtype),
            "tokenizer_train_s": round(t1 - t0, 3), "build_id": uuid.uuid4().hex,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    (work / "progress.json").unlink()
    return meta


# The streaming build ---------------------------------------------------------------------------


def _capped_texts(cfg, skip: int, chars_before: int):
    """(row, text) of non-blank documents after `skip` rows, cut at data.max_chars in stream order."""
    row, total = skip, chars_before
    for batch in _open(cfg, skip):
        for text in batch[cfg.text_column]:
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"data.path={cfg.path!r} row {row - 1}: data.text_column={cfg.text_column!r} holds "
                    f"{type(text).__name__}, expected a string"
                )
            if cfg.max_chars is not None:
                if total >= cfg.max_chars:
                    return
                text = text[: cfg.max_chars - total]
            if text.strip():
                total += len(text)
                yield row, text


def training_texts(cfg):
    """Texts of the training split, up to data.tokenizer_chars characters: what a BPE is trained on."""
    budget = cfg.tokenizer_chars
    for _, text in _capped_texts(cfg, 0, 0):
        if unit_hash(text, "val") < cfg.val_fraction:
            continue
        if budget is not None:
            if budget <= 0:
                return
            text, budget = text[:budget], budget - len(text)
        yield text


_WORKER: dict = {}


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
    for row, text in _capped_texts(cfg, progress["rows"], progress["chars"]):
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
                log.info("data %s: %d rows, %.1f M chars, %d tokens (%.1f M chars/s)",
                         fp, progress["rows"], progress["chars"] / 1e6, sum(progress["tokens"]), rate)  # fmt: skip

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
        "n_train_tokens": progress["tokens"][0], "n_val_tokens": progress["tokens"][1],
        "n_train_docs": progress["docs"][0], "n_val_docs": progress["docs"][1],
        "n_chars": progress["chars"], "resumed_after_row": resumed_rows,
        "encode_s": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
