"""The cell function's screening: collapsed cells stop early and say so; working cells see every image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.sweep import evaluate
from bitsweep.sweep.evaluate import CheckpointEvaluator, EvalSettings, screened_accuracy, wilson_upper
from bitsweep.sweep.grid import Cell


class _Guess(nn.Module):
    """Predicts the right class for the first ``right`` images of every 100 and class 0 otherwise."""

    def __init__(self, labels: torch.Tensor, right: int) -> None:
        super().__init__()
        self.labels, self.right, self.seen = labels, right, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        idx = torch.arange(self.seen, self.seen + n)
        self.seen += n
        pred = torch.where(idx % 100 < self.right, self.labels[idx], 0)
        return nn.functional.one_hot(pred, 10).float()


def _labels(n: int = 3000) -> torch.Tensor:
    return torch.arange(n) % 9 + 1  # never class 0, so a wrong guess is wrong


@pytest.mark.parametrize(("right", "floor", "measured"), [(10, 45.0, 1000), (80, 45.0, 3000), (44, 45.0, 3000),
                                                         (10, None, 3000)])  # fmt: skip
def test_screening_stops_only_what_is_confidently_below_the_floor(
    right: int, floor: float | None, measured: int
) -> None:
    y = _labels()
    top1, _, n = screened_accuracy(_Guess(y, right), torch.zeros(3000, 1), y, 40, floor)
    assert n == measured
    assert top1 == pytest.approx(right)  # the accuracy of what was measured, whether or not it stopped


def test_looks_fall_on_the_first_batch_past_each_thousand_images() -> None:
    y = _labels()
    assert screened_accuracy(_Guess(y, 10), torch.zeros(3000, 1), y, 64, 45.0)[2] == 1024


def test_the_wilson_bound_holds_the_truth_where_the_normal_one_fails() -> None:
    assert wilson_upper(0, 1000) > 0  # no hits is still not proof of 0 %
    assert wilson_upper(1000, 1000) == pytest.approx(100.0)
    assert 10.0 < wilson_upper(100, 1000) < 14.0


def test_a_collapsed_cell_stops_and_its_row_says_how_many_images(
    trained_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "SCREEN_IMAGES", 40)  # the synthetic validation split has 100 images
    settings = EvalSettings(calib_batches=2, calib_batch_size=32, eval_batch_size=20, compile="off")
    screened = CheckpointEvaluator(str(trained_checkpoint), settings)()
    collapsed, working = screened(Cell(1, 1)), screened(Cell(8, 8))
    assert collapsed["stopped_early"] and collapsed["images_val"] == collapsed["images_test"] == 40
    assert collapsed["val_top1"] < 40
    assert not working["stopped_early"] and (working["images_val"], working["images_test"]) == (100, 200)
    full = CheckpointEvaluator(str(trained_checkpoint), EvalSettings(2, 32, 20, compile="off", stop_collapsed=False))()
    row = full(Cell(1, 1))
    assert not row["stopped_early"] and (row["images_val"], row["images_test"]) == (100, 200)
