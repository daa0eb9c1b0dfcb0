"""data.source=hf: local parquet / arrow / jsonl(.gz/.zst) datasets read through Hugging Face `datasets`,
tokenised in one streaming pass into the token shard format of moe.data.corpus (see docs/data.md).

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

import hashlib
import json
import logging
import os
from pathlib import Path

from moe.data.corpus import EOD_TOKEN, dtype_for_vocab
from moe.data.split import unit_hash

log = logging.getLogger(__name__)

BATCH_DOCS = 512
"""Documents read and encoded per batch."""
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
    """Cheap checks of an hf source (reads the first batch only): path, format, column, not empty; a file
    the readers cannot parse is named in one sentence (pyarrow and json raise their own errors)."""
    try:
        batch = next(iter(_open(cfg)), None)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, JSON decode errors, ... (ours start "data.")
        if isinstance(exc, ValueError) and str(exc).startswith("data."):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"data.path={cfg.path!r} cannot be read as a dataset ({type(exc).__name__}: {first})"
        ) from None
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


def capped_texts(cfg, skip: int, chars_before: int):
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
    for _, text in capped_texts(cfg, 0, 0):
        if unit_hash(text, "val") < cfg.val_fraction:
            continue
        if budget is not None:
            if budget <= 0:
                return
            text, budget = text[:budget], budget - len(text)
        yield text
