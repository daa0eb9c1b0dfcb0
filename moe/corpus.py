"""Corpus side of the data pipeline: documents, the BPE tokenizer and the token shard format.

A document is `(name, text)`; the name is stable (a relative path, `file.jsonl:<line>` or
`pydoc_topics/<topic>`) because the train/validation split and the `max_chars` subset are decided by
hashing it, so they do not depend on file-system order, on other documents, or on any RNG.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np

Document = tuple[str, str]

FORMAT_VERSION = 1
"""Bump when the shard layout, corpus selection or tokenizer recipe changes: old cache entries then miss."""
EOD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOD_TOKEN,)
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
BPE_MIN_FREQUENCY = 2  # a merge must occur at least twice in the training split
ENCODE_CHUNK_DOCS = 256  # documents per encode_batch call: bounds memory held in Encoding objects

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
# Directories of the stdlib tree that are test suites, third-party packages or build artefacts.
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_generated(rel: str, text: str) -> bool:
    """Machine-written modules: they are tables, not text written by people."""
    name = rel.rsplit("/", 1)[-1]
    if name.startswith("_sysconfigdata"):  # build-machine paths and compiler flags
        return True
    if rel == "pydoc_data/topics.py":  # added as one document per topic instead
        return True
    return rel.startswith("encodings/") and "gencodec.py" in text[:400]


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """The interpreter's standard library .py sources (no tests) plus one document per pydoc topic."""
    return list(_stdlib_documents(stdlib_root() if root is None else root))


@functools.lru_cache(maxsize=2)  # the installation does not change while we run; sweeps validate often
def _stdlib_documents(root: Path) -> tuple[Document, ...]:
    docs: list[Document] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # config-3.x-<platform> holds the build's Makefile and static library
        dirnames[:] = sorted(
            d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(("config-", "."))
        )
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(root).as_posix()
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip() and not _is_generated(rel, text):
                docs.append((f"stdlib/{rel}", text))
    docs.extend(pydoc_topic_documents())
    return tuple(sorted(docs))


def pydoc_topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the .py sources still suffice
        return []
    return [(f"pydoc_topics/{k}", v) for k, v in sorted(topics.items()) if v.strip()]


def text_files(folder: Path) -> list[Path]:
    """The .txt/.md/.jsonl files under `folder` (recursive, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if not fname.startswith(".") and fname.endswith((*TEXT_SUFFIXES, JSONL_SUFFIX)):
                found.append(Path(dirpath) / fname)
    return sorted(found)


def _read_utf8(path: Path, folder: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path={str(folder)!r}: {path.relative_to(folder)} is not UTF-8 ({e})") from e


def jsonl_documents(path: Path, folder: Path) -> list[Document]:
    """One document per non-blank line of a .jsonl file, taken from its "text" field."""
    rel = path.relative_to(folder).as_posix()
    docs: list[Document] = []
    for lineno, line in enumerate(_read_utf8(path, folder).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data.path={str(folder)!r}: {rel} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'{where} has no "text" field')
        if not isinstance(record["text"], str):
            raise ValueError(f'{where}: "text" is {type(record["text"]).__name__}, expected a string')
        if record["text"].strip():
            docs.append((f"{rel}:{lineno}", record["text"]))
    return docs


def text_folder_documents(folder: Path) -> list[Document]:
    """.txt/.md files are one document each; .jsonl files one document per line."""
    docs: list[Document] = []
    for path in text_files(folder):
        if path.suffix == JSONL_SUFFIX:
            docs.extend(jsonl_documents(path, folder))
        else:
            text = _read_utf8(path, folder)
            if text.strip():
                docs.append((path.relative_to(folder).as_posix(), text))
    return sorted(docs)


def unit_hash(name: str, salt: str) -> float:
    """A deterministic number in [0, 1) from a document name (salted so uses stay independent)."""
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def cap_chars(docs: list[Document], max_chars: int | None) -> list[Document]:
    """A deterministic subset of about `max_chars` characters, spread over the whole corpus.

    Documents are taken in hash order (not name order, which would favour one package) and the
    last one is truncated so the total is exactly min(max_chars, corpus size)."""
    if max_chars is None:
        return docs
    kept: list[Document] = []
    total = 0
    for name, text in sorted(docs, key=lambda d: unit_hash(d[0], "subset")):
        if total >= max_chars:
            break
        text = text[: max_chars - total]
        kept.append((name, text))
        total += len(text)
    return sorted(kept)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train/validation split by a hash of each document's name; order within each split is by name."""
    train, val = [], []
    for doc in sorted(docs):
        (val if unit_hash(doc[0], "val") < val_fraction else train).append(doc)
    return train, val


def hash_documents(h: hashlib._Hash, docs: Iterable[Document]) -> None:
    """Feed names and texts into `h`, length-prefixed so that boundaries are part of the hash."""
    for name, text in docs:
        for part in (name.encode(), text.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)


# Token shards -------------------------------------------------------------------------------------
# Raw little-endian uint16/uint32 ids; meta.json beside them (written last) describes the pair.


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise ValueError(f"data.path={str(folder)!r} has no meta.json")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data.path={str(folder)!r}: meta.json is not valid JSON ({e})") from e
    for key in ("version", "dtype", "vocab_size"):
        if key not in meta:
            raise ValueError(f"data.path={str(folder)!r}: meta.json lacks {key!r}")
    if meta["version"] != FORMAT_VERSION:
        raise ValueError(
            f"data.path={str(folder)!r}: meta.json version={meta['version']}, expected {FORMAT_VERSION}"
        )
    if meta["dtype"] not in DTYPES:
        raise ValueError(
            f"data.path={str(folder)!r}: meta.json dtype={meta['dtype']!r}, expected one of {list(DTYPES)}"
        )
    limit = np.iinfo(DTYPES[meta["dtype"]]).max + 1
    if not isinstance(meta["vocab_size"], int) or not 2 <= meta["vocab_size"] <= limit:
        raise ValueError(
            f"data.path={str(folder)!r}: meta.json vocab_size={meta['vocab_size']!r} must be an int in [2, {limit}] for {meta['dtype']}"
        )
    return meta


def open_shard(path: Path, dtype: str) -> np.ndarray:
    """Read-only memory map of a shard; an empty file maps to an empty array."""
    if path.stat().st_size == 0:
        return np.zeros(0, DTYPES[dtype])
    return np.memmap(path, dtype=DTYPES[dtype], mode="r")


def check_shard(folder: Path, name: str, meta: dict, samples: int = 64, sample_len: int = 4096) -> int:
    """Size checks and a max-id check on `samples` evenly spaced slices; returns the token count."""
    path = folder / f"{name}.bin"
    where = f"data.path={str(folder)!r}: {name}.bin"
    if not path.is_file():
        raise ValueError(f"{where} is missing")
    itemsize = DTYPES[meta["dtype"]].itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{where} has {size} bytes, not a multiple of {meta['dtype']} ({itemsize} bytes)")
    n = size // itemsize
    expected = meta.get(f"n_{name}_tokens")
    if expected is not None and expected != n:
        raise ValueError(f"{where} holds {n} tokens but meta.json n_{name}_tokens={expected}")
    if n < 2:
        raise ValueError(
            f"{where} holds {n} tokens; at least 2 are needed (data.val_fraction / corpus too small?)"
        )
    tokens = open_shard(path, meta["dtype"])
    for start in np.linspace(0, max(n - sample_len, 0), num=samples, dtype=np.int64):
        top = int(tokens[start : start + sample_len].max())
        if top >= meta["vocab_size"]:
            raise ValueError(
                f"{where} has token id {top} >= meta.json vocab_size={meta['vocab_size']} near offset {start}"
            )
    return n


def read_token_folder(folder: Path) -> tuple[dict, int, int]:
    """meta.json plus the checked train/val token counts of a shard folder."""
    meta = read_meta(folder)
    return meta, check_shard(folder, "train", meta), check_shard(folder, "val", meta)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) with the end-of-document special token as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=BPE_MIN_FREQUENCY,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def write_shard(tokenizer, docs: list[Document], path: Path, dtype: str) -> int:
    """Encode documents in batches, each followed by EOD, appending to `path`; returns the token count."""
    eod = np.array([tokenizer.token_to_id(EOD_TOKEN)], DTYPES[dtype])
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), ENCODE_CHUNK_DOCS):
            texts = [text for _, text in docs[i : i + ENCODE_CHUNK_DOCS]]
            for enc in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype=DTYPES[dtype])
                f.write(ids.tobytes())
                f.write(eod.tobytes())
                n += len(ids) + 1
    return n


def unigram_entropy(path: Path, dtype: str | None = None) -> float:
    """Entropy of the token unigram distribution of a shard, nats/token: the loss of a model that
    ignores context, so a trained LM must land far below it. dtype defaults to the folder's meta.json."""
    path = Path(path)
    dtype = dtype if dtype is not None else read_meta(path.parent)["dtype"]
    tokens = open_shard(path, dtype)
    if len(tokens) == 0:
        raise ValueError(f"{path} holds no tokens")
    counts = np.zeros(0, np.int64)
    for i in range(0, len(tokens), 2**22):  # chunks keep memory bounded for big shards
        c = np.bincount(tokens[i : i + 2**22])
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())
