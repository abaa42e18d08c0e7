"""The ONNX graph plumbing both exporters share: unique names, initializers, nodes, value-preserving ops.

The QDQ exporter (:mod:`bitsweep.export.onnx`) and the QOperator exporter
(:mod:`bitsweep.export.onnx_qop`) differ in what they emit for convolutions,
activations and adds, not in how a node is named or how a flatten, reshape or
max pooling is written; those live here once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitsweep.errors import BitsweepError


def import_onnx() -> Any:
    """The ``onnx`` module, or one clear error saying how to install it (it is an optional dependency)."""
    try:
        import onnx
    except ImportError:
        raise BitsweepError("ONNX export needs the onnx package: pip install 'bitsweep[onnx]'") from None
    return onnx


class GraphBuilder:
    """Accumulates nodes and initializers with unique names derived from module names.

    ``purpose`` names the exporter in error messages.
    """

    purpose = "ONNX export"

    def __init__(self) -> None:
        self.onnx = import_onnx()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base.replace('.', '_').replace('#', '_')}_{self.count}"

    def const(self, base: str, array: Any) -> str:
        n = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.array(array, order="C"), n))  # 0-d stays 0-d
        return n

    def op(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs: Any) -> str:
        out = self.name(base)
        node = self.onnx.helper.make_node(op_type, inputs, [out], name=out + "_op", domain=domain or None, **attrs)
        self.nodes.append(node)
        return out

    def value_op(self, x: str, op: tuple[Any, ...], base: str) -> str:
        """A value-preserving op (``Apply`` data: flatten, view/reshape, contiguous, max pooling) on ``x``."""
        kind, args = op[0], op[1:]
        if kind == "method":
            name, margs = op[1], tuple(op[2])
            if name in ("contiguous", "clone"):
                return x
            if name == "flatten":
                kind, args = "flatten", (margs + (0, -1)[len(margs) :])[:2]
            elif name in ("view", "reshape"):
                shape = margs[0] if len(margs) == 1 and isinstance(margs[0], (tuple, list)) else margs
                return self.op("Reshape", [x, self.const(base + "_shape", np.array(shape, np.int64))], base)
        if kind == "flatten" and args[1] == -1:
            return self.op("Flatten", [x], base, axis=int(args[0]))
        if kind == "maxpool":
            k, s, p, d = ((v, v) if isinstance(v, int) else tuple(v) for v in args[:4])
            extra: dict[str, Any] = {}
            if tuple(d) != (1, 1):
                extra["dilations"] = list(d)
            if args[4]:
                extra["ceil_mode"] = 1
            return self.op("MaxPool", [x], base, kernel_shape=list(k), strides=list(s), pads=[*p, *p], **extra)
        raise BitsweepError(f"{self.purpose} does not support {op} ('{base}')")
