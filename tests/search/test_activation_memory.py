"""Peak activation memory: tensor shapes from one forward pass, options over the budget removed, a clear refusal."""

from __future__ import annotations

import copy

import pytest

from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.output import QuantOutput
from bitsweep.search.activation_memory import activation_numels, allowed_bits, peak, tensor_bytes


def test_numels_are_the_quantized_tensors_of_one_image(tiny) -> None:
    converted = ptq(copy.deepcopy(tiny.model), QuantConfig(), stats=tiny.stats).model
    fused = [m.fused for m in converted.modules() if isinstance(m, QuantOutput)]
    assert any(fused)  # fused activations skip their quantizer: the pass must still see them
    numels = activation_numels(converted, tiny.record)
    assert list(numels) == list(tiny.names.activations)  # every site, in model order
    assert numels["features.0.0"] == 1 * 28 * 28  # the network input (1x28x28)
    assert numels["features.0.2"] == 8 * 28 * 28  # stem: 8 channels (width 0.25), stride 1 at 28x28
    assert [m.fused for m in converted.modules() if isinstance(m, QuantOutput)] == fused  # left as it was


def test_options_over_the_budget_are_removed() -> None:
    numels = {"input": 784, "stem": 6272, "head": 100}
    assert allowed_bits(numels, (8, 4), None) == {"input": (4, 8), "stem": (4, 8), "head": (4, 8)}
    # 6272 values: 3136 bytes at 4 bits, 6272 at 8; the others fit at 8 bits.
    assert allowed_bits(numels, (4, 8), 6271) == {"input": (4, 8), "stem": (4,), "head": (4, 8)}
    assert peak(numels, {"input": 8, "stem": 4, "head": 8}) == (3136, "stem")
    assert tensor_bytes(6272, 3) == 2352 and tensor_bytes(1, 1) == 1


def test_an_impossible_budget_names_the_smallest_peak() -> None:
    numels = {"input": 784, "stem": 6272}
    with pytest.raises(BitsweepError) as e:
        allowed_bits(numels, (4, 8), 3135)
    assert str(e.value) == (
        "no plan keeps every activation tensor within 3,135 bytes; the smallest reachable peak is 3,136 bytes "
        "('stem', 6,272 values at 4 bits): raise the activation-memory budget to at least 3.136 kB or add lower "
        "activation bits"
    )
    assert allowed_bits(numels, (4, 8), 3136)["stem"] == (4,)
