from __future__ import annotations

import copy
import dataclasses
import os
import random
from pathlib import Path

import pytest

from bitsweep.artifacts import PackedMeta, save_packed
from bitsweep.quant import QuantConfig, ptq
from bitsweep.search.cost import byte_table, packed_size
from bitsweep.search.layer_bits import LayerBits

BITS = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def _random_plan(tiny, seed: int) -> LayerBits:
    rng = random.Random(seed)
    weights = {n: rng.choice(BITS) for n in tiny.names.weights if rng.random() < 0.8}
    acts = {n: rng.choice((4, 6, 8, 16)) for n in tiny.names.activations if rng.random() < 0.3}
    return LayerBits(rng.choice(BITS), rng.choice((6, 8)), weights, acts)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_predicted_bytes_equal_the_packed_file(tmp_path: Path, tiny, seed: int, scale_dtype: str) -> None:
    plan = dataclasses.replace(_random_plan(tiny, seed), scale_dtype=scale_dtype)  # the plan carries the dtype
    config = plan.to_quant_config()
    assert config.scale_dtype == scale_dtype
    model = ptq(copy.deepcopy(tiny.model), config, stats=tiny.stats).model
    written = save_packed(model, tmp_path / "m.safetensors", PackedMeta(tiny.record, config, {"seed": seed}))
    predicted = packed_size(dataclasses.replace(tiny.layout, extra={"seed": seed}), config)
    assert predicted.file_bytes == os.path.getsize(written.path) == written.file_bytes
    assert predicted.payload_bytes == written.payload_bytes


def test_byte_table_is_additive_up_to_padding_and_digits(tiny) -> None:
    """The solver's sum misses the exact size only by the header's padding and digit counts."""
    bits = (2, 3, 4, 5, 6, 8)
    table = byte_table(tiny.layout, LayerBits().to_quant_config(), bits)
    rng = random.Random(0)
    for _ in range(20):
        choice = {n: rng.choice(bits) for n in tiny.names.weights}
        exact = packed_size(tiny.layout, LayerBits.explicit(choice).to_quant_config()).file_bytes
        assert abs(exact - table.additive_bytes(choice)) <= 12
    top = {n: 8 for n in tiny.names.weights}
    assert packed_size(tiny.layout, LayerBits.explicit(top).to_quant_config()).file_bytes == table.additive_bytes(top)


def test_byte_table_under_float16_scales(tiny) -> None:
    """Float16 scales and biases move only the constant: the table stays exact for the all-highest plan."""
    bits = (2, 4, 8)
    base = QuantConfig(scale_dtype="float16")
    table = byte_table(tiny.layout, base, bits)
    top = {n: 8 for n in tiny.names.weights}
    exact = packed_size(tiny.layout, LayerBits.explicit(top).to_quant_config(base))
    assert exact.file_bytes == table.additive_bytes(top)
    f32 = packed_size(tiny.layout, LayerBits.explicit(top).to_quant_config())
    scales_and_biases = sum(ly.shape[0] * (2 if ly.bias else 1) for ly in tiny.layout.weights)
    assert f32.payload_bytes - exact.payload_bytes == 2 * scales_and_biases


def _random_explicit_plan(tiny, seed: int, weight_bits: tuple[int, ...], activation_bits: tuple[int, ...]):
    """The search's form with activation bits searched: every weight layer, the sites below the default listed."""
    rng = random.Random(seed)
    weights = {n: rng.choice(weight_bits) for n in tiny.names.weights}
    acts = {n: rng.choice(activation_bits) for n in tiny.names.activations}
    default = max(activation_bits)
    return weights, acts, LayerBits.explicit(weights, default, {s: b for s, b in acts.items() if b != default})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_site_activation_plans_predict_the_packed_file(tmp_path: Path, tiny, seed: int) -> None:
    """Random per-layer weight and per-site activation bits: predicted bytes == file bytes, table within residual."""
    w_bits, a_bits = (2, 3, 4, 8), (4, 6, 8, 16)
    weights, acts, plan = _random_explicit_plan(tiny, seed, w_bits, a_bits)
    config = plan.to_quant_config()
    model = ptq(copy.deepcopy(tiny.model), config, stats=tiny.stats).model
    written = save_packed(model, tmp_path / "m.safetensors", PackedMeta(tiny.record, config))
    predicted = packed_size(tiny.layout, config)
    assert predicted.file_bytes == os.path.getsize(written.path) == written.file_bytes
    # The table's sum: off by padding and digit counts only while spec indices stay one digit (< 10 specs;
    # 4 weight and 4 x 2 activation specs here reach two digits, which the search's tightening absorbs).
    w_bits, a_bits = (2, 4, 8), (4, 8, 16)
    weights, acts, plan = _random_explicit_plan(tiny, seed, w_bits, a_bits)
    table = byte_table(tiny.layout, LayerBits().to_quant_config(), w_bits, a_bits)
    exact = packed_size(tiny.layout, plan.to_quant_config()).file_bytes
    assert abs(exact - table.additive_bytes(weights, acts)) <= 12


def test_activation_bits_cost_only_header_bytes(tiny) -> None:
    """A site's bits change the file by its override and the spec entries in use, never the payload."""
    a_bits = (4, 8)
    table = byte_table(tiny.layout, LayerBits().to_quant_config(), (8,), a_bits)
    top_w = {n: 8 for n in tiny.names.weights}

    def exact(acts: dict[str, int]):
        listed = {s: b for s, b in acts.items() if b != 8}  # as the search writes it: 8 is the default
        return packed_size(tiny.layout, LayerBits.explicit(top_w, 8, listed).to_quant_config())

    top = dict.fromkeys(tiny.names.activations, 8)
    assert exact(top).file_bytes == table.additive_bytes(top_w, top)  # calibrated on the all-highest plan
    low = dict.fromkeys(tiny.names.activations, 4)
    assert exact(low).payload_bytes == exact(top).payload_bytes
    assert abs(exact(low).file_bytes - table.additive_bytes(top_w, low)) <= 12
    for site in tiny.names.activations[:2]:  # features.0.0 shares the first conv's entry; features.0.2 gets one
        one = {**top, site: 4}  # one site at 4 bits: its override and its spec entry (a4u or a4s)
        assert exact(one).file_bytes - exact(top).file_bytes == pytest.approx(
            table.additive_bytes(top_w, one) - table.additive_bytes(top_w, top), abs=7
        )
        assert set(table.site_labels[site][4]) <= {"a4u", "a4s"} and table.activations[site][8] == 0
