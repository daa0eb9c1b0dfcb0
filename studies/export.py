"""Export a finished sweep point as a transformers model directory.

    python -m studies.export outputs/<study>/runs/<run key> DIR [--overwrite] [--allow-earlier-checkpoint]

DIR gets config.json + model.safetensors (a Qwen2MoeForCausalLM, see moe/interop/hf_export.py), the tokenizer
(tokenizer.json, tokenizer_config.json) and export.json (run key, step, the logit check). Loadable with
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`, so
lm-evaluation-harness (studies.eval) and anything else in that ecosystem read it.

Only a DONE point exports. Everything is written into a temp dir beside DIR, reloaded with
AutoModelForCausalLM and compared with the project's model on fixed tokens (max |logit diff| must stay
below LOGIT_ATOL in fp32), then renamed into place: a failure leaves nothing half-written.
Needs the `hf` extra (pip install -e ".[hf]").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moe.data.config import DataConfig, cache_root
from moe.data.corpus import EOD_TOKEN
from moe.data.prepare import prepare_data
from moe.model.config import ModelConfig
from moe.model.transformer import Transformer
from moe.train.checkpoint import load_latest, model_weights
from records import runfiles
from studies.job.config import RunConfig, load_run_config, to_library

LOGIT_ATOL = 1e-4
"""Largest |logit difference| (fp32, CPU) an export may show against the project's model."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    """The transformers model directory."""
    run_key: str
    step: int
    """Optimiser step of the exported weights."""
    max_logit_diff: float
    """max |logits(transformers) - logits(project)| on the check tokens."""


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    run: RunConfig
    model: ModelConfig
    step: int
    """The step status.json reports DONE at."""
    summary: dict


def read_finished_run(run_dir: Path) -> FinishedRun:
    """The config and status of a DONE point; ValueError naming the run key otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a run folder (outputs/<study>/runs/<run key>)")
    status = runfiles.read_status(run_dir)
    if status is None or status.get("status") != "DONE":
        state = (
            "never started (no status.json)"
            if status is None
            else f"{status['status']} at step {status.get('step')}"
        )
        raise ValueError(f"run {run_dir.name} is not DONE: {state} ({run_dir})")
    config = run_dir / runfiles.CONFIG
    if not config.is_file():
        raise ValueError(f"run {run_dir.name} has no {runfiles.CONFIG} ({run_dir})")
    node = OmegaConf.load(config)
    run = load_run_config(node)
    # config.yaml holds the derived model (vocabulary included): read it as the library's ModelConfig
    model = to_library(ModelConfig, OmegaConf.to_container(node.model, resolve=True), ignore=("name",))
    return FinishedRun(run_dir, run, model, int(status["step"]), runfiles.read_summary(run_dir) or {})


def load_weights(fin: FinishedRun, allow_earlier_checkpoint: bool = False) -> tuple[dict, int]:
    """(model state dict, its step) from the newest verified checkpoint of the point."""
    state = load_latest(fin.run_dir / runfiles.CHECKPOINTS)
    if state is None:
        raise ValueError(
            f"run {fin.run_dir.name} has no usable checkpoint in {fin.run_dir / runfiles.CHECKPOINTS}"
        )
    step = int(state["step"])
    if step != fin.step and not allow_earlier_checkpoint:
        raise ValueError(
            f"run {fin.run_dir.name} is DONE at step {fin.step} but its newest checkpoint is step {step}, so "
            "the final weights were not saved; pass --allow-earlier-checkpoint to export step "
            f"{step} anyway"
        )
    return model_weights(state, Transformer(fin.model)), step  # a sharded (FSDP/EP) run's too


def tokenizer_file(data: DataConfig, fingerprint: str | None, run_dir: Path | None = None) -> Path:
    """tokenizer.json of the point: the copy in its run folder (runfiles.TOKENIZER, kept since it
    started), else the data's (the cache entry of its fingerprint, rebuilt if it is gone)."""
    if run_dir is not None and (run_dir / runfiles.TOKENIZER).is_file():
        return run_dir / runfiles.TOKENIZER
    if data.source == "tokens":
        path = Path(data.path).expanduser() / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"data.path={data.path!r} ships no tokenizer.json: the export would have no tokenizer"
            )
        return path
    cache = cache_root(data.cache_dir)
    if fingerprint and (cache / fingerprint / "tokenizer.json").is_file():
        return cache / fingerprint / "tokenizer.json"
    prepared = prepare_data(data)  # same config -> same shards and tokenizer (the cache key is the content)
    if fingerprint and prepared.fingerprint != fingerprint:
        raise ValueError(
            f"the point trained on data {fingerprint}, but its data config now gives {prepared.fingerprint} "
            "(the corpus changed): its tokenizer is gone"
        )
    return prepared.tokenizer_path


def save_tokenizer(path: Path, out_dir: Path, context: int) -> int | None:
    """Write the transformers tokenizer files of tokenizer.json `path` (model_max_length: the training
    context); returns the EOD id (or None)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    eod = Tokenizer.from_file(str(path)).token_to_id(EOD_TOKEN)
    special = (
        {"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "pad_token": EOD_TOKEN} if eod is not None else {}
    )
    PreTrainedTokenizerFast(tokenizer_file=str(path), model_max_length=context, **special).save_pretrained(
        str(out_dir)
    )
    return eod


def check_tokens(model: ModelConfig, n: int = 2) -> torch.Tensor:
    """Fixed pseudo-random token ids (n sequences of model.seq_len) for the logit check."""
    return torch.randint(0, model.vocab_size, (n, model.seq_len), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def max_logit_diff(model: ModelConfig, state: dict, hf_model, tokens: torch.Tensor) -> float:
    ours = Transformer(model).float().eval()
    ours.load_state_dict(state)
    return float((ours(tokens).logits - hf_model(tokens).logits).abs().max())


def export_run(
    run_dir: Path, out_dir: Path, *, overwrite: bool = False, allow_earlier_checkpoint: bool = False
) -> ExportResult:
    """Write the transformers model directory of a DONE point to `out_dir` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from moe.interop.hf_export import ARCHITECTURE, check_exportable, to_transformers

    fin = read_finished_run(run_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} exists; pass --overwrite to replace it")
    check_exportable(fin.model)  # before loading anything big
    state, step = load_weights(fin, allow_earlier_checkpoint)
    state = {k: v.float() for k, v in state.items()}
    tok_path = tokenizer_file(fin.run.data, (fin.summary.get("data") or {}).get("fingerprint"), fin.run_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        eod = save_tokenizer(tok_path, tmp, fin.model.seq_len)
        to_transformers(fin.model, state, eos_token_id=eod).save_pretrained(str(tmp), safe_serialization=True)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        diff = max_logit_diff(fin.model, state, reloaded, check_tokens(fin.model))
        if not diff <= LOGIT_ATOL:
            raise ValueError(
                f"run {fin.run_dir.name}: the exported {ARCHITECTURE} differs from the project's model by "
                f"{diff:.3g} in the logits (tolerance {LOGIT_ATOL}); nothing was written"
            )
        record = {
            "run_key": fin.run_dir.name,
            "run_dir": str(fin.run_dir.resolve()),
            "step": step,
            "done_step": fin.step,
            "architecture": ARCHITECTURE,
            "max_logit_diff": diff,
            "data_fingerprint": (fin.summary.get("data") or {}).get("fingerprint"),
            "variant": fin.summary.get("variant"),
            "tags": fin.summary.get("tags", {}),
        }
        runfiles.write_json(tmp / "export.json", record)
        if out_dir.exists():
            trash = out_dir.with_name(f".trash-{out_dir.name}-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, fin.run_dir.name, step, diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="outputs/<study>/runs/<run key> of a DONE point")
    parser.add_argument("out_dir", type=Path, help="the transformers model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    parser.add_argument(
        "--allow-earlier-checkpoint",
        action="store_true",
        help="export the newest checkpoint even if it is older than the DONE step",
    )
    args = parser.parse_args(argv)
    try:
        res = export_run(
            args.run_dir,
            args.out_dir,
            overwrite=args.overwrite,
            allow_earlier_checkpoint=args.allow_earlier_checkpoint,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"exported run {res.run_key} (step {res.step}) to {res.out_dir}; max |logit diff| {res.max_logit_diff:.2e}"
    )
    print(json.dumps({"out_dir": str(res.out_dir), "step": res.step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
