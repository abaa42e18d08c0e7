"""Learned rounding (per layer and per block) and bias correction: valid integers, lower error, integer-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitsweep.backend.intref import compare
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.bias_correction import correct_bias
from bitsweep.quant.capture import execution_order, float_mode, layer_inputs, module_inputs
from bitsweep.quant.reconstruct import ReconstructConfig, initial_v, reconstruct, soft_rounding, units


def _quantized(model: nn.Module, images: torch.Tensor, weight_bits: int = 3, activation_bits: int = 8) -> nn.Module:
    return ptq(copy.deepcopy(model), QuantConfig.from_bits(weight_bits, activation_bits), [images]).model


def test_soft_rounding_starts_at_the_fraction() -> None:
    rest = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    assert torch.allclose(soft_rounding(initial_v(rest)), rest, atol=2e-4)


def test_units_are_layers_or_blocks(mbv2: nn.Module, images: torch.Tensor) -> None:
    model = _quantized(mbv2, images)
    layers = units(model, images[:1], "layer")
    blocks = units(model, images[:1], "block")
    assert [n for n, _, _ in layers] == [n for n, _ in execution_order(model, images[:1])]
    assert sum(len(ls) for _, _, ls in blocks) == len(layers)
    names = [n for n, _, _ in blocks]
    assert names[:3] == ["features.0", "features.1", "features.2"] and names[-1] == "classifier.1"
    assert len(blocks[2][2]) == 3  # expand, depthwise, project


def test_learned_rounding_is_floor_or_ceiling_and_beats_nearest(mbv2: nn.Module, images: torch.Tensor) -> None:
    model = _quantized(mbv2, images)
    name, layer = execution_order(model, images[:1])[3]
    wq = layer.weight_quantizer
    ratio = layer.weight.detach() / wq.scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    before = wq.q.clone()
    with float_mode(model):
        x_float = layer_inputs(model, layer, images)
    x_quant = layer_inputs(model, layer, images)
    err_before = (
        (
            layer._conv_forward(x_quant, layer.weight_fq, layer.bias)
            - layer._conv_forward(x_float, layer.weight, layer.bias)
        )
        .pow(2)
        .mean()
    )
    results = reconstruct(model, images, ReconstructConfig(iterations=100, batch_size=8), progress=False)
    err_after = (
        (
            layer._conv_forward(x_quant, layer.weight_fq, layer.bias)
            - layer._conv_forward(x_float, layer.weight, layer.bias)
        )
        .pow(2)
        .mean()
    )
    q = wq.q.float()
    floor = torch.floor(ratio).clamp(wq.spec.qmin, wq.spec.qmax)
    ceil = torch.ceil(ratio).clamp(wq.spec.qmin, wq.spec.qmax)
    assert bool(((q == floor) | (q == ceil)).all()), name
    assert not torch.equal(before, wq.q)
    assert err_after < err_before  # a lower layer reconstruction error than nearest rounding
    assert results[3].name == name and results[3].learned_mse < results[3].nearest_mse
    assert torch.equal(layer.weight_fq, (q * wq.scale.reshape(-1, 1, 1, 1)).to(layer.weight_fq.dtype))


@pytest.mark.slow
def test_block_reconstruction_lowers_block_error(mbv2: nn.Module, images: torch.Tensor) -> None:
    model = _quantized(mbv2, images, weight_bits=2, activation_bits=4)
    cfg = ReconstructConfig(unit="block", iterations=60, batch_size=8, learn_activations=True, drop_prob=0.5)
    results = reconstruct(model, images, cfg, progress=False)
    assert results[2].name == "features.2"
    assert all(r.learned_mse <= r.nearest_mse for r in results), results  # never worse than where it started
    improved = [r for r in results if r.learned_mse < 0.9 * r.nearest_mse]
    assert len(improved) >= len(results) // 2, results  # and clearly better on most blocks
    assert sum(r.learned_mse for r in results) < 0.9 * sum(r.nearest_mse for r in results)


def test_bias_correction_lowers_mean_output_error(mbv2: nn.Module, images: torch.Tensor) -> None:
    held_out = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = mbv2(held_out)
        plain = _quantized(mbv2, images, weight_bits=2)
        corrected = copy.deepcopy(plain)
        shifts = correct_bias(corrected, images)
        assert len(shifts) == len(execution_order(plain, images[:1])) and shifts[0].mean_abs_shift > 0
        err_plain = (plain(held_out) - want).mean(0).abs().mean()
        err_corrected = (corrected(held_out) - want).mean(0).abs().mean()
    assert err_corrected < err_plain


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["layer", "block"])
def test_reconstructed_model_is_integer_exact(mbv2: nn.Module, images: torch.Tensor, unit: str) -> None:
    model = _quantized(mbv2, images, weight_bits=4, activation_bits=4)
    cfg = ReconstructConfig(unit=unit, iterations=10, batch_size=8, learn_activations=True, drop_prob=0.5)
    reconstruct(model, images, cfg, progress=False)
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    agreement = compare(model, [(images, labels)])
    assert agreement.max_logit_diff == 0.0 and agreement.top1_agreement == 100.0


def test_module_inputs_are_raw_and_layer_inputs_quantized(mbv2: nn.Module, images: torch.Tensor) -> None:
    model = _quantized(mbv2, images)
    first = execution_order(model, images[:1])[0][1]
    assert torch.equal(module_inputs(model, first, images), images)
    assert not torch.equal(layer_inputs(model, first, images), images)  # the input quantizer rounds it


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="drop_prob"):
        ReconstructConfig(drop_prob=1.0)
    with pytest.raises(ValueError, match="positive"):
        ReconstructConfig(iterations=0)
    with pytest.raises(ValueError, match="unit"):
        ReconstructConfig(unit="net")


def test_bad_input_gives_one_clear_message(mbv2: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown post-training method 'adaroundd'; choose one of rtn"):
        QuantConfig.from_bits(4, 8, method="adaroundd")
    with pytest.raises(BitsweepError, match="'adaround' method learns from calibration images"):
        ptq(copy.deepcopy(mbv2), QuantConfig.from_bits(4, 8, method="adaround"), stats={})
    no_weights = QuantConfig(weight=None, method="qdrop")  # activations only: nothing to reconstruct
    with pytest.raises(BitsweepError, match="no quantized weight layer to reconstruct"):
        ptq(copy.deepcopy(mbv2), no_weights, [images], options={"iterations": 1, "progress": False})


def test_method_options_reach_the_reconstruction(
    mbv2: nn.Module, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``iterations`` and ``act_lr`` from ``ptq(..., options=...)`` override the method's reconstruction settings."""
    import bitsweep.quant.methods as methods

    seen: list[ReconstructConfig] = []
    monkeypatch.setattr(methods, "reconstruct", lambda model, imgs, cfg, progress: seen.append(cfg))
    cfg = QuantConfig.from_bits(4, 4, method="qdrop")
    ptq(copy.deepcopy(mbv2), cfg, [images], options={"progress": False})
    ptq(copy.deepcopy(mbv2), cfg, [images], options={"iterations": 7, "act_lr": 4e-4, "progress": False})
    assert (seen[0].iterations, seen[0].act_lr) == (ReconstructConfig().iterations, ReconstructConfig().act_lr)
    assert (seen[1].iterations, seen[1].act_lr, seen[1].drop_prob) == (7, 4e-4, 0.5)
