"""Accuracy, loss and throughput of a classifier over a loader."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bitsweep.runtime import autocast


@dataclass(frozen=True)
class EvalResult:
    """Top-1/top-5 accuracy in percent, mean cross-entropy, and how fast it was measured.

    ``top5`` is top-min(5, classes), so it is 100 for datasets of five classes
    or fewer. All fields are NaN for an empty split.
    """

    top1: float
    top5: float
    loss: float
    images: int
    seconds: float
    images_per_s: float

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON files and tables."""
        return asdict(self)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of ``logits`` (B, classes) have their label among the k largest scores.

    >>> topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]), 1)
    1
    """
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    return int((top == labels.unsqueeze(1)).any(dim=1).sum().item())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
    amp: bool = True,
) -> EvalResult:
    """Measure ``model`` on every batch of ``loader`` in eval mode, restoring its mode afterwards.

    The loss is plain cross-entropy (no label smoothing), so numbers compare
    across recipes. Timing covers the forward passes and the transfers, and
    synchronizes CUDA before reading the clock so it is not flattered by
    asynchronous launches.

    Args:
        model: Any classifier returning logits (B, classes).
        loader: Yields (x, y) batches; they are moved to ``device`` when not already there.
        device: Where to run; default: the device of the model's parameters.
        amp: Allow bf16 autocast (only ever enabled on CUDA, see ``runtime.autocast``).
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = correct1 = correct5 = 0
    loss_sum = 0.0
    start = time.perf_counter()
    try:
        for x, y in loader:
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            with autocast(dev, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum").item())
            correct1 += topk_correct(logits, y, 1)
            correct5 += topk_correct(logits, y, 5)
            total += int(y.shape[0])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if total == 0:
        nan = math.nan
        return EvalResult(nan, nan, nan, 0, seconds, nan)
    return EvalResult(
        top1=100.0 * correct1 / total,
        top5=100.0 * correct5 / total,
        loss=loss_sum / total,
        images=total,
        seconds=seconds,
        images_per_s=total / seconds if seconds > 0 else math.inf,
    )
