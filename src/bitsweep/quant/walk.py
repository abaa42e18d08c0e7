"""Walking a converted model's classified graph once, for every backend that rewrites it.

The integer lowering (:mod:`bitsweep.backend.lowering`) and the ONNX exporter
(:mod:`bitsweep.export.onnx`) write the same model in two forms. What a node
is, which quantizers surround it and in which order they apply is decided
here, by the classifier's kinds (:mod:`bitsweep.quant.graph`); a backend only
says how to write each kind (an :class:`Emitter`).

Order, for every node: a quantized layer's or wrapper's input quantizers, the
op itself, then its output quantizer. ``name`` is the module path for module
calls and the fx node name otherwise (the ONNX exporter names nodes by it).
"""

from __future__ import annotations

from typing import Protocol, TypeVar, cast

import torch
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.graph import GraphInfo, NodeInfo, Op, is_quantized_wrapper
from bitsweep.quant.modules import ActivationQuantizer

V = TypeVar("V")


class Emitter(Protocol[V]):
    """How one backend writes each kind of node; ``V`` is its value type (a value name, an ONNX tensor name).

    :func:`walk` passes every argument by position, so each backend may name its parameters as it likes.
    """

    purpose: str  # names the backend in errors: "the integer lowering", "ONNX export"

    def input(self, node: fx.Node, /) -> V: ...

    def quantize(self, x: V, quantizer: ActivationQuantizer, name: str, /) -> V: ...

    def weight(self, x: V, layer: nn.Module, name: str, /) -> V: ...

    def activation(self, x: V, node: NodeInfo, name: str, quantizer: ActivationQuantizer | None, /) -> V:
        """``quantizer``: the wrapper's output quantizer that follows at once, if any."""
        ...

    def add(self, a: V, b: V, name: str, /) -> V: ...

    def pool(self, x: V, node: NodeInfo, name: str, shape: torch.Size | None, /) -> V:
        """``shape``: the input's shape when the caller propagated shapes."""
        ...

    def passthrough(self, x: V, ops: tuple[Op, ...], name: str, /) -> V: ...

    def output(self, x: V, /) -> None: ...


def describe(node: fx.Node, info: NodeInfo) -> str:
    """A node in an error message: the module class and path, or the function or method name."""
    if info.module is not None:
        inner = getattr(info.module, "module", info.module) if is_quantized_wrapper(info.module) else info.module
        return f"module {type(inner).__name__} ('{node.target}')"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def walk(info: GraphInfo, emitter: Emitter[V], shapes: dict[str, torch.Size] | None = None) -> None:
    """Call ``emitter`` for every node of ``info`` in execution order.

    Raises:
        BitsweepError: at the first node the emitter's backend has no form for, naming it.
    """
    env: dict[fx.Node, V] = {}
    for node in info.graph.nodes:
        n = info.nodes[node]
        if n.kind == "input":
            env[node] = emitter.input(node)
            continue
        if n.kind == "output":
            emitter.output(env[n.inputs[0]])
            return
        if not n.tensor:
            raise BitsweepError(f"{emitter.purpose} does not support {describe(node, n)} (a shape computation)")
        xs = [env[a] for a in n.inputs]
        name = str(node.target) if node.op == "call_module" else node.name
        m = n.module
        wrapper = m if m is not None and is_quantized_wrapper(m) else None
        if wrapper is not None and wrapper.input_quantizers is not None:
            in_qs = wrapper.input_quantizers  # an nn.Identity stands for "no quantizer on this input"
            qs = [None if isinstance(q, nn.Identity) else cast(ActivationQuantizer, q) for q in in_qs]
            xs = [x if q is None else emitter.quantize(x, q, f"{name}_in{i}")
                  for i, (x, q) in enumerate(zip(xs, qs, strict=False))]  # fmt: skip
        out_q = wrapper.output_quantizer if wrapper is not None else None
        if n.kind == "weight" and m is not None:
            x = xs[0]
            in_q = getattr(m, "input_quantizer", None)
            if in_q is not None:
                x = emitter.quantize(x, in_q, name + "_in")
            y = emitter.weight(x, m, name)
            out_q = getattr(m, "output_quantizer", None)
        elif n.kind == "quantizer" and m is not None:
            y = emitter.quantize(xs[0], cast(ActivationQuantizer, m), name)  # classify: an activation quantizer
        elif n.kind == "activation" and len(xs) == 1:
            y = emitter.activation(xs[0], n, name, out_q)
        elif n.kind == "add" and len(xs) == 2:
            y = emitter.add(xs[0], xs[1], name)
        elif n.kind == "pool" and len(xs) == 1:
            y = emitter.pool(xs[0], n, name, (shapes or {}).get(node.name))
        elif n.kind == "passthrough" and n.ops is not None and len(xs) == 1:
            y = emitter.passthrough(xs[0], n.ops, name)
        else:
            raise BitsweepError(f"{emitter.purpose} does not support {describe(node, n)}")
        env[node] = emitter.quantize(y, out_q, name + "_out") if out_q is not None else y
    raise BitsweepError("the model graph has no output")
