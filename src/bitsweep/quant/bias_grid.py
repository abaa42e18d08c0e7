"""Which activation grid each weight layer's input is on, so forward can round biases as the integer program does.

The integer program adds a layer's bias as an integer on the accumulator's grid (input scale times
weight scale, per channel). A converted model's fake-quant forward adds the float bias; the two
differ by up to half an accumulator step per channel. After post-training quantization that is
noise (the same rounding the integer program reports), but a model *trained* through fake-quant
learns its float biases to a precision the integer program then throws away: one W4A4 QAT run
lost 2.2 points of validation accuracy to it (89.78 % fake-quant, 87.62 % integer-exact).

:func:`bind_bias_grids` walks the converted graph as :mod:`bitsweep.backend.lowering` does
(:func:`bitsweep.quant.walk.walk`), follows which :class:`ActivationQuantizer` last put each value
on its grid (clamps, flattening and identity keep the grid; an accumulator, a pool or a residual
add waits for the next quantizer), and binds each weight layer to its input's quantizer. The
layer then rounds its bias with the quantizer's *current* scale on every forward, so learned
step sizes (LSQ) move the bias grid with them.

>>> import torch
>>> from torch import nn
>>> from bitsweep.quant import QuantConfig, ptq
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
>>> model = ptq(model, QuantConfig.from_bits(4, 4), [torch.randn(8, 1, 8, 8)]).model
>>> bind_bias_grids(model)
2
>>> model[3].bias_grid[0] is model[1].output_quantizer  # the Linear's input is the ReLU6 output's grid
True
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bitsweep.quant.graph import NodeInfo, Op, classify, trace
from bitsweep.quant.inspect import is_weight_layer
from bitsweep.quant.modules import ActivationQuantizer
from bitsweep.quant.walk import walk

_Value = ActivationQuantizer | None  # the quantizer whose grid a value is on; None: float or an accumulator


class _InputGrids:
    """An :class:`~bitsweep.quant.walk.Emitter` that records each weight layer's input quantizer."""

    purpose = "bias rounding"

    def __init__(self) -> None:
        self.found: dict[nn.Module, ActivationQuantizer] = {}

    def input(self, node: fx.Node, /) -> _Value:
        return None

    def quantize(self, x: _Value, quantizer: ActivationQuantizer, name: str, /) -> _Value:
        return quantizer

    def weight(self, x: _Value, layer: nn.Module, name: str, /) -> _Value:
        if x is not None and is_weight_layer(layer):
            self.found[layer] = x
        return None

    def activation(self, x: _Value, node: NodeInfo, name: str, quantizer: ActivationQuantizer | None, /) -> _Value:
        return x  # a clamp keeps a grid's scale (and an accumulator stays one)

    def add(self, a: _Value, b: _Value, name: str, /) -> _Value:
        return None

    def pool(self, x: _Value, node: NodeInfo, name: str, shape: torch.Size | None, /) -> _Value:
        return None

    def passthrough(self, x: _Value, ops: tuple[Op, ...], name: str, /) -> _Value:
        return x

    def output(self, x: _Value, /) -> None:
        return None


def bind_bias_grids(model: nn.Module) -> int:
    """Bind every quantized weight layer of the converted ``model`` to its input's quantizer; returns how many.

    Layers whose input no quantizer holds (a float input) stay unbound and keep their float bias.

    Raises:
        BitsweepError: when the model's graph cannot be traced or walked (the integer lowering would
            refuse it too), naming the node.
    """
    graph = trace(model, "bias rounding")
    assert graph is not None
    emitter = _InputGrids()
    walk(classify(model, graph), emitter)
    for m in model.modules():
        if is_weight_layer(m):
            m.bind_bias_grid(emitter.found.get(m))
    return len(emitter.found)


__all__ = ["bind_bias_grids"]
