"""data.source=hf: local parquet / arrow / jsonl datasets through `datasets`, streamed into token shards."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the hf extra is not installed (pip install -e '.[hf]')")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zstandard  # noqa: E402

from moe.data.config import DataConfig
from moe.data.corpus import open_shard, train_tokenizer  # noqa: E402
from moe.data.loader import TokenLoader, validation_batches
from moe.data.prepare import load_tokenizer, prepare_data, validate_data_config
from studies.job.config import load_run_config  # noqa: E402

WORDS = np.array(
    [
        "the",
        "expert",
        "router",
        "token",
        "scaling",
        "law",
        "mixture",
        "of",
        "dense",
        "model",
        "granularity",
        "loss",
        "data",
        "über",
        "naïve",
        "\u4e2d\u6587",
        "x",
        "y",
        "=",
        "(",
        ")",
    ]
)


def documents(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, words, n)
    return [" ".join(WORDS[rng.integers(0, len(WORDS), k)]) for k in lengths]


def write_parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    table = pa.table({column: texts, "id": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=1000)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    lines = "\n".join(json.dumps({"text": t, "meta": {"i": i}}) for i, t in enumerate(texts)).encode()
    path.write_bytes(
        zstandard.ZstdCompressor().compress(lines) if path.suffix == ".zst" else gzip.compress(lines)
    )
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A pretrained byte-level BPE (at most 370 ids) saved as tokenizer.json, as a user would bring one."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(documents(2000, seed=9), 370).save(str(path))
    return path


def hf_cfg(tmp_path: Path, path: Path, **kw) -> DataConfig:
    kw = {"cache_dir": str(tmp_path / "cache"), **kw}
    return DataConfig(source="hf", path=str(path), vocab_size=512, val_fraction=0.1, **kw)


def test_parquet_arrow_and_jsonl_of_the_same_rows_give_identical_shards(tmp_path, tokenizer_file):
    texts = documents(3000)
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "part-0.parquet", texts[:1700])
    write_parquet(tmp_path / "pq" / "part-1.parquet", texts[1700:])
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "js").mkdir()
    write_jsonl(tmp_path / "js" / "a.jsonl.zst", texts[:1000])
    write_jsonl(tmp_path / "js" / "b.jsonl.gz", texts[1000:])
    shards = []
    for src in ("pq", "disk", "js"):
        prepared = prepare_data(hf_cfg(tmp_path, tmp_path / src, tokenizer_file=str(tokenizer_file)))
        assert prepared.fingerprint.startswith("hf-v512-")
        shards.append((prepared.train_path.read_bytes(), prepared.val_path.read_bytes()))
        meta = json.loads((prepared.train_path.parent / "meta.json").read_text())
        assert meta["n_train_docs"] + meta["n_val_docs"] == 3000
    assert shards[0] == shards[1] == shards[2]
    assert 200 < meta["n_val_docs"] < 400  # val_fraction=0.1 of the documents, by a hash of their text


def test_hf_shards_plug_into_the_loader_and_decode_to_the_documents(tmp_path):
    texts = documents(2000)
    prepared = prepare_data(
        hf_cfg(tmp_path, write_parquet(tmp_path / "d.parquet", texts), tokenizer_chars=20_000)
    )
    assert prepared.vocab_size == 512 and prepared.dtype == "uint16"
    x_BS, y_BS = TokenLoader(prepared.train_path, seq_len=32, batch_size=8, seed=0).next_batch()
    assert x_BS.shape == (8, 32) and int(x_BS.max()) < 512
    assert validation_batches(prepared, 32, 8, 1024)
    tok = load_tokenizer(prepared)
    ids = open_shard(prepared.train_path, prepared.dtype)
    eod = tok.token_to_id("<|endoftext|>")
    first = ids[: int(np.argmax(ids == eod))]
    assert tok.decode(first.tolist()) in texts


def test_a_second_prepare_reuses_the_cache_entry(tmp_path, tokenizer_file):
    cfg = hf_cfg(
        tmp_path, write_parquet(tmp_path / "d.parquet", documents(500)), tokenizer_file=str(tokenizer_file)
    )
    first = prepare_data(cfg)
    build_id = json.loads((first.train_path.parent / "meta.json").read_text())["build_id"]
    again = prepare_data(cfg)
    assert again == first
    assert json.loads((again.train_path.parent / "meta.json").read_text())["build_id"] == build_id


def test_text_column_is_configurable_and_a_missing_one_is_named(tmp_path, tokenizer_file):
    path = write_parquet(tmp_path / "d.parquet", documents(300), column="content")
    with pytest.raises(
        ValueError, match=r"data.text_column='text' is not a column of data.path=.*\['content', 'id'\]"
    ):
        validate_data_config(hf_cfg(tmp_path, path, tokenizer_file=str(tokenizer_file)))
    prepared = prepare_data(hf_cfg(tmp_path, path, text_column="content", tokenizer_file=str(tokenizer_file)))
    assert prepared.n_train_tokens > 1000


def test_missing_path_empty_dataset_and_blank_texts_are_refused_by_key(tmp_path):
    with pytest.raises(ValueError, match=r"data.path='.*nowhere' does not exist"):
        prepare_data(hf_cfg(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"data.path='.*d.parquet' is an empty dataset"):
        validate_data_config(hf_cfg(tmp_path, write_parquet(tmp_path / "d.parquet", [])))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data.path='.*notes' holds no dataset"):
        validate_data_config(hf_cfg(tmp_path, tmp_path / "notes"))
    with pytest.raises(ValueError, match=r"every 'text' is blank or missing"):
        prepare_data(hf_cfg(tmp_path, write_parquet(tmp_path / "b.parquet", ["  ", "\n"] * 50)))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith("hf-")]


@pytest.mark.parametrize(
    "name, content",
    [("c.parquet", b"PAR1 not really parquet PAR1"), ("c.jsonl", b'{"text": "a"}\n{"text": \n')],
    ids=["corrupt_parquet", "corrupt_jsonl"],
)
def test_a_corrupt_dataset_file_is_refused_in_one_sentence_naming_data_path(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as info:
        validate_data_config(hf_cfg(tmp_path, tmp_path / name))
    message = str(info.value)
    assert message.startswith(f"data.path={str(tmp_path / name)!r} cannot be read as a dataset (")
    assert "\n" not in message


def test_tokenizer_file_whose_ids_do_not_fit_vocab_size_is_refused(tmp_path, tokenizer_file):
    path = write_parquet(tmp_path / "d.parquet", documents(100))
    cfg = DataConfig(source="hf", path=str(path), vocab_size=300, tokenizer_file=str(tokenizer_file))
    with pytest.raises(
        ValueError,
        match=r"data.tokenizer_file='.*tokenizer.json' has ids up to 3[0-9][0-9], which do not fit data.vocab_size=300 \(shard dtype uint16",
    ):
        validate_data_config(cfg)
    with pytest.raises(ValueError, match=r"data.tokenizer_file='.*missing.json' is not an existing file"):
        validate_data_config(
            DataConfig(source="hf", path=str(path), tokenizer_file=str(tmp_path / "missing.json"))
        )


def test_a_pretrained_tokenizer_serves_a_text_folder_too(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    (tmp_path / "txt").mkdir()
    texts = documents(200)
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    prepared = prepare_data(
        DataConfig(
            source="text",
            path=str(tmp_path / "txt"),
            vocab_size=512,
            tokenizer_file=str(tokenizer_file),
            cache_dir=str(tmp_path / "c"),
        )
    )
    ours = Tokenizer.from_file(str(tokenizer_file))
    assert load_tokenizer(prepared).get_vocab() == ours.get_vocab()
    assert prepared.vocab_size == 512


def test_worker_processes_write_the_same_shards(tmp_path, tokenizer_file):
    path = write_parquet(tmp_path / "d.parquet", documents(3000))
    one = prepare_data(hf_cfg(tmp_path, path, tokenizer_file=str(tokenizer_file)))
    two = prepare_data(
        hf_cfg(
            tmp_path, path, tokenizer_file=str(tokenizer_file), workers=2, cache_dir=str(tmp_path / "cache2")
        )
    )
    assert one.fingerprint == two.fingerprint
    assert one.train_path.read_bytes() == two.train_path.read_bytes()
    assert one.val_path.read_bytes() == two.val_path.read_bytes()


BUILD = """
import logging, sys, resource
from moe.data.prepare import prepare_data
from moe.data.config import DataConfig
logging.basicConfig(level=logging.INFO)
p = prepare_data(DataConfig(source="hf", path=sys.argv[1], vocab_size=512, val_fraction=0.1,
                            cache_dir=sys.argv[2], tokenizer_file=sys.argv[3]))
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, p.n_train_tokens, flush=True)
"""


def _build(path: Path, cache: Path, tok: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(path), str(cache), str(tok)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_an_interrupted_build_resumes_where_it_stopped_and_matches_a_fresh_one(tmp_path, tokenizer_file):
    path = write_parquet(tmp_path / "d.parquet", documents(60_000))
    cache = tmp_path / "cache"
    proc = _build(path, cache, tokenizer_file)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".partial-*/progress.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    progress = json.loads(next(cache.glob(".partial-*/progress.json")).read_text())
    assert 0 < progress["rows"] < 60_000 and not progress["done"]
    resumed = _build(path, cache, tokenizer_file)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming the build after row {progress['rows']}" in err
    fresh = prepare_data(
        hf_cfg(tmp_path, path, tokenizer_file=str(tokenizer_file), cache_dir=str(tmp_path / "fresh"))
    )
    entry = next(p for p in cache.iterdir() if p.name.startswith("hf-") and p.is_dir())  # not its .lock
    assert (entry / "train.bin").read_bytes() == fresh.train_path.read_bytes()
    assert (entry / "val.bin").read_bytes() == fresh.val_path.read_bytes()


@pytest.mark.slow
def test_peak_memory_of_a_build_does_not_grow_with_the_corpus(tmp_path, tokenizer_file):
    """A corpus of 1 and of 8 parquet files (as C4 / FineWeb ship: many files of bounded size)."""
    rss = {}
    for n_files in (1, 8):
        folder = tmp_path / f"corpus{n_files}"
        folder.mkdir()
        for i in range(n_files):
            write_parquet(folder / f"part-{i:05d}.parquet", documents(20_000, seed=i))
        proc = _build(folder, tmp_path / f"cache{n_files}", tokenizer_file)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        _, kb, tokens = out.split()[-3:]
        rss[n_files] = (int(kb) / 1024, int(tokens))
    (small_mb, small_tok), (large_mb, large_tok) = rss[1], rss[8]
    print(
        f"peak RSS {small_mb:.0f} MiB for {small_tok:,} tokens, {large_mb:.0f} MiB for {large_tok:,} tokens"
    )
    assert large_tok > 7 * small_tok
    # 8x the corpus (+ ~30 MB of text, ~8 MB of uint16 tokens) may cost only allocator noise
    assert large_mb - small_mb < 16, rss


def test_the_hf_preset_composes_and_checks_its_keys(compose, tmp_path):
    cfg = load_run_config(compose(["data=hf", f"data.path={tmp_path}", "data.text_column=body"]))
    assert (cfg.data.source, cfg.data.text_column, cfg.data.tokenizer_file) == ("hf", "body", None)
    with pytest.raises(Exception, match="source"):
        compose(["data=hf", "data.source=huggingface"])
