"""ptq(): the one post-training entry point, its method registry, and what it records."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.quant import PTQ_METHODS, PTQContext, PTQMethod, QuantConfig, calibrate, convert, ptq, quantize_

ptq_module = importlib.import_module("bitsweep.quant.ptq")  # the module (``bitsweep.quant.ptq`` is the function)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.zeros(4, dtype=torch.long)) for _ in range(n)]


def test_ptq_equals_the_three_steps_bit_for_bit() -> None:
    config = QuantConfig.from_bits(3, 5, observer="mse")
    a = _model()
    quantize_(a, config)
    calibrate(a, _batches(3), 2)
    convert(a)
    result = ptq(_model(), config, _batches(3), num_batches=2)
    assert result.config is config and result.summary.weight_count == 2
    for (k, va), (k2, vb) in zip(a.state_dict().items(), result.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(va, vb), k
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(a(x), result.model(x))


def test_calibration_batches_are_those_seen_not_those_asked_for() -> None:
    assert ptq(_model(), QuantConfig.from_bits(8, 8), _batches(5), num_batches=1000).calibration_batches == 5
    assert ptq(_model(), QuantConfig.from_bits(8, 8), _batches(5), num_batches=2).calibration_batches == 2
    assert ptq(_model(), QuantConfig.from_bits(8, None), iter(_batches(3))).calibration_batches == 3  # no act. stats


def test_reused_stats_skip_calibration() -> None:
    first = ptq(_model(), QuantConfig.from_bits(8, 8), _batches(3))
    again = ptq(_model(), QuantConfig.from_bits(4, 4), stats=first.stats)
    fresh = ptq(_model(), QuantConfig.from_bits(4, 4), _batches(3))
    assert again.calibration_batches == 3
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again.model(x), fresh.model(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs calibration images"),
        ({"calibration": []}, "calibration set is empty"),
        ({"calibration": _batches(1), "num_batches": 0}, "positive whole number"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(BitsweepError, match=message):
        ptq(_model(), QuantConfig.from_bits(8, 8), **kwargs)


def test_method_is_validated_against_the_registry() -> None:
    assert list(PTQ_METHODS)[0] == "rtn" and QuantConfig().method == "rtn"
    assert QuantConfig.from_bits(4, 8, method="rtn").method == "rtn"
    with pytest.raises(ValueError, match="unknown post-training method 'gptq'; choose one of rtn"):
        QuantConfig.from_bits(4, 8, method="gptq")


def test_a_method_plugs_in_around_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered method's steps see the float model, the images and the converted model."""
    seen: dict[str, object] = {}

    def before(ctx: PTQContext) -> None:
        seen["before"] = (type(ctx.model[0]).__name__, len(ctx.images), ctx.stats)

    def after(ctx: PTQContext) -> None:
        seen["after"] = (type(ctx.model[0]).__name__, len(ctx.images), sorted(ctx.stats or {}))
        seen["float"] = type(ctx.float_model[0]).__name__ if ctx.float_model is not None else None
        conv = ctx.model[0]
        conv.set_integers(torch.zeros_like(conv.int_weight()), conv.weight_quantizer.scale,
                          conv.weight_quantizer.zero_point)  # fmt: skip

    method = PTQMethod("probe", "test", before_prepare=before, after_convert=after, needs_images=True,
                       needs_float_model=True)  # fmt: skip
    monkeypatch.setattr(ptq_module, "get_method", lambda name: method)
    config = QuantConfig.from_bits(4, 8)
    result = ptq(_model(), config, iter(_batches(4)), num_batches=3)
    assert seen["before"] == ("Conv2d", 3, None)
    assert seen["after"][0] == "QuantConv2d" and seen["after"][1] == 3 and seen["after"][2]
    assert seen["float"] == "Conv2d" and result.calibration_batches == 3
    assert not result.model[0].int_weight().any()
    with pytest.raises(BitsweepError, match="'probe' method learns from calibration images"):
        ptq(_model(), config, stats=result.stats)


def test_model_is_quantized_in_place_and_left_in_eval_mode() -> None:
    model = _model().train()
    result = ptq(model, dataclasses.replace(QuantConfig.from_bits(8, 8), fold_bn=False), _batches(1))
    assert result.model is model and not model.training
    assert copy.deepcopy(result.model)(torch.randn(1, 1, 8, 8)).shape == (1, 3)
