"""studies.export: a trained point becomes a transformers Qwen2-MoE model with the same logits."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moe.data.loader import validation_batches  # noqa: E402
from moe.data.prepare import load_tokenizer, prepare_data
from moe.interop.hf_export import check_exportable, unsupported_features  # noqa: E402
from moe.model.config import ModelConfig, MoEConfig  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402
from moe.train.checkpoint import latest_step, load_latest  # noqa: E402
from moe.train.loop import train  # noqa: E402
from records import runfiles  # noqa: E402
from studies.export import export_run, main, read_finished_run  # noqa: E402
from studies.job.config import load_run_config  # noqa: E402
from studies.job.point import build_point  # noqa: E402


class _Quiet:
    def log_metrics(self, metrics, step):
        pass


def trained_run(compose, shrunk, tmp_path: Path, overrides: list[str], done: bool = True) -> Path:
    """A run folder as studies.job.point leaves it, trained for real (moe.train.loop.train, 13 steps, checkpoints at 12 and the last), with the
    DONE status at the step of its last checkpoint."""
    run = load_run_config(compose([*shrunk, "tokens=6656", *overrides]))
    point = build_point(run, cwd=tmp_path)
    prepared = prepare_data(run.data)
    run_dir = point.run_dir
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(point.resolved()), run_dir / runfiles.CONFIG)
    cfg = dataclasses.replace(point.train, checkpoint_every=12)
    train(
        point.model, prepared, run.optim, cfg, _Quiet(), progress=None, checkpoint_dir=run_dir / "checkpoints"
    )
    step = latest_step(run_dir / "checkpoints")
    runfiles.write_status(run_dir, "DONE" if done else "FAILED", step, None if done else "boom")
    runfiles.write_summary(
        run_dir,
        {"run_key": point.run_key, "variant": point.variant, "data": {"fingerprint": prepared.fingerprint}},
    )
    return run_dir


def project_model(run_dir: Path) -> tuple[Transformer, object]:
    fin = read_finished_run(run_dir)
    model = Transformer(fin.model).eval()
    model.load_state_dict(load_latest(run_dir / "checkpoints")["model"])
    return model, fin


@pytest.mark.parametrize(
    "overrides",
    [
        ["granularity=1"],
        ["granularity=8"],
        ["granularity=1", "moe=shared"],
        ["granularity=8", "moe=shared", "model.moe.shared_gate=true"],
    ],
    ids=["G1", "G8", "G1-shared", "G8-shared-gated"],
)
def test_exported_model_logits_equal_the_project_model(compose, shrunk, tmp_path, one_thread, overrides):
    run_dir = trained_run(compose, shrunk, tmp_path, overrides)
    out = tmp_path / "hf"
    res = export_run(run_dir, out)
    assert res.max_logit_diff <= 1e-5
    assert {"config.json", "model.safetensors", "tokenizer.json", "export.json"} <= {
        p.name for p in out.iterdir()
    }
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    ours, fin = project_model(run_dir)
    x_BS, _ = validation_batches(prepare_data(fin.run.data), fin.model.seq_len, 4, None)[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(x_BS).logits, ours(x_BS).logits, atol=1e-5, rtol=0)
    m = fin.model.moe
    assert hf.config.num_experts == m.num_experts * m.granularity
    assert hf.config.num_experts_per_tok == m.top_k * m.granularity


def test_exported_tokenizer_encodes_like_the_project_tokenizer(compose, shrunk, tmp_path, one_thread):
    run_dir = trained_run(compose, shrunk, tmp_path, ["granularity=2"])
    export_run(run_dir, tmp_path / "hf")
    _, fin = project_model(run_dir)
    ours = load_tokenizer(prepare_data(fin.run.data))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "def f(x):\n    return x + 1  # héllo"
    assert (
        theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_special_tokens=False).ids
    )
    assert theirs.eos_token_id == ours.token_to_id("<|endoftext|>")


def test_export_carries_pad_id_router_loss_weights_and_context_and_needs_no_data_cache(
    compose, shrunk, tmp_path, one_thread
):
    run_dir = trained_run(compose, shrunk, tmp_path, ["granularity=2", "model.moe.aux_loss_coef=0.02"])
    fin = read_finished_run(run_dir)
    runfiles.keep_tokenizer(run_dir, prepare_data(fin.run.data).tokenizer_path)  # as the job does
    # the data cache is gone (a file where it was): only the run folder's tokenizer can be read
    config = OmegaConf.load(run_dir / runfiles.CONFIG)
    config.data.cache_dir = str(tmp_path / "not-a-cache")
    (tmp_path / "not-a-cache").write_text("")
    OmegaConf.save(config, run_dir / runfiles.CONFIG)
    export_run(run_dir, tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    eod = AutoTokenizer.from_pretrained(str(tmp_path / "hf")).eos_token_id
    assert hf["pad_token_id"] == hf["eos_token_id"] == eod is not None
    assert hf["router_aux_loss_coef"] == 0.02 and hf["router_z_loss_coef"] == fin.model.moe.z_loss_coef
    tokenizer = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == fin.model.seq_len == 32


def test_export_of_a_run_that_is_not_done_names_the_key_and_writes_nothing(
    compose, shrunk, tmp_path, one_thread
):
    run_dir = trained_run(compose, shrunk, tmp_path, ["granularity=1"], done=False)
    with pytest.raises(ValueError, match=rf"run {run_dir.name} is not DONE: FAILED at step 13"):
        export_run(run_dir, tmp_path / "hf")
    assert not any(p.name.startswith((".tmp", "hf")) for p in tmp_path.iterdir())
    assert main([str(run_dir), str(tmp_path / "hf")]) == 2


def test_export_refuses_a_checkpoint_older_than_the_done_step(compose, shrunk, tmp_path, one_thread):
    run_dir = trained_run(compose, shrunk, tmp_path, ["granularity=1"])
    runfiles.write_status(run_dir, "DONE", 14)
    with pytest.raises(ValueError, match="DONE at step 14 but its newest checkpoint is step 13"):
        export_run(run_dir, tmp_path / "hf")
    assert export_run(run_dir, tmp_path / "hf", allow_earlier_checkpoint=True).step == 13
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["done_step"] == 14
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        export_run(run_dir, tmp_path / "hf", allow_earlier_checkpoint=True)


@pytest.mark.parametrize(
    "moe, feature",
    [
        (dict(router="expert_choice"), "moe.router=expert_choice"),
        (dict(score="sigmoid"), "moe.score=sigmoid"),
        (dict(output_norm=True), "moe.output_norm=true"),
        (dict(capacity_factor=1.25), "moe.capacity_factor=1.25"),
        (dict(num_shared=2, shared_gate=True), "moe.shared_gate=true with moe.num_shared=2"),
    ],
)
def test_configurations_qwen2_moe_cannot_express_are_refused_by_name(moe, feature):
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe=MoEConfig(**moe))
    with pytest.raises(ValueError, match=f"no transformers architecture expresses.*{feature}"):
        check_exportable(cfg)


def test_a_trained_selection_bias_is_refused_but_a_zero_one_is_not():
    cfg = ModelConfig(
        vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe=MoEConfig(bias_update_rate=1e-3)
    )
    state = Transformer(cfg).state_dict()
    assert unsupported_features(cfg, state) == []
    state["blocks.0.ffn.router.expert_bias"][0] = 0.01
    assert "non-zero router.expert_bias" in unsupported_features(cfg, state)[0]
