"""What the training loop measures besides the step: validation loss with its standard error, the
router diagnostics it logs, and the training-only wall clock.

Shape suffixes: B = sequences (validation windows) in a batch, S = sequence length, V = vocab.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.parallel.distributed import all_reduce_sum

WALL_CLOCK_METRICS = ("tokens_per_s", "time/train_s")
"""Logged metrics that measure wall time: two runs that are otherwise bit-identical (a resumed one and
an uninterrupted one) differ in these alone."""


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Token-weighted mean LM cross-entropy over the validation windows."""
    se: float
    """Its standard error with each window as one sample (tokens of one window are correlated, windows
    from different places of the val split much less): std of the window means / sqrt(windows). NaN with
    fewer than 2 windows."""
    windows: int
    """Validation windows measured."""


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list,
    device: torch.device,
    autocast,
    forwards: int = 0,
    filler: tuple | None = None,
) -> EvalResult:
    """Mean LM cross-entropy over the fixed validation batches and its window-level standard error (each
    rank passes its share; the sums are added over ranks). forwards: run at least this many forwards,
    repeating a batch (`filler` where this rank has none) with weight 0, so that every rank enters the
    collectives inside forward (FSDP, EP) alike."""
    was_training = model.training
    model.eval()
    # sums over windows of: target tokens, loss * tokens, window mean, window mean squared, windows
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    padded = list(batches) + [None] * max(0, forwards - len(batches))
    for batch in padded:
        x_BS, y_BS = batch if batch is not None else (batches[0] if batches else filler)
        with autocast():
            logits_BSV = model(x_BS.to(device)).logits
        if batch is None:
            continue
        y_BS = y_BS.to(device)
        loss_BS = F.cross_entropy(
            logits_BSV.float().transpose(1, 2), y_BS, ignore_index=-100, reduction="none"
        )
        count_B = (y_BS != -100).sum(dim=1).double()
        mean_B = loss_BS.double().sum(dim=1) / count_B.clamp(min=1)
        sums += torch.stack(
            [
                count_B.sum(),
                (mean_B * count_B).sum(),
                mean_B.sum(),
                mean_B.pow(2).sum(),
                torch.tensor(float(len(mean_B)), dtype=torch.float64, device=device),
            ]
        )
    model.train(was_training)
    tokens, loss_sum, m1, m2, n = (float(v) for v in all_reduce_sum(sums))
    var = (m2 - m1 * m1 / n) / (n - 1) if n >= 2 else math.nan
    se = math.sqrt(max(var, 0.0) / n) if n >= 2 else math.nan
    return EvalResult(loss=loss_sum / tokens, se=se, windows=int(n))


def eval_metrics(result: EvalResult, name: str) -> dict[str, float]:
    """{name: loss, name_se: its standard error}; the error only where defined (one window has none)."""
    return {name: result.loss, **({f"{name}_se": result.se} if math.isfinite(result.se) else {})}


def router_metrics(router: list, layer_indices: list[int]) -> dict[str, float]:
    """router/layer<i>/<stat> per MoE block, router/<stat> averaged, train/aux_loss and train/z_loss."""
    out: dict[str, float] = {}
    sums: dict[str, float] = {}
    for i, aux in zip(layer_indices, router, strict=True):
        for name, value in aux.stats.items():
            v = float(value)
            out[f"router/layer{i}/{name}"] = v
            sums[name] = sums.get(name, 0.0) + v
    for name, total in sums.items():
        out[f"router/{name}"] = total / len(router)
    for name in ("aux_loss", "z_loss"):
        if name in sums:
            out[f"train/{name}"] = out[f"router/{name}"]
    return out


class TrainClock:
    """Training-only wall seconds (metric `time/train_s`): wall time since the clock started minus the
    blocks run under `excluded()` (evaluation, logging, checkpoints); `skip()` drops the time since the
    last mark (the first step under torch.compile, where compilation happens). `excluded()` synchronises
    CUDA on entry, so queued training work is charged to training; that happens on log, eval and
    checkpoint steps only, which synchronise anyway."""

    def __init__(self, device: torch.device, total_s: float = 0.0):
        self.device, self.total_s = device, float(total_s)
        self._mark = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def read(self) -> float:
        """Training seconds so far (of this run, a resumed run continuing its checkpoint's count)."""
        return self.total_s + time.perf_counter() - self._mark

    def skip(self) -> None:
        self._sync()
        self._mark = time.perf_counter()

    @contextlib.contextmanager
    def excluded(self):
        self._sync()
        self.total_s = self.read()
        try:
            yield
        finally:
            self._mark = time.perf_counter()
