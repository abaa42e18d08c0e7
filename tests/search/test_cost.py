from __future__ import annotations

import copy
import dataclasses
import os
import random
from pathlib import Path

import pytest

from bitsweep.artifacts import PackedMeta, save_packed
from bitsweep.quant import ptq
from bitsweep.search.cost import byte_table, packed_size
from bitsweep.search.layer_bits import LayerBits

BITS = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def _random_plan(tiny, seed: int) -> LayerBits:
    rng = random.Random(seed)
    weights = {n: rng.choice(BITS) for n in tiny.names.weights if rng.random() < 0.8}
    acts = {n: rng.choice((4, 6, 8, 16)) for n in tiny.names.activations if rng.random() < 0.3}
    return LayerBits(rng.choice(BITS), rng.choice((6, 8)), weights, acts)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_predicted_bytes_equal_the_packed_file(tmp_path: Path, tiny, seed: int) -> None:
    plan = _random_plan(tiny, seed)
    config = plan.to_quant_config()
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
