"""scale_dtype float16: scales and biases on the float16 grid, integers chosen with them, clear errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from bitsweep.config import from_dict, to_dict
from bitsweep.errors import BitsweepError
from bitsweep.quant import LayerOverride, QuantConfig, ptq
from bitsweep.quant.inspect import weight_layers
from bitsweep.quant.primitives import quantize
from bitsweep.quant.scale_dtype import FLOAT16_MAX, FLOAT16_TINY, apply_scale_dtype, round_bias, round_scale


def _is_float16(t: torch.Tensor) -> bool:
    return torch.equal(t.detach().half().float(), t.detach().float())


def test_rounding_lands_on_float16_values_inside_the_normal_range() -> None:
    s = torch.tensor([0.0, 1e-30, 3e-6, 0.1234567, 1.0, 7e4, float("inf")])
    r = round_scale(s, "float16")
    assert _is_float16(r) and r.dtype == torch.float32
    assert bool((r >= FLOAT16_TINY).all()) and bool((r <= FLOAT16_MAX).all())  # never 0, subnormal or inf
    assert torch.allclose(r[3], s[3], rtol=2**-11)
    b = round_bias(torch.tensor([-1e6, -1e-6, 0.0, 0.3, 1e6]), "float16")
    assert _is_float16(b) and b[0] == -FLOAT16_MAX and b[-1] == FLOAT16_MAX and b[1] != 0  # subnormal kept
    assert torch.equal(round_scale(s[:6], "float32"), s[:6])


def test_bad_scale_dtype_is_a_clear_error() -> None:
    with pytest.raises(BitsweepError, match="scale_dtype must be one of float32, float16.*'bfloat16'"):
        QuantConfig(scale_dtype="bfloat16")
    with pytest.raises(BitsweepError, match="scale_dtype must be one of"):
        from_dict(QuantConfig, {"scale_dtype": "half"})
    with pytest.raises(BitsweepError, match="scale_dtype"):
        QuantConfig.from_bits(4, 8, scale_dtype="fp16")


def test_config_round_trips_through_dicts() -> None:
    config = QuantConfig.from_bits(4, 8, overrides=(LayerOverride("a", weight_bits=8),), scale_dtype="float16")
    assert from_dict(QuantConfig, to_dict(config)) == config
    assert QuantConfig().scale_dtype == "float32"


def test_ptq_float16_fixes_scales_biases_and_nearest_integers(mbv2: nn.Module, images: torch.Tensor) -> None:
    batches = [images[:8], images[8:]]
    config = QuantConfig.from_bits(4, 8, scale_dtype="float16")
    model = ptq(copy.deepcopy(mbv2), config, batches).model
    for name, m in weight_layers(model):
        wq = m.weight_quantizer
        assert _is_float16(wq.scale), name
        assert m.bias is None or _is_float16(m.bias), name
        # The integers are the nearest levels under the rounded scale, and the cached weight uses them.
        assert torch.equal(wq.q, quantize(m.weight, wq.scale, wq.zero_point, wq.spec)), name
        assert torch.equal(m.weight_fq, wq.dequantized()), name


def test_float16_changes_the_model_far_less_than_quantization_does(mbv2: nn.Module, images: torch.Tensor) -> None:
    batches = [images[:8], images[8:]]
    f32 = ptq(copy.deepcopy(mbv2), QuantConfig.from_bits(4, 8), batches)
    f16 = ptq(copy.deepcopy(mbv2), dataclasses.replace(f32.config, scale_dtype="float16"), stats=f32.stats).model
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, a, b = mbv2(x), f32.model(x), f16(x)
    assert (a - b).abs().mean() < 0.1 * (a - ref).abs().mean()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95


def test_integers_a_method_chose_are_kept(mbv2: nn.Module, images: torch.Tensor) -> None:
    model = ptq(copy.deepcopy(mbv2), QuantConfig.from_bits(4, 8), [images]).model
    _, layer = weight_layers(model)[1]
    wq = layer.weight_quantizer
    chosen = (wq.q - 1).clamp(wq.spec.qmin, wq.spec.qmax)  # not what nearest rounding picks
    layer.set_integers(chosen, wq.scale, wq.zero_point)
    apply_scale_dtype(model, "float16")
    assert torch.equal(layer.weight_quantizer.q, chosen) and _is_float16(layer.weight_quantizer.scale)
