"""Finding the places an integer deployment holds an activation, by behaviour.

The model is traced with torch.fx (standard ``torch.nn`` modules and
parameter-free custom modules such as MobileNet-v2's ``Add`` stay leaves).
Each node is classified by what it does, not by its class name:

* ``activation`` - a parameter-free module or function whose output is elementwise
  in its input and not the identity (ReLU, ReLU6, Hardswish, SiLU, LeakyReLU,
  ``F.relu``, ``torch.clamp``, ...). Checked by probing with a random tensor and
  a permutation of it.
* ``add`` - computes ``a + b`` of two tensors (an ``Add`` module, ``+``, ``torch.add``).
* ``pool`` - average pooling (modules and functions) and ``mean``.
* ``passthrough`` - outputs only values of its input (Identity, Dropout in eval,
  Flatten, reshape, MaxPool): a quantized input stays on its grid.
* ``weight`` - Conv2d / Linear.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

POOL_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d
)  # fmt: skip
POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean)
NON_TENSOR = (getattr, len, operator.getitem)  # getitem on a tuple of sizes; tensors are re-checked below
NON_TENSOR_METHODS = ("size", "dim", "numel", "tolist", "item")
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if m.__module__.startswith("torch.nn") or m.__module__.startswith("bitsweep.quant"):
            return True
        return not list(m.children()) and not list(m.parameters()) and not list(m.buffers())


def trace(model: nn.Module) -> fx.Graph | None:
    """The fx graph of ``model`` with leaf modules kept whole, or None if it cannot be traced."""
    try:
        return _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - dynamic control flow etc.: the caller falls back to module order
        return None


def _probe_unary(f) -> str:  # type: ignore[no-untyped-def]
    """Classify a one-tensor function by what it does to a random (2, 3, 5, 5) tensor."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=g) * 3
    perm = torch.randperm(x.numel(), generator=g)
    try:
        with torch.no_grad():
            y = f(x.clone())
            yp = f(x.reshape(-1)[perm].reshape(x.shape).clone())
    except Exception:  # noqa: BLE001 - a function that needs other shapes is simply not one we recognise
        return "other"
    if not isinstance(y, torch.Tensor) or not isinstance(yp, torch.Tensor):
        return "other"
    if y.shape == x.shape and torch.equal(y, x):
        return "passthrough"
    if y.shape == x.shape and torch.allclose(yp.reshape(-1), y.reshape(-1)[perm]) and torch.isfinite(y).all():
        return "activation"
    if y.numel() > 0 and torch.isin(y, x).all():
        return "passthrough"
    return "other"


def _probe_binary(f) -> bool:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    try:
        with torch.no_grad():
            out = f(a.clone(), b.clone())
    except Exception:  # noqa: BLE001
        return False
    return isinstance(out, torch.Tensor) and out.shape == a.shape and torch.allclose(out, a + b)


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


@dataclass
class GraphInfo:
    """Classified nodes of a traced model: ``kind[node]`` and which nodes produce tensors."""

    graph: fx.Graph
    kind: dict[fx.Node, str] = field(default_factory=dict)
    tensor: dict[fx.Node, bool] = field(default_factory=dict)


def classify(model: nn.Module, graph: fx.Graph) -> GraphInfo:
    """Classify every node of ``graph`` (see the module docstring for the kinds)."""
    mods = dict(model.named_modules())
    info = GraphInfo(graph)
    for node in graph.nodes:
        args = _node_args(node)
        is_tensor = node.op in ("placeholder", "call_module") or (
            node.op in ("call_function", "call_method") and any(info.tensor.get(a, False) for a in args)
        )
        if node.op == "call_function" and node.target in NON_TENSOR and node.target is not operator.getitem:
            is_tensor = False
        if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
            is_tensor = False
        info.tensor[node] = is_tensor
        kind = "other"
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "call_module":
            m = mods[str(node.target)]
            kind = _module_kind(m, len(args))
        elif node.op in ("call_function", "call_method") and is_tensor:
            kind = _function_kind(node, args, info)
        info.kind[node] = kind
    return info


def _module_kind(m: nn.Module, n_args: int) -> str:
    if isinstance(m, WEIGHT_TYPES):
        return "weight"
    if isinstance(m, POOL_MODULES):
        return "pool"
    if list(m.parameters()) or list(m.buffers()):
        return "other"
    was_training = m.training
    m.eval()
    try:
        if n_args == 2:
            return "add" if _probe_binary(m) else "other"
        return _probe_unary(m) if n_args == 1 else "other"
    finally:
        m.train(was_training)


def _function_kind(node: fx.Node, args: list[fx.Node], info: GraphInfo) -> str:
    tensor_args = [a for a in args if info.tensor.get(a, False)]
    if node.op == "call_function" and node.target in POOL_FUNCTIONS or node.target == "mean":
        return "pool"
    consts = node.args[1:]

    def call(*xs: torch.Tensor):  # type: ignore[no-untyped-def]
        it = iter(xs)
        real = fx.node.map_arg(node.args, lambda n: next(it))
        kw = fx.node.map_arg(node.kwargs, lambda n: next(it))
        if node.op == "call_method":
            return getattr(real[0], str(node.target))(*real[1:], **kw)
        return node.target(*real, **kw)  # type: ignore[operator]

    if len(args) == 2 and len(tensor_args) == 2:
        return "add" if _probe_binary(call) else "other"
    if len(args) == 1 and len(tensor_args) == 1 and node.args and node.args[0] is args[0]:
        del consts
        return _probe_unary(call)
    return "other"
