"""run_point records a sweep point: run dir files per docs/outputs.md and an MLflow run."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from studies.job.execute import run_point

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def finished(compose, shrunk, tmp_path):
    cfg = compose([*shrunk, "granularity=2", "seed=3"])
    return run_point(cfg), tmp_path / "outputs" / "default"


def test_run_dir_holds_config_metrics_summary_and_status(finished):
    result, study_dir = finished
    run_dir = study_dir / "runs" / result.run_key
    assert result.status == "DONE" and result.variant == "moe-E8-k2-G2"
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.model.moe.granularity == 2 and config.model.name == "tiny" and config.train.tokens == 10240
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in line for line in lines)
    assert [x["step"] for x in lines if "val/loss" in x] == [
        1,
        2,
        4,
        8,
        10,
        20,
    ]  # log-spaced early, then every 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "DONE" and summary["run_key"] == result.run_key
    assert summary["final"]["val/loss"] == pytest.approx(result.val_loss)
    assert summary["final"]["val/loss"] < summary["data"]["unigram_entropy"] + 1.0
    assert summary["params"]["acct.params_total"] == result.params_total
    # the tokenizer it trained with, so that an export needs neither the data cache nor the corpus
    assert json.loads((run_dir / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    status = json.loads((run_dir / "status.json").read_text())
    assert {k: status[k] for k in ("status", "step", "reason")} == {
        "status": "DONE",
        "step": 20,
        "reason": None,
    }
    assert status["threads"] == torch.get_num_threads() and status["world_size"] == 1


def test_mlflow_run_has_tags_params_metric_history_and_artifacts(finished):
    result, study_dir = finished
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_experiment_by_name("default").experiment_id
    tags = run.data.tags
    for key, value in dict(
        kind="point",
        study="default",
        variant="moe-E8-k2-G2",
        model="tiny",
        granularity="2",
        top_k="2",
        experts="8",
        tokens="10240",
        seed="3",
        run_key=result.run_key,
    ).items():
        assert tags[key] == value, key
    assert tags["git_sha"]
    params = run.data.params
    assert not {"variant", "granularity", "tokens", "seed"} & set(params), "params must not shadow the tags"
    assert (
        params["axis.granularity"] == "2" and params["axis.seed"] == "3" and params["axis.variant"] == "moe"
    )
    assert (
        params["model.d_model"] == "32" and params["moe.granularity"] == "2" and params["optim.lr"] == "0.01"
    )
    assert int(params["acct.steps"]) == 20 and int(params["acct.batch_tokens"]) == 512
    for key in (
        "acct.params_total",
        "acct.params_active",
        "acct.params_non_embedding",
        "acct.params_active_non_embedding",
        "acct.flops_per_token_train",
    ):
        assert key in params
    history = client.get_metric_history(result.mlflow_run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 21)), "the train loss of every step"
    assert len(client.get_metric_history(result.mlflow_run_id, "router/layer1/top1_mass")) == 10
    train_s = client.get_metric_history(result.mlflow_run_id, "time/train_s")
    assert train_s and all(m.value > 0 for m in train_s)
    summary = json.loads((study_dir / "runs" / result.run_key / "summary.json").read_text())
    assert 0 < summary["train_s"] < summary["wall_s"], "training-only seconds, beside the point's wall time"
    assert summary["final"]["val/loss_final_se"] > 0 and "val/loss_final" in summary["final_labels"]
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=result.mlflow_run_id,
        artifact_path="summary.json",
        tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}",
    )
    assert json.loads(open(local).read())["mlflow_run_id"] == result.mlflow_run_id


def test_summary_and_mlflow_carry_the_final_raw_and_smoothed_val_loss_the_report_uses(finished):
    from analysis.derive import RAW_LABEL, Smoothing, smooth, smoothed_label

    result, study_dir = finished
    run_dir = study_dir / "runs" / result.run_key
    summary = json.loads((run_dir / "summary.json").read_text())
    val = [
        (x["step"], x["val/loss"])
        for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "val/loss" in x
    ]
    expected = smooth([v for _, v in val], Smoothing(), [s for s, _ in val])[-1]
    assert summary["final"]["val/loss"] == val[-1][1]
    assert summary["final"]["val/loss_smoothed"] == pytest.approx(expected)
    assert summary["final"]["val/loss_smoothed"] != summary["final"]["val/loss"]
    assert summary["final_labels"]["val/loss"] == RAW_LABEL
    assert summary["final_labels"]["val/loss_smoothed"] == smoothed_label(Smoothing())
    run = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}").get_run(result.mlflow_run_id)
    assert run.data.metrics["final/val_loss_raw"] == pytest.approx(summary["final"]["val/loss"])
    assert run.data.metrics["final/val_loss_smoothed"] == pytest.approx(summary["final"]["val/loss_smoothed"])
