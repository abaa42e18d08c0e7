from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from bitsweep.artifacts import PackedMeta, save_packed
from bitsweep.errors import BitsweepError
from bitsweep.quant import ptq
from bitsweep.search.api import search
from bitsweep.search.sensitivity import Sensitivity, Trial


def _fake_sensitivity(tiny) -> Sensitivity:
    """Deterministic drops (a measured run is tested in test_sensitivity): fewer bits, bigger drop."""
    trials = tuple(
        Trial(n, b, 1.0, 90.0 - (8 - b) * (1 + i % 3) / 10) for i, n in enumerate(tiny.names.weights) for b in (2, 4, 8)
    )
    return Sensitivity(1.0, 90.0, 32, trials)


def test_search_under_a_byte_budget_predicts_the_file_exactly(tmp_path: Path, tiny) -> None:
    sens = _fake_sensitivity(tiny)
    generous = search(tiny.model, tiny.batches, [], max_bytes=10**9, weight_bits=(2, 4, 8), record=tiny.record,
                      sensitivity=sens, progress=False)  # fmt: skip
    assert set(generous.plan.weights.values()) == {8} and generous.predicted_drop == 0.0
    budget = (generous.predicted_bytes * 6) // 10
    result = search(tiny.model, tiny.batches, [], max_bytes=budget, weight_bits=(2, 4, 8), record=tiny.record,
                    sensitivity=sens, progress=False)  # fmt: skip
    assert result.predicted_bytes <= budget
    model = ptq(copy.deepcopy(tiny.model), result.config, stats=tiny.stats).model
    written = save_packed(model, tmp_path / "m.safetensors", PackedMeta(tiny.record, result.config))
    assert os.path.getsize(written.path) == result.predicted_bytes
    with pytest.raises(BitsweepError, match="smallest reachable size"):
        search(tiny.model, tiny.batches, [], max_bytes=1000, weight_bits=(2, 4, 8), record=tiny.record,
               sensitivity=sens, progress=False)  # fmt: skip


def test_search_under_a_drop_budget(tiny) -> None:
    result = search(tiny.model, tiny.batches, [], max_drop=2.0, weight_bits=(2, 4, 8), record=tiny.record,
                    sensitivity=_fake_sensitivity(tiny), progress=False)  # fmt: skip
    assert result.predicted_drop <= 2.0 and min(result.plan.weights.values()) < 8
    with pytest.raises(BitsweepError, match="exactly one budget"):
        search(tiny.model, tiny.batches, [], record=tiny.record, sensitivity=_fake_sensitivity(tiny))
