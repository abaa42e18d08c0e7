"""The one tracer and graph classifier every part of bitsweep reads a model through.

Quantizer placement, BatchNorm folding, the integer lowering, activation
memory and the ONNX exporter all need the same answer to "what does this
node do?", so it is computed here once. :func:`trace` traces with torch.fx
(standard ``torch.nn`` modules, quantized layers, quantizers and
parameter-free custom modules such as MobileNet-v2's ``Add`` stay leaves; a
forward rewritten by ``quantize_`` is traced as rewritten). :func:`classify`
gives each node a :class:`NodeInfo` whose ``kind`` is found by behaviour, not
by class name:

* ``input`` / ``output`` - the graph's placeholder and output.
* ``weight`` - Conv2d / Linear (quantized or not).
* ``quantizer`` - an activation quantizer of a prepared or converted model.
* ``activation`` - a parameter-free module or function whose output is elementwise
  in its input and not the identity (ReLU, ReLU6, Hardswish, ``F.relu6``,
  ``torch.clamp``, ...), found by probing with a random tensor and a permutation
  of it; ``clamp`` holds ``(a, b)`` when it computes ``clamp(x, a, b)`` exactly.
* ``add`` - computes ``a + b`` of two tensors (an ``Add`` module, ``+``, ``torch.add``).
* ``pool`` - average pooling (modules, functions, ``mean``); ``pool`` says which.
* ``passthrough`` - outputs only values of its input (Identity, Dropout in eval,
  Flatten, reshape, MaxPool): a quantized input stays on its grid; ``ops`` says
  how, as plain data the integer program can store.
* ``other`` - anything else.

A ``QuantOutput`` wrapper is classified as the module it wraps (``module`` stays
the wrapper, so callers find its quantizers).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.inspect import is_activation_quantizer, is_weight_layer

if TYPE_CHECKING:  # for the type guard only: modules imports this module
    from bitsweep.quant.output import QuantOutput

POOL_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d
)  # fmt: skip
POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean)
NON_TENSOR = (getattr, len, operator.getitem)  # getitem on a tuple of sizes; tensors are re-checked below
NON_TENSOR_METHODS = ("size", "dim", "numel", "tolist", "item")
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
# Tensor methods (and their torch.* functions) that only move values; anything that may change dtype is left out.
SHAPE_METHODS = ("flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "permute", "transpose", "clone")
Op = tuple[Any, ...]  # a plain-data passthrough op, see bitsweep.backend.program.apply_op


def is_quantized_wrapper(module: nn.Module) -> TypeGuard[QuantOutput]:
    """True for a ``QuantOutput``-like wrapper: an inner ``module`` plus its ``output_quantizer``."""
    return hasattr(module, "module") and hasattr(module, "output_quantizer") and not is_weight_layer(module)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if is_weight_layer(m) or is_activation_quantizer(m) or is_quantized_wrapper(m):
            return True
        if m.__module__.startswith(("torch.nn", "torch.ao.nn", "bitsweep.quant")):
            return True
        return not list(m.children()) and not list(m.parameters()) and not list(m.buffers())


def traced_root(model: nn.Module) -> nn.Module:
    """The module whose forward :func:`trace` traces: the rewritten forward ``quantize_`` bound, if any."""
    owner = getattr(model.forward, "__self__", None)
    return owner if isinstance(owner, fx.GraphModule) and owner is not model else model


def trace(model: nn.Module, purpose: str | None = None) -> fx.Graph | None:
    """The fx graph of ``model`` with leaf modules kept whole.

    Args:
        model: any module; a forward rewritten by ``quantize_`` (functional ops) is traced as rewritten.
        purpose: for an untraceable model, None returns None (the caller falls back to module
            order); a string raises a one-line :class:`BitsweepError` naming it.
    """
    try:
        return _Tracer().trace(traced_root(model))
    except Exception as e:  # noqa: BLE001 - fx raises many types (dynamic control flow etc.)
        if purpose is None:
            return None
        raise BitsweepError(f"cannot trace {type(model).__name__} for {purpose}: {e}") from None


@dataclass(frozen=True)
class Pool:
    """What an average pooling node averages over.

    ``output_size`` (adaptive pooling; ``(1, 1)`` is a global mean) is resolved from the
    input size by the caller; otherwise ``kernel``/``stride`` give a window without padding.
    """

    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    keepdim: bool = True  # False: the spatial dims are dropped, (N, C, H, W) -> (N, C)


@dataclass(frozen=True)
class NodeInfo:
    """What one node does (see the module docstring for the kinds)."""

    kind: str
    tensor: bool  # the node produces a tensor (not a size or an attribute)
    inputs: tuple[fx.Node, ...] = ()  # tensor-producing arguments, in order
    module: nn.Module | None = None  # the called module (a wrapper stays the wrapper)
    clamp: tuple[float, float] | None = None  # activation: computes clamp(x, a, b) exactly
    pool: Pool | None = None  # pool: what it averages; None when not expressible as a window
    ops: tuple[Op, ...] | None = None  # passthrough: plain-data ops (empty: identity); None when unknown


@dataclass
class GraphInfo:
    """Classified nodes of a traced model."""

    graph: fx.Graph
    nodes: dict[fx.Node, NodeInfo]

    def kind(self, node: fx.Node) -> str:
        """The node's kind, ``other`` for nodes not in the graph."""
        info = self.nodes.get(node)
        return info.kind if info is not None else "other"

    def is_tensor(self, node: fx.Node) -> bool:
        """Whether the node produces a tensor."""
        info = self.nodes.get(node)
        return info is not None and info.tensor


def _probe_unary(f: Callable[[torch.Tensor], Any]) -> str:
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


def _probe_binary(f: Callable[[torch.Tensor, torch.Tensor], Any]) -> bool:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    try:
        with torch.no_grad():
            out = f(a.clone(), b.clone())
    except Exception:  # noqa: BLE001
        return False
    return isinstance(out, torch.Tensor) and out.shape == a.shape and torch.allclose(out, a + b)


@torch.no_grad()
def clamp_bounds(f: Callable[[torch.Tensor], Any]) -> tuple[float, float] | None:
    """``(a, b)`` if ``f(x) == clamp(x, a, b)`` for every probe value, else None (``a``/``b`` may be infinite).

    The one clamp detector (ReLU, ReLU6, Hardtanh, ``F.relu6``, ``x.clamp(0, 6)``, ...): by
    behaviour on values from -1e4 to 1e4 and at +-inf, never by class. Modules are probed
    in eval mode; a module with parameters or buffers is not a clamp.
    """
    if isinstance(f, nn.Module):
        if _has_state(f):
            return None
        was_training = f.training
        f.eval()
        try:
            return clamp_bounds(f.forward)
        finally:
            f.train(was_training)
    x = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.linspace(-20, 20, 4001)])
    try:
        y = f(x.clone())
        ends = f(torch.tensor([-math.inf, math.inf]))
    except Exception:  # noqa: BLE001 - not an elementwise activation of a 1-d tensor
        return None
    if not isinstance(y, torch.Tensor) or not isinstance(ends, torch.Tensor) or y.shape != x.shape:
        return None
    if ends.shape != (2,) or torch.isnan(ends).any():
        return None
    a, b = float(ends[0]), float(ends[1])
    if not a < b or (math.isinf(a) and math.isinf(b)):
        return None
    return (a, b) if torch.equal(y, x.clamp(a, b)) else None


def _has_state(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None or next(m.buffers(), None) is not None


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)  # type: ignore[func-returns-value]
    return found


def _caller(node: fx.Node) -> Callable[..., Any]:
    """``node``'s function with its tensor arguments replaced by the given tensors, in order."""

    def call(*xs: torch.Tensor) -> Any:
        it = iter(xs)
        real = fx.node.map_arg(node.args, lambda n: next(it))
        kw = fx.node.map_arg(node.kwargs, lambda n: next(it))
        if node.op == "call_method":
            return getattr(real[0], str(node.target))(*real[1:], **kw)
        return node.target(*real, **kw)  # type: ignore[operator]

    return call


def classify(model: nn.Module, graph: fx.Graph) -> GraphInfo:
    """Classify every node of ``graph``, traced from ``model`` by :func:`trace`."""
    mods = dict(traced_root(model).named_modules())
    info = GraphInfo(graph, {})
    for node in graph.nodes:
        args = _node_args(node)
        is_tensor = node.op in ("placeholder", "call_module") or (
            node.op in ("call_function", "call_method") and any(info.is_tensor(a) for a in args)
        )
        if node.op == "call_function" and node.target in NON_TENSOR and node.target is not operator.getitem:
            is_tensor = False
        if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
            is_tensor = False
        inputs = tuple(a for a in args if info.is_tensor(a))
        module = mods[str(node.target)] if node.op == "call_module" else None
        kind = "other"
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "output":
            kind = "output"
        elif module is not None:
            kind = module_kind(module, len(args))
        elif node.op in ("call_function", "call_method") and is_tensor:
            kind = _function_kind(node, args, inputs)
        info.nodes[node] = _details(node, kind, is_tensor, inputs, module)
    return info


def module_kind(m: nn.Module, n_args: int | None = None) -> str:
    """The kind of a module called with ``n_args`` tensors (None: one, else two if one says ``other``)."""
    if n_args is None:
        one = module_kind(m, 1)
        return module_kind(m, 2) if one == "other" else one
    if isinstance(m, WEIGHT_TYPES):
        return "weight"
    if isinstance(m, POOL_MODULES):
        return "pool"
    if is_activation_quantizer(m):
        return "quantizer"
    if is_quantized_wrapper(m):
        return module_kind(m.module, n_args)
    if _has_state(m):
        return "other"
    was_training = m.training
    m.eval()
    try:
        if n_args == 2:
            return "add" if _probe_binary(m) else "other"
        return _probe_unary(m) if n_args == 1 else "other"
    finally:
        m.train(was_training)


def _function_kind(node: fx.Node, args: list[fx.Node], tensor_args: tuple[fx.Node, ...]) -> str:
    if node.op == "call_function" and node.target in POOL_FUNCTIONS or node.target == "mean":
        return "pool"
    call = _caller(node)
    if len(args) == 2 and len(tensor_args) == 2:
        return "add" if _probe_binary(call) else "other"
    if len(args) == 1 and len(tensor_args) == 1 and node.args and node.args[0] is args[0]:
        return _probe_unary(call)
    return "other"


def _details(node: fx.Node, kind: str, tensor: bool, inputs: tuple[fx.Node, ...], module: nn.Module | None) -> NodeInfo:
    inner: nn.Module | None = module
    if module is not None and is_quantized_wrapper(module):
        inner = module.module
    if kind == "activation":
        bounds = clamp_bounds(inner if inner is not None else _caller(node))
        return NodeInfo(kind, tensor, inputs, module, clamp=bounds)
    if kind == "pool":
        return NodeInfo(kind, tensor, inputs, module, pool=_pool(node, inner))
    if kind == "passthrough":
        return NodeInfo(kind, tensor, inputs, module, ops=_passthrough_ops(node, inner))
    return NodeInfo(kind, tensor, inputs, module)


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    """Argument ``i`` (or keyword ``name``) of a call node."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _window(kernel: Any, stride: Any, padding: Any, ceil_mode: Any, divisor: Any) -> Pool | None:
    k, p = _pair(kernel), _pair(padding)
    s = _pair(stride) if stride is not None else k
    if k is None or s is None or p != (0, 0) or ceil_mode or divisor is not None:
        return None
    return Pool(kernel=k, stride=s)


def _pool(node: fx.Node, m: nn.Module | None) -> Pool | None:
    """The window of a 2-d average pooling node, or None (1-d/3-d, padding, ceil mode, other dims)."""
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = _pair(m.output_size)
        return Pool(output_size=size) if size is not None else None
    if isinstance(m, nn.AvgPool2d):
        return _window(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.divisor_override)
    if node.target is F.adaptive_avg_pool2d:
        size = _pair(_arg(node, 1, "output_size", None))
        return Pool(output_size=size) if size is not None else None
    if node.target is F.avg_pool2d:
        return _window(
            _arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0),
            _arg(node, 4, "ceil_mode", False), _arg(node, 6, "divisor_override", None),
        )  # fmt: skip
    if node.target is torch.mean or node.target == "mean":
        dims = _arg(node, 1, "dim", None)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or len(node.args) > 3:
            return None
        if sorted(d % 4 for d in dims) != [2, 3]:  # the spatial dims of (N, C, H, W)
            return None
        return Pool(output_size=(1, 1), keepdim=bool(_arg(node, 2, "keepdim", False)))
    return None


def _constant(v: Any) -> bool:
    return not isinstance(v, fx.Node) and not (isinstance(v, (tuple, list)) and any(isinstance(i, fx.Node) for i in v))


def _passthrough_ops(node: fx.Node, m: nn.Module | None) -> tuple[Op, ...] | None:
    """How a passthrough node moves its input's values, as plain data; None when it has no such form."""
    if m is not None:
        if isinstance(m, (nn.Identity, *DROPOUT_MODULES)):
            return ()
        if isinstance(m, nn.Flatten):
            return (("flatten", m.start_dim, m.end_dim),)
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return (("maxpool", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode),)
        return _submodule_ops(m)
    rest = node.args[1:]
    if not all(_constant(a) for a in (*rest, *node.kwargs.values())):
        return None
    if node.target in DROPOUT_FUNCTIONS:
        return ()
    if node.target is torch.flatten or (node.target == "flatten" and node.kwargs):
        return (("flatten", _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)),)
    if node.target is F.max_pool2d and not _arg(node, 6, "return_indices", False):
        kernel = _arg(node, 1, "kernel_size", None)
        stride = _arg(node, 2, "stride", None)
        return (("maxpool", kernel, kernel if stride in (None, ()) else stride, _arg(node, 3, "padding", 0),
                 _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False)),)  # fmt: skip
    if node.kwargs:
        return None
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return (("method", str(node.target), tuple(rest)),)
    name = getattr(node.target, "__name__", "")
    if node.op == "call_function" and name in SHAPE_METHODS and getattr(torch, name, None) is node.target:
        return (("method", name, tuple(rest)),)
    return None


def _submodule_ops(m: nn.Module) -> tuple[Op, ...] | None:
    """The ops of a parameter-free custom module whose forward is a chain of passthrough ops."""
    graph = trace(m)
    if graph is None:
        return None
    info = classify(m, graph)
    ops: list[Op] = []
    current: fx.Node | None = None
    for node in graph.nodes:
        n = info.nodes[node]
        if n.kind == "input" and current is None:
            current = node
        elif n.kind == "output":
            return tuple(ops) if n.inputs == (current,) else None
        elif n.kind == "passthrough" and n.ops is not None and n.inputs == (current,):
            ops.extend(n.ops)
            current = node
        else:
            return None
    return None
