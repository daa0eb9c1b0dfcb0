"""What data a run reads (`DataConfig`, the `data.*` keys) and what preparing it yields (`PreparedData`).

Plain dataclasses, imported by the builder, the loader and the pipeline alike (moe.data.prepare).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moe.data.corpus import SPECIAL_TOKENS

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the specials
MAX_VOCAB = 2**18
SOURCES = ("stdlib", "text", "tokens", "hf")


@dataclass
class DataConfig:
    source: Literal["stdlib", "text", "tokens", "hf"] = "stdlib"
    """stdlib: embedded corpus (standard library + EMBEDDED_PACKAGES sources); text: folder of .txt/.md/.jsonl; tokens: pre-tokenized shards; hf: a local parquet / arrow (save_to_disk) / jsonl(.gz/.zst) dataset read with `datasets` (moe.data.hf_data)."""
    path: str | None = None
    """Folder (or, for hf, file) for the text, tokens and hf sources; must be None for stdlib."""
    text_column: str = "text"
    """hf: the column holding each document's text."""
    tokenizer_file: str | None = None
    """A pretrained tokenizers `tokenizer.json` to encode with instead of training a BPE (stdlib, text, hf);
    its ids must be < vocab_size."""
    workers: int = 0
    """hf: processes that encode in parallel (0: this process, using the tokenizers library's threads)."""
    vocab_size: int = 8192
    """BPE vocabulary (ids are < vocab_size) for stdlib/text/hf, or the model's vocabulary with a
    tokenizer_file (at least its size); ignored for tokens (read from meta.json)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a hash of the name of each group of
    near-duplicate documents (moe.data.split; data.source=hf: of each text)."""
    max_chars: int | None = None
    """Cap on corpus size in characters (deterministic subset); None uses everything."""
    tokenizer_chars: int | None = None
    """Cap on the training-split characters the BPE is trained on (deterministic subset); None uses all."""
    allow_repeat: bool = False
    """Permit a token budget larger than one epoch of the training split (see check_budget)."""
    cache_dir: str | None = None
    """Where prepared shards live; None means $MOE_CACHE_DIR or ~/.cache/moe-scaling."""


@dataclass(frozen=True)
class PreparedData:
    train_path: Path
    """Training token shard."""
    val_path: Path
    """Validation token shard."""
    tokenizer_path: Path | None
    """tokenizer.json, or None for a tokens source that ships none."""
    vocab_size: int
    """Every token id is < vocab_size; use it as the model's vocab_size."""
    n_train_tokens: int
    """Tokens in train_path."""
    n_val_tokens: int
    """Tokens in val_path."""
    fingerprint: str
    """Identity of the data: equal fingerprints mean identical shards."""
    dtype: str
    """Shard dtype name: uint16 or uint32."""


def cache_root(cache_dir: str | None) -> Path:
    """The data cache folder: data.cache_dir (`~` expanded), else $MOE_CACHE_DIR, else ~/.cache/moe-scaling."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MOE_CACHE_DIR") or Path.home() / ".cache" / "moe-scaling").expanduser()
