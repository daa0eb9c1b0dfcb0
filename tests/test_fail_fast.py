"""Fail fast: every point of a sweep is composed and validated before any job starts; one bad point
aborts the sweep with a message naming the override and the key, and nothing reaches MLflow.

Most cases go through `studies.launch.sweep.validate_jobs`, the function the sweep and single-run callbacks call, with the real conf/;
a handful go through the real `python -m studies.run -m ...` command."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR
from helpers import run_study
from hydra import initialize_config_dir

from moe.data.corpus import FORMAT_VERSION
from studies.job.config import register_configs
from studies.launch.checks import check_tracking_uri
from studies.launch.sweep import validate_overrides
from studies.server import free_port

GOOD = ["granularity=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def nothing_written(root: Path) -> None:
    """No MLflow store and no run folder anywhere under `root`."""
    assert not list(root.rglob("*.db")), list(root.rglob("*.db"))
    assert not list(root.rglob("runs")), list(root.rglob("runs"))
    assert not (root / "outputs").exists()


@pytest.fixture
def validate(shrunk, tmp_path):
    """validate(bad overrides) -> the error of a two-point sweep (a good point and the bad one)."""

    def run(bad: list[str]) -> str:
        register_configs()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            with pytest.raises(ValueError) as info:
                validate_overrides([[*shrunk, *GOOD], [*shrunk, *bad]], cwd=tmp_path)
        message = str(info.value)
        assert message.startswith("1 of 2 sweep points are invalid:"), message
        assert f"  {' '.join(bad)}: " in message, f"the bad override is not named: {message}"
        nothing_written(tmp_path)
        return message

    return run


def token_folder(root: Path, train: np.ndarray, val: np.ndarray, vocab: int = 512, **meta) -> Path:
    """A pre-tokenized data folder (docs/data.md format)."""
    root.mkdir(parents=True)
    train.astype(np.uint16).tofile(root / "train.bin")
    val.astype(np.uint16).tofile(root / "val.bin")
    fields = {
        "version": FORMAT_VERSION,
        "dtype": "uint16",
        "vocab_size": vocab,
        "n_train_tokens": len(train),
        "n_val_tokens": len(val),
        **meta,
    }
    (root / "meta.json").write_text(json.dumps(fields))
    return root


def good_tokens(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 512, 20_000), rng.integers(0, 512, 4_000)


# (id, bad overrides, fragments the message must contain). Folders and files are made per case below.
CASES = [
    ("unknown_key", ["model.d_modl=64"], ["model.d_modl"]),
    ("unknown_top_level_key", ["granularty=8"], ["granularty"]),
    ("wrong_type_axis", ["tokens=lots"], ["tokens", "lots"]),
    ("wrong_type_nested", ["model.n_layers=2.5"], ["model.n_layers", "2.5"]),
    ("not_in_literal", ["optim.schedule=linear"], ["optim.schedule", "linear"]),
    ("granularity_not_dividing_d_ff", ["granularity=3"], ["granularity=3 does not divide", "model.d_ff=64"]),
    ("top_k_above_experts", ["model.moe.top_k=9"], ["moe.top_k=9", "moe.num_experts=8"]),
    ("zero_experts", ["experts=0"], ["moe.num_experts=0"]),
    ("zero_budget", ["tokens=0"], ["tokens=0", "smaller than one batch"]),
    ("negative_budget", ["tokens=-4096"], ["tokens=-4096", "smaller than one batch"]),
    ("budget_below_one_batch", ["tokens=100"], ["tokens=100", "smaller than one batch"]),
    ("train_tokens_is_not_a_second_key", ["train.tokens=999"], ["train.tokens is not a key", "`tokens=...`"]),
    ("train_seed_is_not_a_second_key", ["train.seed=3"], ["train.seed is not a key", "`seed=...`"]),
    (
        "preset_granularity_is_not_a_second_key",
        ["model.moe.granularity=3"],
        ["model.moe.granularity is not a key", "`granularity=...`"],
    ),
    (
        "batch_not_multiple_of_seq_len",
        ["train.batch_tokens=500"],
        ["train.batch_tokens=500", "model.seq_len=32"],
    ),
    ("eval_below_one_sequence", ["train.eval_tokens=8"], ["train.eval_tokens=8"]),
    ("unknown_study", ["study=nope"], ["study/nope"]),
    ("unknown_model_preset", ["model=huge"], ["model/huge"]),
    ("unknown_moe_recipe", ["moe=fancy"], ["moe/fancy"]),
    ("zero_lr", ["optim.lr=0"], ["optim.lr=0"]),
    ("nan_lr", ["optim.lr=nan"], ["optim.lr=nan", "finite"]),
    ("beta2_of_one", ["optim.beta2=1.0"], ["optim.beta2=1.0", "[0, 1)"]),
    ("zero_eps", ["optim.eps=0"], ["optim.eps=0"]),
    ("negative_weight_decay", ["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1"]),
    ("negative_grad_clip", ["optim.grad_clip=-1"], ["optim.grad_clip=-1"]),
    ("warmup_of_everything", ["optim.warmup_frac=1.0"], ["optim.warmup_frac=1.0"]),
    ("zero_capacity_factor", ["model.moe.capacity_factor=0"], ["moe.capacity_factor=0"]),
    ("negative_capacity_factor", ["model.moe.capacity_factor=-1.25"], ["moe.capacity_factor=-1.25"]),
    ("zero_threads", ["infra.threads=0"], ["infra.threads=0"]),
    ("zero_peer_timeout", ["infra.peer_timeout_s=0"], ["infra.peer_timeout_s=0.0", "> 0"]),
    ("vocab_below_bytes", ["data.vocab_size=100"], ["data.vocab_size=100"]),
    ("val_fraction_too_large", ["data.val_fraction=0.9"], ["data.val_fraction=0.9"]),
    ("path_for_stdlib", ["data.path=/x"], ["data.path='/x'", "data.source=stdlib"]),
    (
        "unreachable_tracking_server",
        ["tracking.uri=http://127.0.0.1:{port}"],
        ["tracking.uri='http://127.0.0.1:{port}'", "unreachable", "/health"],
    ),
    ("file_store_uri", ["tracking.uri=file:{tmp}/mlruns"], ["tracking.uri='file:", "sqlite"]),
    (
        "sqlite_store_under_a_file",
        ["tracking.uri=sqlite:///{tmp}/afile/mlflow.db"],
        ["tracking.uri='sqlite:///", "is a file"],
    ),
    (
        "data_cache_under_a_file",
        ["data.cache_dir={tmp}/afile/cache"],
        ["data.cache_dir=", "is a file, not a folder"],
    ),
    ("data_cache_unwritable", ["data.cache_dir=/proc/x"], ["data.cache_dir='/proc/x' is not writable"]),
    (
        "output_dir_under_a_file",
        ["paths.root={tmp}/afile/outputs"],
        ["paths.root=", "is a file, not a folder"],
    ),
    (
        "missing_data_folder",
        ["data=text", "data.path={tmp}/missing"],
        ["data.path=", "not an existing folder"],
    ),
    ("empty_data_folder", ["data=text", "data.path={tmp}/empty"], ["data.path=", "empty folder"]),
    ("data_folder_without_text", ["data=text", "data.path={tmp}/images"], ["data.path=", "no .txt"]),
    ("data_path_missing_for_text", ["data=text"], ["data.path"]),
    ("tokens_without_meta", ["data=tokens", "data.path={tmp}/nometa"], ["data.path=", "no meta.json"]),
    ("truncated_token_shard", ["data=tokens", "data.path={tmp}/truncated"], ["train.bin", "not a multiple"]),
    ("token_count_mismatch", ["data=tokens", "data.path={tmp}/short"], ["train.bin holds", "n_train_tokens"]),
    ("token_id_above_vocab", ["data=tokens", "data.path={tmp}/badids"], ["val.bin", "vocab_size"]),
    ("zero_routed_scale", ["model.moe.routed_scale=0"], ["moe.routed_scale=0"]),
    ("negative_routed_scale", ["model.moe.routed_scale=-2.0"], ["moe.routed_scale=-2.0"]),
    ("zero_output_norm_eps", ["model.moe.output_norm_eps=0"], ["moe.output_norm_eps=0"]),
    ("unknown_expert_choice_scope", ["model.moe.expert_choice_scope=row"], ["expert_choice_scope", "row"]),
    # issue #14: bad input that used to start work or write outside the study
    ("unknown_tracking_scheme", ["tracking.uri=garbage://x"], ["tracking.uri='garbage://x' is not usable"]),
    (
        "relative_sqlite_store",
        ["tracking.uri=sqlite:///relative.db"],
        ["tracking.uri='sqlite:///relative.db'", "relative path"],
    ),
    (
        "study_name_escaping_paths_root",
        ["study.name=../../escaped"],
        ["study.name='../../escaped'", "plain folder name"],
    ),
    ("study_name_with_a_separator", ["study.name=a/b"], ["study.name='a/b'", "plain folder name"]),
    ("cuda_without_cuda", ["train.device=cuda"], ["train.device='cuda'", "no usable CUDA"]),
    (
        "model_vocab_disagreeing_with_data",
        ["model.vocab_size=4096"],
        ["model.vocab_size=4096", "disagrees", "data.vocab_size=512"],
    ),
    (
        "published_preset_at_the_laptop_corpus",
        ["model=mixtral_8x7b"],
        ["model.vocab_size=32000", "disagrees"],
    ),
    (
        "model_too_big_for_this_machine",
        ["model.d_model=4096", "model.d_ff=2000000"],
        ["GiB", "this machine's memory"],
    ),
    ("bad_optim_eps_type", ["optim.eps=tiny"], ["optim.eps", "tiny"]),
    ("negative_eval_every", ["train.eval_every=-1"], ["train.eval_every=-1"]),
    ("zero_keep_last", ["train.keep_last=0"], ["train.keep_last=0"]),
    ("zero_log_every", ["train.log_every=0"], ["train.log_every=0"]),
    ("unknown_device", ["train.device=tpu"], ["train.device", "tpu"]),
    ("negative_micro_batch", ["train.micro_batch_tokens=-32"], ["train.micro_batch_tokens=-32"]),
    ("min_lr_ratio_above_one", ["optim.min_lr_ratio=2"], ["optim.min_lr_ratio=2"]),
    ("negative_beta1", ["optim.beta1=-0.1"], ["optim.beta1=-0.1"]),
    ("infinite_grad_clip", ["optim.grad_clip=inf"], ["optim.grad_clip=inf", "finite"]),
    # issue #12: layouts refused before any job
    (
        "ep_not_dividing_the_experts",
        ["parallel.mode=fsdp", "parallel.ep=3"],
        ["parallel.ep=3", "does not divide"],
    ),
    ("mesh_not_matching_the_world", ["parallel.dp_shard=2"], ["parallel.dp_shard=2", "the world size is 1"]),
    ("ep_without_fsdp", ["parallel.ep=2"], ["parallel.ep=2", "parallel.mode='fsdp'"]),
    (
        "budget_beyond_one_epoch",
        ["data=tokens", "data.path={tmp}/good", "tokens=65536"],
        ["train.tokens=65536", "epochs", "data.allow_repeat=true"],
    ),
]


def make_files(tmp: Path) -> None:
    """The folders and files the CASES refer to."""
    (tmp / "afile").write_text("a file where a folder is expected")
    (tmp / "empty").mkdir()
    (tmp / "images").mkdir()
    (tmp / "images" / "cat.png").write_bytes(b"\x89PNG")
    train, val = good_tokens(tmp)
    token_folder(tmp / "good", train, val)
    folder = token_folder(tmp / "nometa", train, val)
    (folder / "meta.json").unlink()
    folder = token_folder(tmp / "truncated", train, val)
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\x01")  # an odd byte count cannot be uint16 tokens
    token_folder(tmp / "short", train, val, n_train_tokens=len(train) + 7)
    bad = val.copy()
    bad[100] = 600  # above vocab_size=512
    token_folder(tmp / "badids", train, bad)


@pytest.mark.parametrize(("bad", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_point_aborts_the_sweep_naming_override_and_key(validate, tmp_path, bad, fragments):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    make_files(inputs)
    fill = {"tmp": inputs, "port": free_port()}
    message = validate([b.format(**fill) for b in bad])
    for fragment in fragments:
        assert fragment.format(**fill) in message, f"{fragment!r} not in:\n{message}"


def test_a_valid_sweep_passes_and_writes_nothing(shrunk, tmp_path):
    train, val = good_tokens(tmp_path)
    folder = token_folder(tmp_path / "tokens", train, val)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        points = [
            [*shrunk, "granularity=1"],
            [*shrunk, "granularity=8", "model.moe.capacity_factor=1.25"],
            [*shrunk, "variant=dense"],
            [*shrunk, "data=tokens", f"data.path={folder}"],
            [*shrunk, "seed=1", f"tracking.uri=sqlite:///{tmp_path}/new/dir/mlflow.db"],
        ]
        assert len(validate_overrides(points, cwd=tmp_path)) == 5
    nothing_written(tmp_path)
    assert not (tmp_path / "new").exists()


def test_budget_beyond_one_epoch_passes_with_allow_repeat(shrunk, tmp_path):
    train, val = good_tokens(tmp_path)
    folder = token_folder(tmp_path / "tokens", train, val)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        point = [*shrunk, "data=tokens", f"data.path={folder}", "tokens=65536", "data.allow_repeat=true"]
        assert len(validate_overrides([point], cwd=tmp_path)) == 1
    nothing_written(tmp_path)


def test_best_lr_study_with_a_one_point_lr_grid_is_refused_before_any_job(shrunk, tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        points = [[*shrunk, "study.best_lr=true", f"granularity={g}", "optim.lr=0.003"] for g in (1, 8)]
        with pytest.raises(ValueError, match=r"study.best_lr=true but optim.lr has one value \(0.003\)"):
            validate_overrides(points, cwd=tmp_path)
        grid = [
            [*shrunk, "study.best_lr=true", "granularity=1", f"optim.lr={lr}", f"seed={s}"]
            for lr in (0.003, 0.01)
            for s in (0, 1)
        ]
        assert len(validate_overrides(grid, cwd=tmp_path)) == 4
    nothing_written(tmp_path)


def test_every_bad_point_is_listed_not_only_the_first(shrunk, tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ValueError) as info:
            validate_overrides(
                [[*shrunk, "granularity=3"], [*shrunk, "granularity=1"], [*shrunk, "optim.eps=0"]],
                cwd=tmp_path,
            )
    lines = str(info.value).splitlines()
    assert lines[0] == "2 of 3 sweep points are invalid:"
    assert lines[1].startswith("  granularity=3: ValueError: granularity=3 does not divide")
    assert lines[2].startswith("  optim.eps=0: ValueError: optim.eps=0")


# The tracking URI check against real HTTP servers ------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_tracking_uri_check_asks_the_server_for_health(status):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if status == 200:
            check_tracking_uri(uri)
        else:
            with pytest.raises(ValueError, match=rf"tracking.uri='{uri}' is unreachable .*503"):
                check_tracking_uri(uri)
    finally:
        server.shutdown()
        server.server_close()


# Through the real command ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sweep", "fragments"),
    [
        (["granularity=1,8", "tracking.uri=http://127.0.0.1:{port}"],
         ["2 of 2 sweep points are invalid", "tracking.uri='http://127.0.0.1:{port}' is unreachable"]),
        pytest.param(["study=granularity,nope"], ["1 of 2 sweep points are invalid", "  study=nope: ", "study/nope"],
                     marks=pytest.mark.slow),
        pytest.param(["granularity=1,8", "optim.beta1=0.9,1.5"],
                     ["2 of 4 sweep points are invalid", "optim.beta1=1.5", "must be in [0, 1)"],
                     marks=pytest.mark.slow),
    ],
    ids=["unreachable_tracking_uri", "unknown_study_in_sweep", "bad_beta_axis"],
)  # fmt: skip
def test_cli_sweep_with_a_bad_point_exits_non_zero_before_any_job(shrunk, tmp_path, sweep, fragments):
    port = free_port()
    proc = run_study(
        ["-m", *shrunk, *(s.format(port=port) for s in sweep)],
        tmp_path,
        env={"MOE_JOBS": "2", "MOE_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Sweep not started: " in proc.stderr
    for fragment in fragments:
        assert fragment.format(port=port) in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("runs"))
    assert not list(tmp_path.rglob(".submitit")), "a job was submitted"
