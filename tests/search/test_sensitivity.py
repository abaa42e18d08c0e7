from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.search.sensitivity import Sensitivity, Trial, measure_activation_sensitivity, measure_sensitivity


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


def test_one_activation_site_at_a_time(tiny) -> None:
    """Each site's quantizers at b bits (ranges from calibration), every weight and other site in float."""
    model = _small()
    weights = measure_sensitivity(model, tiny.batches, (16,), progress=False)
    trials = measure_activation_sensitivity(model, tiny.batches, tiny.batches, (2, 16), progress=False)
    assert [(t.layer, t.bits) for t in trials] == [("0", 2), ("0", 16), ("2", 2), ("2", 16)]  # input, ReLU
    result = Sensitivity(weights.baseline_loss, weights.baseline_top1, weights.images, (), activation_trials=trials)
    loss = result.activation_drops("loss")
    for site in ("0", "2"):
        assert abs(loss[site][16]) < 1e-4  # 16 bits is indistinguishable from float
        assert abs(loss[site][2]) > 100 * abs(loss[site][16])
    assert result.has_activations(["0", "2"], [2, 16]) and not result.has_activations(["0"], [4])
    only = measure_activation_sensitivity(model, tiny.batches, tiny.batches, (2,), sites=["2"], progress=False)
    assert only == (trials[2],)  # the same numbers alone: other sites really were in float
    with pytest.raises(BitsweepError, match="no activation site named 'nope'"):
        measure_activation_sensitivity(model, tiny.batches, tiny.batches, (2,), sites=["nope"], progress=False)


def test_activation_trials_round_trip_and_older_records_read_as_unmeasured(tmp_path: Path) -> None:
    record = Sensitivity(1.0, 90.0, 32, (Trial("a", 4, 1.1, 89.0),), activation_trials=(Trial("s", 4, 1.2, 88.0),))
    assert Sensitivity.load(record.save(tmp_path / "s.json")) == record
    assert record.activation_drops() == {"s": {4: 2.0}}
    old = record.to_dict()
    del old["activation_trials"]  # a cache written before activation bits were searched
    assert Sensitivity.from_dict(old).activation_trials == () and not Sensitivity.from_dict(old).has_activations(
        ["s"], [4]
    )
