"""quantize_ / calibrate / convert on MobileNet-v2 and on user models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.models.mobilenetv2 import Add
from bitsweep.quant import (
    ActivationQuantizer,
    LayerOverride,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    activation_quantizers,
    calibrate,
    convert,
    fold_batchnorm,
    ptq,
    quantize_,
)


def _prepare(model: nn.Module, images: torch.Tensor, w: int, a: int, **kw: object) -> nn.Module:
    return ptq(model, QuantConfig.from_bits(w, a, **kw), [images[:8], images[8:]]).model  # type: ignore[arg-type]


def test_every_activation_site_of_mobilenetv2_is_quantized(mbv2: nn.Module) -> None:
    # Count the sites independently from the module structure:
    relu6 = sum(isinstance(m, nn.ReLU6) for m in mbv2.modules())
    adds = sum(isinstance(m, Add) for m in mbv2.modules())
    projections = sum(1 for m in mbv2.modules() if isinstance(m, nn.Sequential) and len(m) == 2
                      and isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d))  # fmt: skip
    convs_linears = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in mbv2.modules())
    summary = quantize_(mbv2, QuantConfig.from_bits(4, 8))
    sites = [s for _, s, _ in summary.activation_quantizers]
    assert sites.count("activation") == relu6
    assert sites.count("add") == adds and adds > 0
    assert sites.count("output") == projections  # linear bottleneck outputs
    assert sites.count("input") == 1 and sites.count("pool") == 1  # network input; classifier input
    assert summary.activation_count == relu6 + adds + projections + 2
    assert summary.weight_count == convs_linears and summary.left_in_fp == ()
    assert summary.folded_bn == convs_linears - 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mbv2.modules())


def test_prepared_model_is_unchanged_until_convert(mbv2: nn.Module, images: torch.Tensor) -> None:
    ref = mbv2(images)
    quantize_(mbv2, QuantConfig.from_bits(2, 2))
    torch.testing.assert_close(mbv2(images), ref, atol=1e-5, rtol=1e-5)


def test_activation_bits_change_logits_and_8_bits_is_close(mbv2: nn.Module, images: torch.Tensor) -> None:
    ref = mbv2(images).detach()
    out = {a: _prepare(copy.deepcopy(mbv2), images, 8, a)(images).detach() for a in (2, 4, 8)}
    assert not torch.equal(out[2], out[4]) and not torch.equal(out[4], out[8])
    err = {a: (o - ref).abs().mean().item() for a, o in out.items()}
    assert err[8] < err[4] < err[2]
    assert err[8] < 0.05 * ref.abs().mean().item()


def test_stats_reused_across_bit_widths_match_fresh_calibration(mbv2: nn.Module, images: torch.Tensor) -> None:
    a = copy.deepcopy(mbv2)
    quantize_(a, QuantConfig.from_bits(8, 8))
    stats = calibrate(a, [images[:8], images[8:]], num_batches=2)
    b = copy.deepcopy(mbv2)
    quantize_(b, QuantConfig.from_bits(3, 4))
    convert(b, stats)
    fresh = _prepare(copy.deepcopy(mbv2), images, 3, 4)
    torch.testing.assert_close(b(images), fresh(images), atol=0, rtol=0)


def test_depthwise_convs_get_one_scale_per_channel(mbv2: nn.Module, images: torch.Tensor) -> None:
    _prepare(mbv2, images, 4, 8)
    dw = [m for m in mbv2.modules() if isinstance(m, QuantConv2d) and m.groups == m.out_channels > 1]
    assert dw
    for m in dw:
        s = m.weight_quantizer.scale
        assert s.shape == (m.out_channels,) and s.unique().numel() > 1
        assert m.int_weight().shape == m.weight.shape and m.int_weight().abs().max() <= 7


def test_one_bit_weights_no_nan(mbv2: nn.Module, images: torch.Tensor) -> None:
    out = _prepare(mbv2, images, 1, 2)(images)
    assert torch.isfinite(out).all()
    for m in mbv2.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            assert set(m.int_weight().unique().tolist()) <= {-1, 1}


def test_bn_folding_preserves_outputs(mbv2: nn.Module, images: torch.Tensor) -> None:
    ref = mbv2(images)
    pairs = fold_batchnorm(mbv2)
    assert len(pairs) > 0
    torch.testing.assert_close(mbv2(images), ref, atol=1e-5, rtol=1e-4)


def test_no_fold_keeps_batchnorm(mbv2: nn.Module) -> None:
    summary = quantize_(mbv2, QuantConfig.from_bits(8, 8, fold_bn=False))
    assert summary.folded_bn == 0 and any("1" in n for n in summary.left_in_fp)
    assert any(isinstance(m, nn.BatchNorm2d) for m in mbv2.modules())


class UserNet(nn.Module):
    """Functional activations and a `+` residual in forward, no activation modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        z = F.hardswish(self.conv2(y))
        s = y + z
        return self.fc(F.adaptive_avg_pool2d(s, 1).flatten(1))


def test_user_model_with_functional_ops_gets_quantizers(images: torch.Tensor) -> None:
    model = UserNet().eval()
    ref = model(images)
    summary = quantize_(model, QuantConfig.from_bits(4, 4))
    sites = sorted(s for _, s, _ in summary.activation_quantizers)
    assert sites == ["activation", "activation", "add", "input", "pool"]
    torch.testing.assert_close(model(images), ref)
    calibrate(model, [images], num_batches=1)
    convert(model)
    out = model(images)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    copied = copy.deepcopy(model)  # the rebound forward survives deepcopy
    torch.testing.assert_close(copied(images), out, atol=0, rtol=0)


def test_overrides_set_bits_per_layer(mbv2: nn.Module, images: torch.Tensor) -> None:
    cfg = QuantConfig.from_bits(
        2, 4, overrides=(LayerOverride("features.0.*", weight_bits=8), LayerOverride("classifier.1", skip=True))
    )
    summary = quantize_(mbv2, cfg)
    bits = dict(summary.weight_quantizers)
    assert bits["features.0.0"] == 8 and bits["features.1.conv.0.0"] == 2
    assert "classifier.1" in summary.left_in_fp and isinstance(mbv2.classifier[1], nn.Linear)


def test_errors_are_user_errors(mbv2: nn.Module) -> None:
    with pytest.raises(BitsweepError, match="no Conv2d or Linear"):
        quantize_(nn.Sequential(nn.ReLU()), QuantConfig.from_bits(8, 8))
    quantize_(mbv2, QuantConfig.from_bits(8, 8))
    with pytest.raises(BitsweepError, match="empty"):
        calibrate(mbv2, [], num_batches=4)
    with pytest.raises(BitsweepError, match="calibrat"):
        convert(mbv2)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ValueError, match="1 to 16"):
            QuantConfig.from_bits(bad, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="observer"):
        QuantConfig.from_bits(8, 8, observer="bogus")


def test_weight_and_activation_observers_from_one_name() -> None:
    """``mse/minmax`` is MSE weight scales with min-max activation ranges; a bad form says how to write it."""
    cfg = QuantConfig.from_bits(2, 4, observer="mse/minmax")
    assert (cfg.weight_observer, cfg.activation_observer) == ("mse", "minmax")
    assert QuantConfig.from_bits(4, 4, observer="percentile").activation_observer == "percentile"
    for bad in ("mse/", "/mse", "a/b/c", "mse/bogus"):
        with pytest.raises(ValueError, match="observer"):
            QuantConfig.from_bits(4, 4, observer=bad)
    with pytest.raises(ValueError, match="drop one"):
        QuantConfig.from_bits(4, 4, observer="mse/minmax", activation_observer="mse")


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_every_observer_runs(mbv2: nn.Module, images: torch.Tensor, observer: str) -> None:
    out = _prepare(mbv2, images, 4, 4, observer=observer)(images)
    assert torch.isfinite(out).all()
    qs = activation_quantizers(mbv2)
    assert all(isinstance(q, ActivationQuantizer) and q.mode == "quantize" for q in qs.values())
    assert qs[next(n for n, q in qs.items() if q.site == "input")].spec.signed  # normalized input goes negative


def test_fused_clamp_activations_are_bit_identical(mbv2: nn.Module, images: torch.Tensor) -> None:
    from bitsweep.quant import QuantOutput

    for a in (2, 8):
        model = _prepare(copy.deepcopy(mbv2), images, 4, a)
        wrappers = [m for m in model.modules()
                    if isinstance(m, QuantOutput) and m.output_quantizer.site == "activation"]  # fmt: skip
        assert wrappers and all(m.fused for m in wrappers)  # ReLU6 is clamp(x, 0, 6): always subsumed
        fused = model(images * 3)
        for m in wrappers:
            m.fused = False
        torch.testing.assert_close(model(images * 3), fused, atol=0, rtol=0)


def test_leaky_relu_is_not_fused(images: torch.Tensor) -> None:
    from bitsweep.quant import QuantOutput

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LeakyReLU(0.1), nn.Conv2d(4, 2, 3)).eval()
    model = ptq(model, QuantConfig.from_bits(8, 4), [images]).model
    assert isinstance(model[1], QuantOutput) and not model[1].fused


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the module-order fallback must cope."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def test_untraceable_model_falls_back_to_modules(images: torch.Tensor) -> None:
    model = Untraceable().eval()
    summary = quantize_(model, QuantConfig.from_bits(4, 4))
    assert not summary.traced and any("traced" in n for n in summary.notes)
    assert sorted(s for _, s, _ in summary.activation_quantizers) == ["activation", "input", "pool"]
    calibrate(model, [images], 1)
    assert torch.isfinite(convert(model)(images)).all()
