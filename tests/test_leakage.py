"""Train/validation leakage: the measure, the grouped split, the cut at build time, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe.data.config import DataConfig
from moe.data.corpus import embedded_corpus, open_shard, read_meta
from moe.data.leakage import eval_window_positions, main, measure
from moe.data.loader import validation_batches
from moe.data.prepare import prepare_data
from moe.data.spans import SPAN, covered_positions, leakage, without_leaked_spans
from moe.data.split import NEAR_DUP_MAX_DOCS, cap_chars, near_duplicate_groups, split_documents, unit_hash

EOD = 0
DEFAULT = yaml.safe_load((Path(__file__).parents[1] / "conf" / "data" / "stdlib.yaml").read_text())
"""The data config of conf/data/stdlib.yaml: the default corpus."""


def shard(prepared, which: str = "val") -> np.ndarray:
    return np.asarray(
        open_shard(prepared.val_path if which == "val" else prepared.train_path, prepared.dtype)
    )


def random_tokens(n: int, seed: int) -> np.ndarray:
    """Ids 1..999 (0 is EOD): two independent draws share no 32-token span by chance."""
    return np.random.default_rng(seed).integers(1, 1000, n).astype(np.uint16)


# The measure ---------------------------------------------------------------------------------------


def test_a_val_span_copied_from_train_counts_exactly_its_tokens():
    train = random_tokens(5000, 0)
    val = random_tokens(1000, 1)
    val[200:250] = train[3000:3050]  # a 50-token copy
    result = leakage(train, val, n=32, eod=EOD)
    assert result.n_leaked_tokens == 50 and result.n_val_tokens == 1000
    assert result.fraction == pytest.approx(0.05)
    mask = covered_positions(train, val, 32, EOD)
    assert mask[200:250].all() and mask.sum() == 50


def test_a_copy_shorter_than_n_does_not_count_and_disjoint_text_gives_zero():
    train = random_tokens(5000, 0)
    val = random_tokens(1000, 1)
    assert leakage(train, val, n=32, eod=EOD).fraction == 0.0
    val[100:131] = train[10:41]  # 31 tokens
    assert leakage(train, val, n=32, eod=EOD).n_leaked_tokens == 0
    assert leakage(train, val, n=31, eod=EOD).n_leaked_tokens == 31


def test_spans_across_a_document_boundary_are_not_counted():
    train = random_tokens(5000, 0)
    val = random_tokens(1000, 1)
    val[500:540] = train[1000:1040]
    train[1020] = val[520] = EOD  # the copy is two documents' end and start, 20 tokens each
    assert leakage(train, val, n=32, eod=EOD).n_leaked_tokens == 0
    assert leakage(train, val, n=32, eod=None).n_leaked_tokens == 40  # counted when EOD is ordinary


def test_cutting_leaked_spans_leaves_no_leak_and_one_eod_per_cut():
    train = np.concatenate([random_tokens(300, 0), [EOD], random_tokens(100, 2), [EOD]]).astype(np.uint16)
    val = random_tokens(1000, 1)
    val[0:60] = train[100:160]  # inside the first document
    val[400:500] = train[301:401]  # the whole second document and its EOD
    out, cut = without_leaked_spans(train, val, EOD, 32)
    assert cut == 160
    expected = np.concatenate([train[:100], [EOD], train[160:300], [EOD]])  # no second EOD for doc 2
    np.testing.assert_array_equal(out, expected)
    assert leakage(out, val, 32, EOD).fraction == 0.0
    same, none_cut = without_leaked_spans(train, random_tokens(1000, 3), EOD, 32)
    assert none_cut == 0 and same is train


# The grouped split ---------------------------------------------------------------------------------


def module_text(seed: int) -> str:
    """A made-up module of 40 distinct long lines."""
    rng = np.random.default_rng(seed)
    return "".join(
        f"    value_{rng.integers(10**9)} = compute(value_{rng.integers(10**9)})\n" for _ in range(40)
    )


def test_near_identical_documents_with_different_names_land_on_the_same_side():
    docs, pairs = [], []
    for i in range(200):
        text = module_text(i)
        copy = text.replace("compute", "compute_v2", 3) + "# vendored copy\n"  # 3 of 40 lines differ
        a, b = f"pkg/mod_{i}.py", f"vendor/pkg/mod_{i}.py"
        docs += [(a, text), (b, copy), (f"other/unrelated_{i}.py", module_text(10_000 + i))]
        pairs.append((a, b))
    train, val = split_documents(docs, 0.2)
    val_names = {name for name, _ in val}
    for a, b in pairs:
        assert (a in val_names) == (b in val_names), (a, b)
    # their own names would have split some pairs: the grouping is what keeps them together
    assert any((unit_hash(a, "val") < 0.2) != (unit_hash(b, "val") < 0.2) for a, b in pairs)
    # a group goes where its smallest name sends it; unrelated documents keep their own name's side
    for a, _ in pairs:
        assert (a in val_names) == (unit_hash(a, "val") < 0.2)
    for name, _ in docs:
        if name.startswith("other/"):
            assert (name in val_names) == (unit_hash(name, "val") < 0.2)
    assert (train, val) == split_documents(docs[::-1], 0.2)  # order does not matter


def test_boilerplate_shared_by_many_documents_does_not_group_them():
    header = "".join(f"# Copyright line {k} of a licence that every file carries\n" for k in range(10))
    docs = [(f"pkg/m{i}.py", header + module_text(i)[:400]) for i in range(NEAR_DUP_MAX_DOCS + 1)]
    groups = near_duplicate_groups(tuple(docs))
    assert all(groups[name] == name for name, _ in docs)  # each its own group


def test_default_corpus_keeps_about_five_percent_in_validation():
    docs = cap_chars(list(embedded_corpus().documents), DEFAULT["max_chars"])
    train, val = split_documents(docs, DEFAULT["val_fraction"])
    chars = sum(len(t) for _, t in val) / sum(len(t) for _, t in docs)
    assert 0.04 <= len(val) / len(docs) <= 0.06 and 0.035 <= chars <= 0.065
    groups = near_duplicate_groups(tuple(docs))
    sizes = np.unique(list(groups.values()), return_counts=True)[1]
    assert (sizes > 1).sum() >= 50 and sizes.max() <= 100  # copies grouped; boilerplate chains no giant group


# The build and the CLI --------------------------------------------------------------------------------

LICENCE = "".join(
    f"# Licensed under the Example Licence, clause {k}: keep this notice intact.\n" for k in range(6)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 text documents, each its own module plus the same licence block: spans shared across the split."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"m{i}.txt").write_text(LICENCE + module_text(i))
    return folder


@pytest.fixture(scope="module")
def small(corpus, tmp_path_factory):
    cfg = DataConfig(source="text", path=str(corpus), vocab_size=300, val_fraction=0.2)
    return prepare_data(replace(cfg, cache_dir=str(tmp_path_factory.mktemp("cache"))))


def test_built_shards_share_no_span_and_record_what_was_cut(small):
    meta = read_meta(small.train_path.parent)
    assert meta["leak_span"] == SPAN and meta["n_train_tokens_cut_as_leaked"] > 0
    assert meta["n_train_tokens"] == small.n_train_tokens == len(shard(small, "train"))
    row = measure(small, seq_len=32, max_tokens=32 * 20)
    assert row["val_leaked_fraction"] == row["eval_leaked_fraction"] == 0.0
    assert row["eval_tokens"] == 32 * 20 and row["eval_windows_over_half_leaked"] == "0 of 20"


def test_eval_window_positions_are_the_tokens_validation_batches_predicts(small):
    pos = eval_window_positions(small, seq_len=32, max_tokens=32 * 7)
    targets = np.concatenate([y.numpy().reshape(-1) for _, y in validation_batches(small, 32, 3, 32 * 7)])
    np.testing.assert_array_equal(shard(small)[pos], targets)
    assert len(set(pos.tolist())) == 32 * 7 and pos.max() > len(shard(small)) * 0.8  # spread, not the head


def test_cli_prints_the_measure_for_data_overrides(small, corpus, capsys):
    cache = small.train_path.parent.parent
    text_yaml = str(Path(__file__).parents[1] / "conf" / "data" / "text.yaml")
    overrides = [
        f"data.path={corpus}",
        "data.vocab_size=300",
        "data.val_fraction=0.2",
        f"data.cache_dir={cache}",
    ]
    assert main(["--config", text_yaml, "--seq-len", "32", "--eval-tokens", "320", *overrides]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["fingerprint"] == small.fingerprint and row["val_leaked_fraction"] == 0.0


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--n", "0"], "--n"),
        (["--seq-len", "x"], "--seq-len"),
        (["--bogus"], "--bogus"),
        (["--eval-tokens", "10"], "--eval-tokens"),
        (["data.vocab_sise=512"], "data.vocab_sise"),
        (["data.max_chars=lots"], "data.max_chars"),
        (["data.val_fraction=0.9"], "data.val_fraction=0.9"),
    ],
)
def test_cli_refuses_bad_input_in_one_line_naming_it(argv, named, tmp_path, capsys):
    try:
        code = main([*argv, f"data.cache_dir={tmp_path}"])
    except SystemExit as e:  # argparse's refusals exit; ours return
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before building anything


@pytest.mark.slow
def test_default_corpus_leaks_at_most_half_a_percent(default_corpus):
    row = measure(default_corpus, seq_len=128, max_tokens=16384)
    print(f"\ndefault corpus leakage: {json.dumps(row)}")
    assert row["val_leaked_fraction"] <= 0.005 and row["eval_leaked_fraction"] <= 0.005
