"""evaluate(): exact accuracy counting, loss, empty splits, mode restoration."""

from __future__ import annotations

import math

import pytest
import torch

from bitsweep.training import evaluate


class FixedLogits(torch.nn.Module):
    """Returns the input rows as logits, so accuracies are known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dummy


def test_top1_top5_and_loss_are_exact() -> None:
    # 7 classes; logits rank class i highest for row i, so label ranks are known
    logits = torch.arange(7.0).repeat(4, 1)  # (4, 7): class 6 is top-1, classes 2..6 are top-5
    labels = torch.tensor([6, 3, 1, 0])
    batches = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]
    model = FixedLogits().train()
    result = evaluate(model, batches, amp=False)
    assert result.images == 4
    assert result.top1 == pytest.approx(25.0)
    assert result.top5 == pytest.approx(50.0)
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.images_per_s > 0
    assert model.training  # mode restored


def test_top5_with_fewer_than_five_classes_is_total() -> None:
    batches = [(torch.randn(6, 3), torch.randint(0, 3, (6,)))]
    assert evaluate(FixedLogits(), batches).top5 == 100.0


def test_empty_loader_gives_nan() -> None:
    result = evaluate(FixedLogits(), [])
    assert result.images == 0 and math.isnan(result.top1) and math.isnan(result.loss)
