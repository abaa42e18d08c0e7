"""Cross-layer equalization: same float function, balanced ranges, exact absorption, replayed on load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.artifacts import ModelRecord, PackedMeta, load_packed, save_packed
from bitsweep.backend.intref import compare
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.equalize import (
    _in_ranges,
    _out_ranges,
    absorb_high_bias,
    cross_layer_equalization,
    find_pairs,
    relu6_to_relu,
)
from bitsweep.quant.fold import fold_batchnorm
from bitsweep.quant.methods import get_method


def _reference(model: nn.Module) -> nn.Module:
    """The function equalization must keep: BatchNorm folded and the pairs' ReLU6 as ReLU."""
    ref = copy.deepcopy(model)
    fold_batchnorm(ref)
    relu6_to_relu(ref)
    return ref


def test_pairs_include_depthwise_and_are_the_same_before_and_after_folding(mbv2: nn.Module) -> None:
    pairs = find_pairs(mbv2)
    folded = copy.deepcopy(mbv2)
    fold_batchnorm(folded)
    assert find_pairs(folded) == pairs
    convs = dict(mbv2.named_modules())
    found = {(p.conv1, p.conv2) for p in pairs}
    for name, block in mbv2.named_modules():  # each block: expand -> depthwise and depthwise -> project
        if type(block).__name__ == "InvertedResidual" and len(block.conv) == 3:
            assert (f"{name}.conv.0.0", f"{name}.conv.1.0") in found and (
                f"{name}.conv.1.0",
                f"{name}.conv.2.0",
            ) in found
            assert convs[f"{name}.conv.1.0"].groups > 1  # the depthwise convolution sits in both pairs
    assert all(isinstance(convs[p.act], nn.ReLU6) for p in pairs)
    assert not any(p.conv1 == "features.18.0" for p in pairs)  # the last ReLU6 feeds pooling, not a convolution


def test_equalization_keeps_the_float_outputs_and_balances_ranges(mbv2: nn.Module, images: torch.Tensor) -> None:
    ref = _reference(mbv2)
    model = copy.deepcopy(mbv2)
    report = cross_layer_equalization(model, None)
    assert report.pairs == len(find_pairs(ref)) and report.relu6_replaced == report.pairs
    with torch.no_grad():
        assert (model(images) - ref(images)).abs().max() <= 1e-5
    assert report.range_ratio_before > 1.5 and report.range_ratio_after < 1.01
    last = find_pairs(model)[-1]  # every pair balanced at the end, not only the last one visited
    r1, r2 = _out_ranges(model.get_submodule(last.conv1)), _in_ranges(model.get_submodule(last.conv2))
    assert torch.allclose(r1, r2, rtol=1e-3)


def test_high_bias_absorption_is_exact_where_the_offset_always_holds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([50.0, 0.0, 40.0, -1.0]))  # channels 0 and 2 never go below zero
    x = torch.rand(32, 2, 6, 6)
    ref = copy.deepcopy(model)
    absorbed = absorb_high_bias(model, find_pairs(model), x)
    assert absorbed == 2
    assert model[0].bias[0] < 50.0 and model[0].bias[2] < 40.0
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-4
        assert model[0](x).amax() < ref[0](x).amax()  # the activation range shrank


def test_no_absorption_into_a_padded_convolution() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(50.0)
    before = model[0].bias.clone()
    assert absorb_high_bias(model, find_pairs(model), torch.rand(4, 2, 5, 5)) == 0
    assert torch.equal(model[0].bias, before)


def test_cle_method_is_integer_exact_and_round_trips(mbv2: nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    config = QuantConfig.from_bits(4, 8, "per_tensor", method="cle")
    model = ptq(copy.deepcopy(mbv2), config, [images], options={"progress": False}).model

    def count(m: nn.Module, kind: type[nn.Module]) -> int:
        return sum(isinstance(x, kind) for x in m.modules())

    pairs = len(find_pairs(mbv2))  # the ReLU6 outside pairs (feeding pooling or a residual) stay
    assert count(model, nn.ReLU) == pairs and count(model, nn.ReLU6) == count(mbv2, nn.ReLU6) - pairs > 0
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    agreement = compare(model, [(images, labels)])
    assert agreement.max_logit_diff == 0.0 and agreement.top1_agreement == 100.0
    record = ModelRecord("mobilenetv2", 10, 1, (28, 28), (0.5,), (0.25,), {"width": 0.25})
    path = save_packed(model, tmp_path / "cle.safetensors", PackedMeta(record, config)).path
    loaded, meta = load_packed(path)
    assert meta.config.method == "cle"
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_composed_methods_run_every_step_in_order() -> None:
    chain = get_method("cle+bias_correction")
    assert chain.before_prepare is not None and chain.after_convert is not None and chain.restructure is not None
    assert chain.needs_images
    assert QuantConfig.from_bits(4, 8, method="cle+qdrop").method == "cle+qdrop"
    with pytest.raises(ValueError, match="twice"):
        get_method("cle+cle")
    with pytest.raises((ValueError, BitsweepError), match="unknown post-training method 'cel'"):
        QuantConfig.from_bits(4, 8, method="cel+qdrop")


def test_cle_on_a_model_without_pairs_says_so() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(BitsweepError, match="found no convolution"):
        ptq(model, QuantConfig.from_bits(8, 8, method="cle"), [torch.randn(4, 1, 4, 4)])
