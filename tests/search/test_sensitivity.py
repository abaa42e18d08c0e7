from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.search.sensitivity import Sensitivity, measure_sensitivity


def _small() -> nn.Module:
    """A network whose logits depend on its input (the randomly initialised MobileNet's barely do)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10)
    ).eval()


def test_one_layer_at_a_time(tmp_path: Path, tiny) -> None:
    result = measure_sensitivity(_small(), tiny.batches, (2, 16), progress=False)
    assert result.images == 32 and len(result.trials) == 4 and result.reference == "float"
    loss = result.drops("loss")
    assert set(loss) == {"0", "4"}
    for name in loss:
        assert abs(loss[name][16]) < 1e-4  # 16 bits is indistinguishable from float
        assert abs(loss[name][2]) > 100 * abs(loss[name][16])  # ternary weights are not
    assert set(result.drops("top1")["0"]) == {2, 16}
    assert Sensitivity.load(result.save(tmp_path / "s.json")) == result


def test_model_is_left_unchanged(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    measure_sensitivity(tiny.model, tiny.batches, (2,), layers=[tiny.names.weights[1]], max_batches=1, progress=False)
    after = tiny.model.state_dict()
    assert all(before[k].equal(after[k]) for k in before)


def test_bad_inputs() -> None:
    with pytest.raises(BitsweepError, match="validation set is empty"):
        measure_sensitivity(nn.Linear(2, 2), [], (4,), progress=False)
    with pytest.raises(BitsweepError, match="not a sensitivity record"):
        Sensitivity.from_dict({"trials": []})
