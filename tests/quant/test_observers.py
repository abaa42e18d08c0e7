"""Each observer's numbers on small tensors, worked out by hand, and the observer registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitsweep.quant import QuantConfig, weight_spec
from bitsweep.quant.observers import (
    EMA_FACTOR,
    MSE_CANDIDATES,
    OBSERVERS,
    ActivationStats,
    Observer,
    get_observer,
    weight_qparams,
)
from bitsweep.quant.primitives import choose_qparams, fake_quantize_reference
from bitsweep.quant.spec import QuantSpec

U8 = QuantSpec(8, signed=False, symmetric=False)  # levels 0..255


def _stats(*batches: list[float]) -> ActivationStats:
    s = ActivationStats()
    for b in batches:
        s.update(torch.tensor(b))
    return s


def test_registry_holds_the_four_observers_and_rejects_others() -> None:
    assert list(OBSERVERS) == ["minmax", "moving_average", "percentile", "mse"]
    assert all(isinstance(o, Observer) and o.name == n for n, o in OBSERVERS.items())
    with pytest.raises(ValueError, match="unknown observer 'max'; choose one of minmax, moving_average"):
        get_observer("max")
    with pytest.raises(ValueError, match="unknown observer"):
        QuantConfig.from_bits(8, 8, observer="max")
    with pytest.raises(TypeError):
        OBSERVERS["mine"] = Observer()  # type: ignore[index]  # read-only registry


def test_stats_track_range_moving_average_and_batches() -> None:
    s = _stats([0.0, 1.0], [0.0, 11.0])
    assert (s.min.item(), s.max.item(), s.batches) == (0.0, 11.0, 2)
    assert s.ema_max.item() == pytest.approx(1.0 + EMA_FACTOR * (11.0 - 1.0))  # 2.0
    assert s.sample.numel() == 4 and not s.negative
    assert _stats([-0.5, 1.0]).negative


def test_minmax_activation_maps_the_full_range() -> None:
    scale, zp = _stats([0.0, 1.0], [0.5, 2.55]).qparams(U8, "minmax")
    assert scale.item() == pytest.approx(0.01) and zp.item() == 0
    # A negative site: the effective spec is signed, zero lands on level round(0.5 / (2.55 / 255)) - 128.
    s = _stats([-0.5, 2.05])
    scale, zp = s.qparams(s.effective_spec(U8), "minmax")
    assert scale.item() == pytest.approx(0.01) and zp.item() == -128 + 50


def test_moving_average_activation_uses_the_averaged_range() -> None:
    scale, zp = _stats([0.0, 1.0], [0.0, 11.0]).qparams(U8, "moving_average")
    assert scale.item() == pytest.approx(2.0 / 255) and zp.item() == 0
    assert _stats([0.0, 1.0], [0.0, 11.0]).qparams(U8, "minmax")[0].item() == pytest.approx(11.0 / 255)


def test_percentile_activation_ignores_the_extreme_hundredth_of_a_percent() -> None:
    s = ActivationStats()
    s.update(torch.tensor([0.0, 1.0]))
    s.sample = torch.linspace(0.0, 100.0, 10001)  # a known sample: percentile p is p itself
    scale, zp = s.qparams(U8, "percentile")
    assert scale.item() == pytest.approx(99.99 / 255, rel=1e-5) and zp.item() == 0


def test_mse_activation_clips_an_outlier_and_is_the_best_candidate() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(2000, generator=g), torch.tensor([3.0])])
    s = _stats(values.tolist())
    spec = QuantSpec(4, signed=False, symmetric=False)
    scale, zp = s.qparams(spec, "mse")
    assert scale.item() < 0.9 * 3.0 / 15  # the outlier is clipped

    def err(sc: torch.Tensor, z: torch.Tensor) -> float:
        return (fake_quantize_reference(s.sample, sc, z, spec) - s.sample).pow(2).mean().item()

    # The same search written out: shrink factors 1 .. 0.05, keep the first least error.
    candidates = [choose_qparams(s.min * a, s.max * a, spec) for a in
                  (1.0 - i / MSE_CANDIDATES * 0.95 for i in range(MSE_CANDIDATES))]  # fmt: skip
    best = min(candidates, key=lambda c: err(*c))
    assert scale.item() == best[0].item() and zp.item() == best[1].item()
    assert err(scale, zp) < err(*s.qparams(spec, "minmax"))


def test_minmax_weights_per_channel_and_per_tensor() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    scale, zp = weight_qparams(w, weight_spec(8))  # signed symmetric narrow: qmax 127
    torch.testing.assert_close(scale, torch.tensor([2.0, 0.5]) / 127, atol=0, rtol=0)
    assert zp.tolist() == [0, 0]
    scale, zp = weight_qparams(w, weight_spec(8, "per_tensor"))
    assert scale.shape == () and scale.item() == pytest.approx(2.0 / 127)
    for observer in ("moving_average",):  # a fixed tensor has no batches to average
        assert torch.equal(weight_qparams(w, weight_spec(8), observer)[0], weight_qparams(w, weight_spec(8))[0])


def test_percentile_weights_per_channel() -> None:
    rows = torch.stack([torch.linspace(-100.0, 100.0, 20001), torch.linspace(-1.0, 1.0, 20001)])
    scale, _ = weight_qparams(rows, weight_spec(8), "percentile")
    expected = torch.tensor([100.0 - 0.02, 1.0 - 0.0002]) / 127  # the 99.99th percentile of each row
    torch.testing.assert_close(scale, expected, rtol=1e-4, atol=0)


def test_mse_weights_shrink_an_outlier_row_only() -> None:
    g = torch.Generator().manual_seed(0)
    plain = torch.rand(256, generator=g) * 2 - 1
    spiky = plain.clone()
    spiky[0] = 2.0
    scale, _ = weight_qparams(torch.stack([plain, spiky]), weight_spec(4), "mse")
    minmax, _ = weight_qparams(torch.stack([plain, spiky]), weight_spec(4))
    assert scale[1] < 0.8 * minmax[1]  # the outlier row clips its spike
    assert scale[0] <= minmax[0] and scale[0] > minmax[0] / 2  # a uniform row keeps most of its range


def test_binary_weights_use_mean_absolute_value_whatever_the_observer() -> None:
    w = torch.tensor([[1.0, -3.0], [0.5, -0.5]])
    spec = dataclasses.replace(weight_spec(1), narrow_range=False)
    for observer in OBSERVERS:
        scale, zp = weight_qparams(w, spec, observer)
        assert scale.tolist() == [2.0, 0.5] and zp.tolist() == [0, 0]
