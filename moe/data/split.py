"""Which documents are validation, and which subset a `max_chars` cap keeps.

A document is `(name, text)`; the name is stable (a relative path such as `stdlib/json/decoder.py`,
`file.jsonl:<line>` or `pydoc_topics/<topic>`), and both decisions hash it, so they do not depend on
file-system order or on any RNG.

The split is by group, not by document: near-duplicate documents (the same module copied into two
packages, a deprecated alias of a module, codec files made from one template) form a group, and a group
goes to validation when the hash of its smallest name falls below `val_fraction`. A document with no
near-duplicate is its own group, so it lands where its own name sends it. Copies on both sides of the
split would put validation text verbatim into training (docs/data.md, "Leakage"); what long spans
remain shared after grouping are cut out of the training shard at build time (moe.data.leakage).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections import Counter

Document = tuple[str, str]

NEAR_DUP_LINE_CHARS = 20
"""A stripped line at least this long is specific enough to tell that two files share text."""
NEAR_DUP_MAX_DOCS = 50
"""A line in more documents than this is boilerplate (a licence line, a common import): it says nothing
about two files being copies, and would chain unrelated files into one giant group."""
NEAR_DUP_SHARE = 0.5
"""Two documents are near-duplicates when they share at least this fraction of the long lines of the
smaller one (lines in at most NEAR_DUP_MAX_DOCS documents), and at least NEAR_DUP_MIN_LINES of them."""
NEAR_DUP_MIN_LINES = 3
"""A tiny module (a one-line shim) would otherwise be a "near-duplicate" of every file that holds its
line, and chain them all into one group."""


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


def _long_lines(text: str) -> frozenset[str]:
    return frozenset(s for s in map(str.strip, text.splitlines()) if len(s) >= NEAR_DUP_LINE_CHARS)


@functools.lru_cache(maxsize=2)  # a sweep validates every point on the same corpus: group it once
def near_duplicate_groups(docs: tuple[Document, ...]) -> dict[str, str]:
    """name -> the smallest name of its near-duplicate group (connected components of the
    near-duplicate pairs, see NEAR_DUP_SHARE). Depends only on the set of documents, not on their order."""
    docs = tuple(sorted(docs))
    lines = [_long_lines(text) for _, text in docs]
    counts = Counter(itertools.chain.from_iterable(lines))
    telling = frozenset(s for s, c in counts.items() if 2 <= c <= NEAR_DUP_MAX_DOCS)
    holders: dict[str, list[int]] = {}
    for i, own in enumerate(lines):
        for s in own & telling:
            holders.setdefault(s, []).append(i)
    shared: Counter[tuple[int, int]] = Counter()
    for ids in holders.values():
        shared.update(itertools.combinations(ids, 2))
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), n in shared.items():
        if n >= max(NEAR_DUP_MIN_LINES, NEAR_DUP_SHARE * min(len(lines[a]), len(lines[b]))):
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)  # the root is the smallest index, i.e. the smallest name
    return {name: docs[root(i)][0] for i, (name, _) in enumerate(docs)}


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train/validation split by a hash of each near-duplicate group's smallest name (see the module
    docstring); order within each split is by name."""
    group = near_duplicate_groups(tuple(sorted(docs)))
    train, val = [], []
    for doc in sorted(docs):
        (val if unit_hash(group[doc[0]], "val") < val_fraction else train).append(doc)
    return train, val
