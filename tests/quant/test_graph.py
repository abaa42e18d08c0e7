"""The graph classifier: each kind, on modules and on their functional forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.models.mobilenetv2 import Add
from bitsweep.quant import QuantConfig, calibrate, convert, quantize_
from bitsweep.quant.graph import GraphInfo, NodeInfo, Pool, clamp_bounds, classify, trace


class _Fn(nn.Module):
    """conv -> ``body`` -> output, so the node under test sits between a weight layer and the output."""

    def __init__(self, body) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


def _info(model: nn.Module) -> GraphInfo:
    graph = trace(model)
    assert graph is not None
    return classify(model, graph)


def _middle(body) -> NodeInfo:  # type: ignore[no-untyped-def]
    """The classification of the single op ``body`` applies after the conv."""
    info = _info(_Fn(body))
    nodes = [n for n in info.graph.nodes if n.op not in ("placeholder", "output") and n.target != "conv"]
    return info.nodes[nodes[-1]]


def test_input_weight_output() -> None:
    info = _info(_Fn(nn.Identity()))
    kinds = [info.kind(n) for n in info.graph.nodes]
    assert kinds == ["input", "weight", "passthrough", "output"]


@pytest.mark.parametrize(
    ("body", "bounds"),
    [
        (nn.ReLU(), (0.0, math.inf)),
        (nn.ReLU6(), (0.0, 6.0)),
        (nn.Hardtanh(-2.0, 3.0), (-2.0, 3.0)),
        (F.relu, (0.0, math.inf)),
        (F.relu6, (0.0, 6.0)),
        (lambda x: torch.clamp(x, min=-1.0), (-1.0, math.inf)),
        (lambda x: x.clamp(0, 6), (0.0, 6.0)),
        (nn.SiLU(), None),
        (nn.Hardswish(), None),
        (torch.sigmoid, None),
    ],
)
def test_activations_and_their_clamp_bounds(body, bounds) -> None:  # type: ignore[no-untyped-def]
    n = _middle(body)
    assert n.kind == "activation" and n.clamp == bounds


def test_clamp_bounds_by_behaviour_not_class() -> None:
    class MyReLU6(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.minimum(torch.maximum(x, torch.zeros(())), torch.full((), 6.0))

    assert clamp_bounds(MyReLU6()) == (0.0, 6.0)
    assert clamp_bounds(nn.Identity()) is None  # the identity is a passthrough, not a clamp
    assert clamp_bounds(nn.LeakyReLU()) is None
    assert clamp_bounds(nn.BatchNorm1d(1)) is None  # has buffers


class _Two(nn.Module):
    def __init__(self, op) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.a(x), self.b(x))


@pytest.mark.parametrize(
    ("op", "kind"),
    [(Add(), "add"), (operator_add := (lambda a, b: a + b), "add"), (torch.add, "add"), (torch.mul, "other"),
     (lambda a, b: torch.add(a, b, alpha=2), "other"), (torch.sub, "other")],
)  # fmt: skip
def test_add_is_recognised_by_behaviour(op, kind: str) -> None:  # type: ignore[no-untyped-def]
    info = _info(_Two(op))
    last = list(info.graph.nodes)[-2]
    assert info.kind(last) == kind
    if kind == "add":
        assert len(info.nodes[last].inputs) == 2


@pytest.mark.parametrize(
    ("body", "pool"),
    [
        (nn.AdaptiveAvgPool2d(1), Pool(output_size=(1, 1))),
        (nn.AdaptiveAvgPool2d((2, 2)), Pool(output_size=(2, 2))),
        (nn.AvgPool2d(2), Pool(kernel=(2, 2), stride=(2, 2))),
        (lambda x: F.adaptive_avg_pool2d(x, 1), Pool(output_size=(1, 1))),
        (lambda x: F.avg_pool2d(x, 2, 1), Pool(kernel=(2, 2), stride=(1, 1))),
        (lambda x: x.mean((2, 3)), Pool(output_size=(1, 1), keepdim=False)),
        (lambda x: x.mean(dim=(-2, -1), keepdim=True), Pool(output_size=(1, 1))),
        (lambda x: torch.mean(x, [2, 3]), Pool(output_size=(1, 1), keepdim=False)),
        (nn.AvgPool2d(3, padding=1), None),  # padded windows: no plain window sum
        (lambda x: x.mean(1), None),  # a channel mean is not spatial pooling
    ],
)
def test_pools_say_what_they_average(body, pool: Pool | None) -> None:  # type: ignore[no-untyped-def]
    n = _middle(body)
    assert n.kind == "pool" and n.pool == pool


@pytest.mark.parametrize(
    ("body", "ops"),
    [
        (nn.Identity(), ()),
        (nn.Dropout(0.5), ()),
        (lambda x: F.dropout(x, 0.5, False), ()),
        (nn.Flatten(), (("flatten", 1, -1),)),
        (lambda x: torch.flatten(x, 1), (("flatten", 1, -1),)),
        (lambda x: x.flatten(1), (("method", "flatten", (1,)),)),
        (lambda x: x.flatten(start_dim=1), (("flatten", 1, -1),)),
        (lambda x: x.reshape(-1, 2), (("method", "reshape", (-1, 2)),)),
        (lambda x: torch.reshape(x, (-1, 2)), (("method", "reshape", ((-1, 2),)),)),
        (nn.MaxPool2d(2), (("maxpool", 2, 2, 0, 1, False),)),
        (lambda x: F.max_pool2d(x, 2), (("maxpool", 2, 2, 0, 1, False),)),
        (lambda x: x[:, :1], None),  # slicing keeps values but has no plain-data form here
    ],
)
def test_passthrough_ops_are_plain_data(body, ops) -> None:  # type: ignore[no-untyped-def]
    n = _middle(body)
    assert n.kind == "passthrough" and n.ops == ops


def test_custom_passthrough_module_is_a_leaf_with_its_ops() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.contiguous().flatten(1)

    n = _middle(Flat())
    assert n.kind == "passthrough" and n.module is not None
    assert n.ops == (("method", "contiguous", ()), ("method", "flatten", (1,)))


def test_shape_computations_are_not_tensors() -> None:
    info = _info(_Fn(lambda x: x.view(x.size(0), -1)))
    size = next(n for n in info.graph.nodes if n.target == "size")
    view = next(n for n in info.graph.nodes if n.target == "view")
    assert not info.is_tensor(size) and info.kind(view) == "other"


def test_converted_model_classifies_quantizers_and_wrappers() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    quantize_(model.eval(), QuantConfig.from_bits(8, 8))
    calibrate(model, [torch.randn(2, 1, 6, 6)], 1)
    info = _info(convert(model))
    kinds = [info.kind(n) for n in info.graph.nodes]
    assert kinds == ["input", "weight", "activation", "pool", "passthrough", "weight", "output"]
    relu = info.nodes[list(info.graph.nodes)[2]]
    assert relu.clamp == (0.0, 6.0) and relu.module is model[1]  # the wrapper, which holds the quantizer


def test_rewritten_forward_is_traced_as_rewritten() -> None:
    model = _Fn(F.relu6).eval()
    quantize_(model, QuantConfig.from_bits(8, 8))
    info = _info(model)
    assert "quantizer" in [info.kind(n) for n in info.graph.nodes]  # the inserted functional-site quantizers


def test_untraceable_model_gives_none_or_one_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    assert trace(Branchy()) is None
    with pytest.raises(BitsweepError, match="cannot trace Branchy for testing"):
        trace(Branchy(), "testing")
