"""ONNX export of a converted model as QDQ (QuantizeLinear/DequantizeLinear), checked in onnxruntime.

The graph is written node by node from the model's fx graph (not through
``torch.onnx``), so every quantizer becomes exactly one Q/DQ pair with our
scale and zero-point, and nothing depends on exporter heuristics.

* Weights are stored as integer initializers (int8/uint8 up to 8 bits,
  int16/uint16 above) holding the already-clamped integers, followed by a
  per-channel ``DequantizeLinear`` (axis 0). The file holds the integers, not floats.
* Activations: ``QuantizeLinear`` into the smallest container type; for widths
  below the container's (e.g. 4 bits in int8) the operator would saturate to
  the container range, so an integer ``Clip(qmin, qmax)`` sits between Q and
  DQ for <8 bits, and a float ``Clip`` on the grid's real bounds after DQ for
  9..15 bits. The graph computes exactly the simulated grid.
* ``int8=True`` additionally stores biases as int32 (scale ``s_x * s_w``) behind
  a ``DequantizeLinear``, the pattern onnxruntime fuses into integer kernels
  (QLinearConv, QLinearMatMul, QLinearAdd); it needs weights and activations of at most 8 bits.

One difference from the simulation remains: ONNX ``QuantizeLinear`` divides by
the scale while bitsweep multiplies by its float32 reciprocal, which rounds
differently on rare exact ties; :func:`check_onnx` measures the effect.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path
from bitsweep.quant.inspect import is_activation_quantizer, is_weight_layer
from bitsweep.backend.lowering import trace_quantized

OPSET = 21  # int16 QuantizeLinear/DequantizeLinear need opset 21


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise BitsweepError("ONNX export needs the onnx package: pip install 'bitsweep[onnx]'") from None
    return onnx


def _container(bits: int, signed: bool) -> tuple[Any, int]:
    """numpy dtype and width of the smallest ONNX integer type holding ``bits``."""
    if bits <= 8:
        return (np.int8 if signed else np.uint8), 8
    return (np.int16 if signed else np.uint16), 16


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, int8: bool) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.int8 = int8
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base.replace('.', '_')}_{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out + "_op", **attrs))
        return out

    def qdq(self, x: str, quantizer: nn.Module, base: str) -> str:
        """QuantizeLinear -> (Clip) -> DequantizeLinear with the quantizer's frozen qparams."""
        spec = quantizer.spec
        if spec.binary:
            raise BitsweepError("ONNX QDQ cannot express binary (1-bit signed) activations; use 2 or more bits")
        dtype, width = _container(spec.bits, spec.signed)
        scale = np.float32(quantizer.scale.item())
        zp = int(quantizer.zero_point.item())
        s, z = self.const(base + "_scale", np.array(scale, np.float32)), self.const(base + "_zp", np.array(zp, dtype))
        q = self.op("QuantizeLinear", [x, s, z], base + "_q")
        if spec.bits < width and width == 8:  # int Clip: the operator saturates to the container only
            q = self.op("Clip", [q, self.const(base + "_lo", np.array(spec.qmin, dtype)),
                                 self.const(base + "_hi", np.array(spec.qmax, dtype))], base + "_clip")  # fmt: skip
        dq = self.op("DequantizeLinear", [q, s, z], base + "_dq")
        if spec.bits < width and width == 16:  # float Clip on the grid's real bounds (exact: same float32 product)
            lo = np.float32(spec.qmin - zp) * scale
            hi = np.float32(spec.qmax - zp) * scale
            dq = self.op("Clip", [dq, self.const(base + "_flo", np.array(lo, np.float32)),
                                  self.const(base + "_fhi", np.array(hi, np.float32))], base + "_fclip")  # fmt: skip
        return dq

    def weight_layer(self, x: str, m: nn.Module, base: str, in_scale: float | None) -> str:
        wq = m.weight_quantizer
        spec = wq.spec
        q = wq.int_weight().detach().cpu().numpy()
        dtype, _ = _container(1 if spec.binary else spec.bits, spec.signed or spec.binary)
        if self.int8 and spec.bits > 8:
            raise BitsweepError(f"--int8 needs weights of at most 8 bits; layer '{base}' has {spec.bits}")
        c_out = q.shape[0]
        scale = wq.scale.detach().float().reshape(-1).expand(c_out).cpu().numpy().astype(np.float32)
        zp = wq.zero_point.detach().reshape(-1).expand(c_out).cpu().numpy().astype(dtype)
        w = self.op("DequantizeLinear", [self.const(base + "_wq", q.astype(dtype)), self.const(base + "_ws", scale),
                                         self.const(base + "_wzp", zp)], base + "_w", axis=0)  # fmt: skip
        inputs = [x, w]
        if m.bias is not None:
            bias = m.bias.detach().float().cpu().numpy()
            if self.int8:
                if in_scale is None:
                    raise BitsweepError(f"--int8 needs quantized inputs for layer '{base}'")
                bscale = (scale.astype(np.float64) * in_scale).astype(np.float32)
                bq = np.round(bias / bscale).astype(np.int32)
                inputs.append(self.op("DequantizeLinear", [self.const(base + "_bq", bq), self.const(base + "_bs", bscale),
                                      self.const(base + "_bzp", np.zeros(c_out, np.int32))], base + "_b", axis=0))  # fmt: skip
            else:
                inputs.append(self.const(base + "_b", bias))
        if isinstance(m, nn.Conv2d):
            ph, pw = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            return self.op("Conv", inputs, base, strides=list(m.stride), pads=[ph, pw, ph, pw],
                           dilations=list(m.dilation), group=m.groups, kernel_shape=list(m.kernel_size))  # fmt: skip
        return self.op("Gemm", inputs, base, transB=1)

    def float_layer(self, x: str, m: nn.Module, base: str) -> str:
        """A Conv2d/Linear left in floating point (FP32 reference exports, skipped layers)."""
        inputs = [x, self.const(base + "_w", m.weight.detach().float().cpu().numpy())]
        if m.bias is not None:
            inputs.append(self.const(base + "_b", m.bias.detach().float().cpu().numpy()))
        if isinstance(m, nn.Conv2d):
            ph, pw = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            return self.op("Conv", inputs, base, strides=list(m.stride), pads=[ph, pw, ph, pw],
                           dilations=list(m.dilation), group=m.groups, kernel_shape=list(m.kernel_size))  # fmt: skip
        return self.op("Gemm", inputs, base, transB=1)

    def plain(self, x: list[str], m: nn.Module, base: str) -> str:
        if type(m) in (nn.Conv2d, nn.Linear):
            if self.int8:
                raise BitsweepError(f"--int8 needs every layer quantized; '{base}' is floating point")
            return self.float_layer(x[0], m, base)
        if isinstance(m, nn.ReLU6):
            return self.op("Clip", [x[0], self.const("zero", np.array(0, np.float32)),
                                    self.const("six", np.array(6, np.float32))], base)  # fmt: skip
        if isinstance(m, nn.ReLU):
            return self.op("Relu", x[:1], base)
        if isinstance(m, nn.Hardtanh):
            return self.op("Clip", [x[0], self.const("lo", np.array(m.min_val, np.float32)),
                                    self.const("hi", np.array(m.max_val, np.float32))], base)  # fmt: skip
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return self.op("GlobalAveragePool", x[:1], base)
        if isinstance(m, nn.Flatten) and m.end_dim == -1:
            return self.op("Flatten", x[:1], base, axis=m.start_dim)
        if isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
            p = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
            return self.op("MaxPool", x[:1], base, kernel_shape=list(k), strides=list(s), pads=[*p, *p])
        if type(m).__name__ == "Add" and len(x) == 2:
            return self.op("Add", x, base)
        raise BitsweepError(f"ONNX export does not support {type(m).__name__} ('{base}')")


def _clamp_is_redundant(module: nn.Module, quantizer: nn.Module | None) -> bool:
    """True when a ReLU/ReLU6/Hardtanh before ``quantizer`` cannot change its output.

    If the grid's real range ``[(qmin - z) s, (qmax - z) s]`` lies inside the
    clamp's ``[lo, hi]``, QuantizeLinear's own saturation does the clamping, so
    dropping the op is exact - and it lets onnxruntime fuse Conv -> Q into QLinearConv.
    """
    if quantizer is None or quantizer.spec.binary or not isinstance(module, (nn.ReLU, nn.Hardtanh)):
        return False
    lo, hi = (0.0, float("inf")) if isinstance(module, nn.ReLU) else (float(module.min_val), float(module.max_val))
    s, z = np.float32(quantizer.scale.item()), int(quantizer.zero_point.item())
    spec = quantizer.spec
    return bool(np.float32(spec.qmin - z) * s >= lo and np.float32(spec.qmax - z) * s <= hi)


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], int8: bool = False) -> Path:
    """Write a converted quantized model as a QDQ ONNX file (atomically).

    A float model (BatchNorm folded, e.g. with ``bitsweep.quant.fold_batchnorm``)
    exports too, as the FP32 reference of the same graph.

    Args:
        model: a converted quantized model.
        path: destination ``.onnx`` file.
        input_shape: ``(C, H, W)``; the batch dimension is dynamic.
        int8: int32 biases behind DequantizeLinear so onnxruntime runs integer kernels (<= 8 bits only).

    Raises:
        BitsweepError: for a layer or width ONNX cannot express (named in the message).
    """
    b = _Builder(int8)
    onnx = b.onnx
    graph = trace_quantized(model, "ONNX export")
    mods = dict(model.named_modules())
    env: dict[fx.Node, str] = {}
    grid: dict[str, float] = {}  # tensor name -> activation scale, for int8 biases
    output = None
    for node in graph.nodes:
        a = [env[n] for n in node.args if isinstance(n, fx.Node)]
        base = str(node.target) if node.op == "call_module" else node.name
        if node.op == "placeholder":
            env[node] = "input"
        elif node.op == "call_module":
            m = mods[str(node.target)]
            if is_weight_layer(m):
                x = a[0]
                if m.input_quantizer is not None:
                    x = b.qdq(x, m.input_quantizer, base + "_in")
                    grid[x] = float(m.input_quantizer.scale)
                out = b.weight_layer(x, m, base, grid.get(x))
                if m.output_quantizer is not None:
                    out = b.qdq(out, m.output_quantizer, base + "_out")
                    grid[out] = float(m.output_quantizer.scale)
                env[node] = out
            elif is_activation_quantizer(m):
                env[node] = b.qdq(a[0], m, base)
                grid[env[node]] = float(m.scale)
            elif hasattr(m, "output_quantizer") and hasattr(m, "module"):
                xs = a
                if m.input_quantizers is not None:
                    xs = [x if isinstance(q, nn.Identity) else b.qdq(x, q, f"{base}_in{i}")
                          for i, (x, q) in enumerate(zip(a, m.input_quantizers))]  # fmt: skip
                out = xs[0] if _clamp_is_redundant(m.module, m.output_quantizer) else b.plain(xs, m.module, base)
                if m.output_quantizer is not None:
                    out = b.qdq(out, m.output_quantizer, base + "_out")
                    grid[out] = float(m.output_quantizer.scale)
                env[node] = out
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                env[node] = a[0]
                if a[0] in grid:
                    grid[env[node]] = grid[a[0]]
            else:
                env[node] = b.plain(a, m, base)
        elif node.op in ("call_method", "call_function") and (
            node.target in ("flatten",) or node.target is torch.flatten
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            env[node] = b.op("Flatten", a[:1], base, axis=int(start))
            if a[0] in grid:
                grid[env[node]] = grid[a[0]]
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(a) == 2:
            env[node] = b.op("Add", a, base)  # float residual (FP32 reference); quantized adds are Add modules
        elif node.op == "output":
            output = a[0]
        else:
            raise BitsweepError(f"ONNX export does not support {node.op} {getattr(node.target, '__name__', node.target)}")
    if output is None:
        raise BitsweepError("the model graph has no output")
    b.nodes.append(onnx.helper.make_node("Identity", [output], ["logits"], name="logits_op"))
    n_out = next(m for m in reversed(list(model.modules())) if is_weight_layer(m) or isinstance(m, nn.Linear))
    out_features = getattr(n_out, "out_features", None) or getattr(n_out, "out_channels", None)
    g = onnx.helper.make_graph(
        b.nodes, "bitsweep", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", *input_shape])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", out_features])], b.inits,
    )  # fmt: skip
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="bitsweep")
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime output of an exported file compared with the PyTorch simulation."""

    images: int
    top1_agreement: float  # percent
    max_logit_diff: float
    simulated_top1: float | None  # percent correct, when labels were given
    onnx_top1: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with all graph optimizations (integer kernel fusion included)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BitsweepError("checking ONNX files needs onnxruntime: pip install 'bitsweep[onnx]'") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(path: str | Path, model: nn.Module, batches: Any, max_batches: int | None = None) -> OnnxCheck:
    """Run the ONNX file in onnxruntime and the simulation on the same images; compare predictions and logits."""
    sess = ort_session(path)
    model.eval()
    n = agree = sim_ok = onnx_ok = 0
    labelled, max_diff = True, 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x.cpu().float()
        sim = model(x).float()
        got = torch.from_numpy(sess.run(["logits"], {"input": x.numpy()})[0])
        max_diff = max(max_diff, float((sim - got).abs().max()))
        agree += int((sim.argmax(1) == got.argmax(1)).sum())
        if y is None:
            labelled = False
        else:
            sim_ok += int((sim.argmax(1) == y.cpu()).sum())
            onnx_ok += int((got.argmax(1) == y.cpu()).sum())
        n += x.shape[0]
    if n == 0:
        raise BitsweepError("no images to check; give at least one batch")
    return OnnxCheck(n, 100.0 * agree / n, max_diff, 100.0 * sim_ok / n if labelled else None,
                     100.0 * onnx_ok / n if labelled else None)  # fmt: skip
