"""The validation loop: exact file bytes, budgets, the tightening rule (with a scripted evaluation), the cache."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from bitsweep.errors import BitsweepError
from bitsweep.search import validate
from bitsweep.search.sensitivity import Sensitivity, Trial
from bitsweep.search.validate import load_cached_sensitivity, save_cached_sensitivity, search_validated

BITS = (2, 4, 8)


def _sensitivity(tiny) -> Sensitivity:
    """Deterministic drops, 0 at 8 bits: fewer bits, bigger drop."""
    trials = tuple(
        Trial(n, b, 1.0, 90.0 - (8 - b) * (1 + i % 3) / 10) for i, n in enumerate(tiny.names.weights) for b in BITS
    )
    return Sensitivity(1.0, 90.0, 32, trials)


def _split(tiny) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in tiny.batches]), torch.cat([y for _, y in tiny.batches])


def _run(tiny, **kwargs):
    kwargs.setdefault("sensitivity", _sensitivity(tiny))
    return search_validated(tiny.model, tiny.batches, _split(tiny), record=tiny.record, weight_bits=BITS,
                            progress=False, **kwargs)  # fmt: skip


def _scripted(monkeypatch: pytest.MonkeyPatch, drops: list[float]) -> list[float]:
    """FP32 top-1 90; each integer-exact evaluation reports the next drop of ``drops``."""
    seen: list[float] = []

    def fake(model, split, batch_size=40, runner=None):
        seen.append(drops[len(seen)])
        return 90.0 - seen[-1], "integer-exact"

    monkeypatch.setattr(validate, "integer_top1", fake)
    monkeypatch.setattr(validate, "float_top1", lambda model, split, batch_size=40: 90.0)
    return seen


def test_size_budget_writes_the_predicted_bytes(tiny, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    result = _run(tiny, max_ratio=6.0, packed_path=path)
    assert result.max_bytes == math.floor(result.fp32_bytes / 6.0) and len(result.rounds) == 1 and result.met
    assert result.file_bytes == result.predicted_bytes == os.path.getsize(path) <= result.max_bytes
    assert min(result.plan.weights.values()) < 8 and result.ratio >= 6.0
    assert result.simulation == "integer-exact" and 0 <= result.val_top1 <= 100 and result.test_top1 is None
    assert result.to_dict()["sizes_equal"] and json.dumps(result.to_dict())


def test_impossible_size_fails_before_measuring(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("sensitivity measured for a budget no plan meets")

    monkeypatch.setattr(validate, "measure_sensitivity", never)
    with pytest.raises(BitsweepError, match=r"smallest reachable size is [\d,]+ bytes"):
        _run(tiny, max_bytes=1000, sensitivity=None)


def test_budget_arguments_are_checked(tiny) -> None:
    with pytest.raises(BitsweepError, match="exactly one budget"):
        _run(tiny, max_bytes=10**6, max_drop=1.0)
    with pytest.raises(BitsweepError, match="max_ratio must be positive"):
        _run(tiny, max_ratio=0.0)
    with pytest.raises(BitsweepError, match="finite number of points"):
        _run(tiny, max_drop=-1.0)


def test_a_miss_tightens_by_the_measured_ratio_and_re_solves(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [3.0, 0.5])
    result = _run(tiny, max_drop=2.0)
    first, second = result.rounds
    assert first.budget == 2.0 and 0 < first.predicted_drop <= 2.0 and first.val_drop == 3.0
    assert second.budget == pytest.approx(first.predicted_drop * 2.0 / 3.0)
    assert second.predicted_drop <= second.budget + 1e-9 and second.predicted_drop < first.predicted_drop
    assert result.met and result.val_drop == 0.5 and dict(result.plan.weights) == dict(second.weight_bits)
    assert any("re-solved with summed-drop budget" in n for n in result.notes)


def test_persistent_miss_stops_after_max_rounds(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [3.0, 3.0, 3.0, 3.0])
    result = _run(tiny, max_drop=2.0, max_rounds=3)
    assert len(result.rounds) == 3 and not result.met
    assert [r.budget for r in result.rounds] == sorted((r.budget for r in result.rounds), reverse=True)
    assert "after 3 round(s)" in result.notes[-1]


def test_miss_with_nothing_predicted_is_not_retried(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [1.0, 1.0])
    result = _run(tiny, max_drop=0.0)
    assert len(result.rounds) == 1 and not result.met and set(result.plan.weights.values()) == {8}
    assert "predicted to lose nothing" in result.notes[-1]


def test_sensitivity_cache_is_keyed(tiny, tmp_path: Path) -> None:
    path, key = tmp_path / "sensitivity.json", {"checkpoint_sha256": "ab", "weight_bits": [2, 4, 8]}
    assert load_cached_sensitivity(path, key) is None
    save_cached_sensitivity(path, key, _sensitivity(tiny))
    assert load_cached_sensitivity(path, key) == _sensitivity(tiny)
    assert load_cached_sensitivity(path, {**key, "weight_bits": [2, 8]}) is None
    path.write_text("{not json")
    assert load_cached_sensitivity(path, key) is None


def test_cache_is_written_when_measured(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def measured(*args, **kwargs):
        calls.append(1)
        return _sensitivity(tiny)

    monkeypatch.setattr(validate, "measure_sensitivity", measured)
    cache = (tmp_path / "s.json", {"k": 1})
    _run(tiny, max_bytes=10**9, sensitivity=None, sensitivity_cache=cache)
    assert calls == [1] and load_cached_sensitivity(*cache) == _sensitivity(tiny)  # the CLI test covers reuse


def _with_activations(tiny, sens: Sensitivity) -> Sensitivity:
    """Activation drops: 1 point at 4 bits for every site, 0 at 8."""
    acts = tuple(Trial(s, b, 1.0, 90.0 - (1.0 if b == 4 else 0.0)) for s in tiny.names.activations for b in (4, 8))
    return dataclasses.replace(sens, activation_trials=acts)


def test_activation_bits_and_peak_are_recorded(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [0.5])
    path = tmp_path / "m.safetensors"
    result = _run(tiny, max_ratio=6.0, packed_path=path, activation_bits=(4, 8), max_activation_bytes=20_000,
                  sensitivity=_with_activations(tiny, _sensitivity(tiny)))  # fmt: skip
    assert result.file_bytes == result.predicted_bytes == os.path.getsize(path) and result.met
    assert set(result.activation_bits) == set(tiny.names.activations)
    assert set(result.plan.activations) == {s for s, b in result.activation_bits.items() if b == 4} != set()
    assert result.peak_activation_bytes <= 20_000
    record = json.loads(json.dumps(result.to_dict()))
    assert record["activation_bits_per_site"] == dict(result.activation_bits)
    assert record["peak_activation_bytes"] == result.peak_activation_bytes and record["max_activation_bytes"] == 20_000
    assert record["rounds"][0]["activation_bits"] == dict(result.activation_bits)
    assert record["layer_bits"]["activations"] == dict(result.plan.activations)


def test_impossible_peak_fails_before_measuring(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("sensitivity measured for a peak no plan meets")

    monkeypatch.setattr(validate, "measure_sensitivity", never)
    monkeypatch.setattr(validate, "measure_activation_sensitivity", never)
    with pytest.raises(BitsweepError, match="the smallest reachable peak is 18,816 bytes"):
        _run(tiny, max_drop=1.0, activation_bits=(4, 8), max_activation_bytes=10_000, sensitivity=None)


def test_a_cache_without_activation_trials_is_measured_again(tiny, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []

    def weights(*args, **kwargs):
        calls.append("weights")
        return _sensitivity(tiny)

    def activations(model, validation, calibration, bits, **kwargs):
        calls.append("activations")
        return _with_activations(tiny, _sensitivity(tiny)).activation_trials

    monkeypatch.setattr(validate, "measure_sensitivity", weights)
    monkeypatch.setattr(validate, "measure_activation_sensitivity", activations)
    _scripted(monkeypatch, [0.0, 0.0])
    cache = (tmp_path / "s.json", {"k": 1})
    save_cached_sensitivity(*cache, _sensitivity(tiny))  # weight trials only, under the same key
    _run(tiny, max_bytes=10**9, activation_bits=(4, 8), sensitivity=None, sensitivity_cache=cache)
    assert calls == ["weights", "activations"]
    cached = load_cached_sensitivity(*cache)
    assert cached is not None and cached.has_activations(tiny.names.activations, (4, 8))
    _run(tiny, max_bytes=10**9, activation_bits=(4, 8), sensitivity=None, sensitivity_cache=cache)
    assert calls == ["weights", "activations"]  # now it is reused
