"""ONNX export of a converted model as QDQ (QuantizeLinear/DequantizeLinear), checked in onnxruntime.

The graph is written node by node from the model's classified fx graph (the
walk the integer lowering makes, :mod:`bitsweep.quant.walk`; not through
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

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import fx, nn

from bitsweep.backend.intref import image_batches
from bitsweep.errors import BitsweepError
from bitsweep.export.onnx_graph import GraphBuilder
from bitsweep.io import atomic_path
from bitsweep.quant.graph import NodeInfo, Op, classify, trace
from bitsweep.quant.inspect import is_weight_layer
from bitsweep.quant.modules import ActivationQuantizer
from bitsweep.quant.walk import walk

OPSET = 21  # int16 QuantizeLinear/DequantizeLinear need opset 21


def _container(bits: int, signed: bool) -> tuple[Any, int]:
    """numpy dtype and width of the smallest ONNX integer type holding ``bits``."""
    if bits <= 8:
        return (np.int8 if signed else np.uint8), 8
    return (np.int16 if signed else np.uint16), 16


class _Builder(GraphBuilder):
    """The walk's emitter for QDQ ONNX (names, initializers and nodes from :class:`GraphBuilder`)."""

    def __init__(self, int8: bool) -> None:
        super().__init__()
        self.int8 = int8
        self.grid: dict[str, float] = {}  # tensor name -> activation scale, for int8 biases
        self.result: str | None = None

    def const(self, base: str, array: Any) -> str:
        return super().const(base, np.ascontiguousarray(array))  # QDQ scales and zero points as 1-d

    def qdq(self, x: str, quantizer: ActivationQuantizer, base: str) -> str:
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

    # --- the walk's Emitter (bitsweep.quant.walk): one method per node kind ---

    def input(self, node: fx.Node) -> str:
        return "input"

    def quantize(self, x: str, quantizer: ActivationQuantizer, name: str) -> str:
        out = self.qdq(x, quantizer, name)
        self.grid[out] = float(quantizer.scale)
        return out

    def weight(self, x: str, m: nn.Module, base: str) -> str:
        if not is_weight_layer(m):  # left in floating point (FP32 reference exports, skipped layers)
            if self.int8:
                raise BitsweepError(f"--int8 needs every layer quantized; '{base}' is floating point")
            fw, fb = cast(torch.Tensor, m.weight), cast("torch.Tensor | None", m.bias)  # a float Conv2d/Linear
            inputs = [x, self.const(base + "_w", fw.detach().float().cpu().numpy())]
            if fb is not None:
                inputs.append(self.const(base + "_b", fb.detach().float().cpu().numpy()))
            return self._conv_or_gemm(inputs, m, base)
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
                in_scale = self.grid.get(x)
                if in_scale is None:
                    raise BitsweepError(f"--int8 needs quantized inputs for layer '{base}'")
                bscale = (scale.astype(np.float64) * in_scale).astype(np.float32)
                bq = np.round(bias / bscale).astype(np.int32)
                bzp = np.zeros(c_out, np.int32)
                dq_in = [self.const(base + "_bq", bq), self.const(base + "_bs", bscale), self.const(base + "_bzp", bzp)]
                inputs.append(self.op("DequantizeLinear", dq_in, base + "_b", axis=0))
            else:
                inputs.append(self.const(base + "_b", bias))
        return self._conv_or_gemm(inputs, m, base)

    def _conv_or_gemm(self, inputs: list[str], m: nn.Module, base: str) -> str:
        if isinstance(m, nn.Conv2d):
            ph, pw = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            return self.op("Conv", inputs, base, strides=list(m.stride), pads=[ph, pw, ph, pw],
                           dilations=list(m.dilation), group=m.groups, kernel_shape=list(m.kernel_size))  # fmt: skip
        return self.op("Gemm", inputs, base, transB=1)

    def activation(self, x: str, node: NodeInfo, base: str, quantizer: ActivationQuantizer | None) -> str:
        bounds = node.clamp
        if bounds is None:
            raise BitsweepError(f"ONNX export supports clamp-like activations (ReLU, ReLU6, Hardtanh), not '{base}'")
        if quantizer is not None and _clamp_is_redundant(bounds, quantizer):
            return x
        if bounds == (0.0, math.inf):
            return self.op("Relu", [x], base)
        names = ("zero", "six") if bounds == (0.0, 6.0) else ("lo", "hi")
        return self.op("Clip", [x, self.const(names[0], np.array(bounds[0], np.float32)),
                                self.const(names[1], np.array(bounds[1], np.float32))], base)  # fmt: skip

    def add(self, a: str, b: str, base: str) -> str:
        return self.op("Add", [a, b], base)

    def pool(self, x: str, node: NodeInfo, base: str, shape: torch.Size | None) -> str:
        p = node.pool
        if p is not None and p.output_size == (1, 1):
            out = self.op("GlobalAveragePool", [x], base)
            return out if p.keepdim else self.op("Flatten", [out], base, axis=1)
        if p is not None and p.kernel is not None and p.stride is not None:
            return self.op("AveragePool", [x], base, kernel_shape=list(p.kernel), strides=list(p.stride))
        raise BitsweepError(f"ONNX export supports global and windowed 2-d average pooling, not '{base}'")

    def passthrough(self, x: str, ops: tuple[Op, ...], base: str) -> str:
        out = x
        for op in ops:
            out = self.value_op(out, op, base)
        if x in self.grid:
            self.grid[out] = self.grid[x]
        return out

    def output(self, x: str) -> None:
        self.result = x


def _clamp_is_redundant(bounds: tuple[float, float], quantizer: ActivationQuantizer) -> bool:
    """True when a clamp to ``bounds`` (ReLU, ReLU6, Hardtanh, ...) before ``quantizer`` cannot change its output.

    If the grid's real range ``[(qmin - z) s, (qmax - z) s]`` lies inside the
    clamp's ``[lo, hi]``, QuantizeLinear's own saturation does the clamping, so
    dropping the op is exact - and it lets onnxruntime fuse Conv -> Q into QLinearConv.
    """
    if quantizer.spec.binary:
        return False
    lo, hi = bounds
    s, z = np.float32(quantizer.scale.item()), int(quantizer.zero_point.item())
    spec = quantizer.spec
    return bool(np.float32(spec.qmin - z) * s >= lo and np.float32(spec.qmax - z) * s <= hi)


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], int8: bool = False) -> Path:
    """Write a converted quantized model as a QDQ ONNX file (atomically).

    The model's classified graph is walked as the integer lowering walks it
    (:func:`bitsweep.quant.walk.walk`), so both accept the same models.
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
    graph = trace(model, "ONNX export")
    assert graph is not None
    walk(classify(model, graph), b)
    if b.result is None:
        raise BitsweepError("the model graph has no output")
    b.nodes.append(onnx.helper.make_node("Identity", [b.result], ["logits"], name="logits_op"))
    n_out = next(m for m in reversed(list(model.modules())) if is_weight_layer(m) or isinstance(m, nn.Linear))
    out_features = getattr(n_out, "out_features", None) or getattr(n_out, "out_channels", None)
    float_t = onnx.TensorProto.FLOAT
    g = onnx.helper.make_graph(
        b.nodes, "bitsweep", [onnx.helper.make_tensor_value_info("input", float_t, ["batch", *input_shape])],
        [onnx.helper.make_tensor_value_info("logits", float_t, ["batch", out_features])], b.inits,
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


def import_ort() -> Any:
    """The ``onnxruntime`` module, or one clear error saying how to install it (an optional dependency)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BitsweepError("checking ONNX files needs onnxruntime: pip install 'bitsweep[onnx]'") from None
    return ort


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with all graph optimizations (integer kernel fusion included)."""
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, model: nn.Module, batches: Any, max_batches: int | None = None) -> OnnxCheck:
    """Run the ONNX file in onnxruntime and the simulation on the same images; compare predictions and logits."""
    model.eval()
    return compare_session(ort_session(path), model, batches, max_batches)


@torch.no_grad()
def compare_session(
    sess: Any, reference: Callable[[torch.Tensor], torch.Tensor], batches: Any, max_batches: int | None = None
) -> OnnxCheck:
    """Run onnxruntime session ``sess`` and ``reference`` on the same images; compare predictions and logits."""
    n = agree = ref_ok = onnx_ok = 0
    labelled, max_diff = True, 0.0
    for x, y in image_batches(batches, max_batches):
        want = reference(x).float()
        got = torch.from_numpy(sess.run(["logits"], {"input": x.numpy()})[0])
        max_diff = max(max_diff, float((want - got).abs().max()))
        agree += int((want.argmax(1) == got.argmax(1)).sum())
        if y is None:
            labelled = False
        else:
            ref_ok += int((want.argmax(1) == y.cpu()).sum())
            onnx_ok += int((got.argmax(1) == y.cpu()).sum())
        n += x.shape[0]
    if n == 0:
        raise BitsweepError("no images to check; give at least one batch")
    return OnnxCheck(n, 100.0 * agree / n, max_diff, 100.0 * ref_ok / n if labelled else None,
                     100.0 * onnx_ok / n if labelled else None)  # fmt: skip
