"""int8 ONNX in the QOperator format, written from the integer program so onnxruntime runs integers end to end.

The QDQ export (:mod:`bitsweep.export.onnx`) leaves it to onnxruntime to find
integer kernels; residual adds and some convolutions stay in float there, and
the model runs slower than FP32. This module writes the integer operators
itself, one per step of :func:`bitsweep.backend.lowering.lower`'s program:

* input: ``QuantizeLinear`` (the program's input scale) into uint8;
* ``Accumulate`` + ``Requantize``: ``QLinearConv`` with per-channel 8-bit
  weights (int8 with zero point 0; dense layers by default as uint8 ``w + 128``
  with zero point 128, see :func:`export_onnx_qop`), the program's int32 bias,
  depthwise through ``group``; a hidden ``Linear`` is a 1x1 ``QLinearConv`` on (N, K, 1, 1);
* ``AddGrids``: ``QLinearAdd`` (``com.microsoft``);
* ``PoolSum`` + ``Requantize``: ``QLinearGlobalAveragePool`` / ``QLinearAveragePool`` (``com.microsoft``);
* the classifier's accumulator (the logits are not requantized in the
  program): ``MatMulInteger`` (``ConvInteger`` for a convolution) into int32,
  then ``DequantizeLinear`` (per class scale, zero point = minus the int32
  bias, so ``(acc + bias) * scale``) as the only step back to float;
* ``ClampInts``, max pooling, flatten: integer ``Clip``, ``MaxPool``, ``Flatten`` on uint8.

Scales. The program stores no real scales between layers, only the
fixed-point multipliers ``M = m0 * 2**-shift`` (per channel). So every
intermediate uint8 tensor here has scale 1: its values are the program's
centered integers plus a zero point. ``x_scale = y_scale = 1`` and the per
channel ``w_scale = float32(M)`` make onnxruntime's multiplier
``x_scale * w_scale / y_scale`` exactly ``float32(M)``, the closest float32 to
the program's multiplier (no product of three rounded scales). ``QLinearAdd``
gets ``A_scale = ma / 2**prec``, ``B_scale = mb / 2**prec``, ``C_scale = 1``; the
pools get ``x_scale = M * window`` tuned by ulps so onnxruntime's
``x_scale / (y_scale * window)`` is ``float32(M)``.

Grids and clamps. A grid of centered integers ``[lo, hi]`` is held in uint8
with zero point ``-lo`` (a 4-bit activation is uint8 values 0..15), so the
container's saturation at 0 is the lower clamp, and ReLU's (folded into ``lo``
by the lowering) too. The upper clamp is the saturation at 255 when
``hi - lo == 255``; for a narrower range (sub-8-bit grids, or ReLU6 when the
grid reaches above 6) an integer ``Clip(0, hi - lo)`` follows. So ReLU6's upper
bound is honoured either by the uint8 saturation (the grid's top is at or below
6, the usual case after calibration) or by that integer ``Clip``.

Exactness. onnxruntime requantizes in float32 and rounds half to even where the
program rounds exactly, half up; ``QuantizeLinear`` divides by the scale where
the program multiplies by its float32 reciprocal. The integers differ only on
(near-)ties, by one; :func:`bitsweep.export.onnx_check.check_qop` measures the
effect on predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitsweep.backend import lowering as lw
from bitsweep.errors import BitsweepError
from bitsweep.export.onnx_graph import GraphBuilder, import_onnx
from bitsweep.io import atomic_path
from bitsweep.quant.inspect import activation_quantizers, weight_layers

OPSET = 21
DENSE_WEIGHTS = ("auto", "uint8", "int8")  # container of dense (non-depthwise) weights, see export_onnx_qop
PAIR_LIMIT = 32767  # AVX2 u8 x s8 kernels add two products into a saturating int16
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class _Ints:
    """A materialized uint8 tensor: container value = centered integer + ``zp``, centered range ``[lo, hi]``."""

    name: str
    zp: int
    lo: int
    hi: int


@dataclass(frozen=True)
class _PendingAcc:
    """An accumulator not yet written: it becomes one node together with its requantization or the logits."""

    step: lw.Accumulate
    x: _Ints
    after: tuple[tuple[Any, ...], ...] = ()  # value-preserving ops seen in between (flatten), applied afterwards


@dataclass(frozen=True)
class _PendingPool:
    """A window sum waiting for its requantization (they become one QLinear pooling node)."""

    step: lw.PoolSum
    x: _Ints
    after: tuple[tuple[Any, ...], ...] = ()


_Value = _Ints | _PendingAcc | _PendingPool


def check_widths(model: nn.Module) -> None:
    """Refuse, in one line, a model with an operand wider than 8 bits (or binary), before any work."""
    for name, layer in weight_layers(model):
        spec = layer.weight_quantizer.spec
        if spec.bits > 8 or spec.binary:
            what = "binary" if spec.binary else f"{spec.bits}-bit"
            raise BitsweepError(f"QOperator ONNX export needs <= 8 bits (2..8); layer '{name}' has {what} weights")
    for name, q in activation_quantizers(model):
        if q.spec.bits > 8 or q.spec.binary:
            what = "binary" if q.spec.binary else f"{q.spec.bits}-bit"
            raise BitsweepError(
                f"QOperator ONNX export needs <= 8 bits (2..8); quantizer '{name}' has {what} activations"
            )


def multiplier(m0: torch.Tensor, shift: torch.Tensor) -> np.ndarray:
    """The program's fixed-point multipliers ``m0 * 2**-shift`` as float32 (exact in float64, rounded once)."""
    exact: np.ndarray = np.ldexp(m0.double().numpy(), -shift.numpy().astype(np.int64))
    return exact.astype(np.float32)


def pool_scale(target: np.float32, window: int) -> np.float32:
    """``x_scale`` for which float32 ``x_scale / (1 * window)`` is closest to ``target`` (onnxruntime's multiplier).

    The float64 product ``target * window`` rounded to float32 can miss by an
    ulp after the division; the few neighbours around it are tried.
    """
    guess, w = np.float32(float(target) * window), np.float32(window)
    candidates = [guess]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        c = guess
        for _ in range(4):
            c = np.nextafter(c, direction)
            candidates.append(c)
    return min(candidates, key=lambda c: abs(float(np.float32(c / w)) - float(target)))


class _QopBuilder(GraphBuilder):
    """Turns program steps into QOperator nodes and tracks each value's container (plumbing: :class:`GraphBuilder`)."""

    purpose = "QOperator ONNX export"

    def __init__(self, dense_weights: str, pool_window: int) -> None:
        if dense_weights not in DENSE_WEIGHTS:
            raise BitsweepError(f"dense_weights must be one of {', '.join(DENSE_WEIGHTS)}, not {dense_weights!r}")
        self.dense_weights = dense_weights
        self.hw = pool_window  # H * W entering global pooling: the program keeps only the pool's multiplier
        super().__init__()
        self.values: dict[str, _Value] = {}
        self.classes: int | None = None

    # --- graph plumbing beyond GraphBuilder's ---

    def scalar_f(self, value: float, base: str = "scale") -> str:
        return self.const(base, np.array(value, np.float32))

    def zp(self, value: int, base: str = "zp") -> str:
        """A uint8 scalar (activation zero points and clamp bounds)."""
        return self.const(base, np.array(value, np.uint8))

    def weight_tensors(self, base: str, w: np.ndarray, depthwise: bool, x_span: int) -> tuple[str, str]:
        """Per-channel weight integers and zero points: int8 with 0, or uint8 with 128 for dense layers.

        ``x_span`` is the largest stored input integer (uint8 ``q - lo``). See :func:`export_onnx_qop`'s
        ``dense_weights`` for when dense layers take uint8.
        """
        c_out = w.shape[0]
        fits = 2 * x_span * int(np.abs(w).max(initial=0)) <= PAIR_LIMIT
        wide = self.dense_weights == "uint8" or (self.dense_weights == "auto" and not fits)
        if wide and not depthwise:
            return self.const(base + "_w", (w + 128).astype(np.uint8)), self.const(
                base + "_wzp", np.full(c_out, 128, np.uint8)
            )
        return self.const(base + "_w", w.astype(np.int8)), self.const(base + "_wzp", np.zeros(c_out, np.int8))

    def ints(self, name: str, lo: int, hi: int) -> _Ints:
        """A uint8 tensor holding ``q - lo``, clipped to ``hi - lo`` when the container's 255 is not the clamp."""
        if hi - lo > 255:
            raise BitsweepError(f"QOperator ONNX export needs <= 8 bits; a grid spans {hi - lo + 1} integers")
        if hi - lo < 255:
            bounds = [self.zp(0, "lo"), self.zp(hi - lo, "hi")]
            name = self.op("Clip", [name, *bounds], "clip")
        return _Ints(name, -lo, lo, hi)

    def value(self, name: str) -> _Value:
        return self.values[name]

    def materialized(self, name: str, what: str) -> _Ints:
        v = self.values[name]
        if not isinstance(v, _Ints):
            raise BitsweepError(f"QOperator ONNX export: {what} needs a requantized input, not an accumulator")
        return v

    # --- one method per program step ---

    def quantize_input(self, s: lw.QuantizeInput) -> None:
        if s.binary:
            raise BitsweepError("QOperator ONNX export needs <= 8 bits (2..8); the input quantizer is binary")
        q = self.op("QuantizeLinear", ["input", self.scalar_f(float(s.scale)), self.zp(-s.lo)], "input_q")
        self.values[s.dst] = self.ints(q, s.lo, s.hi)

    def accumulate(self, s: lw.Accumulate) -> None:
        w = s.weight
        if int(w.min()) < -128 or int(w.max()) > 127:
            raise BitsweepError(
                f"QOperator ONNX export needs int8 weights with zero point 0; '{s.dst}' has centered weights in "
                f"[{int(w.min())}, {int(w.max())}] (use symmetric weight quantization)"
            )
        if s.bias is not None and int(s.bias.abs().max()) >= 2**31:
            raise BitsweepError(f"QOperator ONNX export: the integer bias of '{s.dst}' does not fit int32")
        self.values[s.dst] = _PendingAcc(s, self.materialized(s.src, f"layer '{s.dst}'"))

    def requantize(self, s: lw.Requantize) -> None:
        if s.binary:
            raise BitsweepError("QOperator ONNX export needs <= 8 bits (2..8); a binary requantization")
        v = self.value(s.src)
        m = multiplier(s.m0, s.shift)
        y_zp = self.zp(-s.lo, "y_zp")
        if isinstance(v, _PendingAcc):
            out, after = self._qlinear_layer(v, m, y_zp), v.after
        elif isinstance(v, _PendingPool):
            out, after = self._qlinear_pool(v, m, y_zp), v.after
        else:  # grid -> grid (two quantizers in a row): per-tensor rescale through float, rare in practice
            dq = self.op("DequantizeLinear", [v.name, self.scalar_f(float(m[0])), self.zp(v.zp)], "rescale")
            out, after = self.op("QuantizeLinear", [dq, self.scalar_f(1.0), y_zp], "rescale_q"), ()
        res = self.ints(out, s.lo, s.hi)
        for op in after:
            res = _Ints(self.value_op(res.name, op, s.dst), res.zp, res.lo, res.hi)
        self.values[s.dst] = res

    def _qlinear_layer(self, v: _PendingAcc, m: np.ndarray, y_zp: str) -> str:
        s, x = v.step, v.x
        c_out = s.weight.shape[0]
        w_scale = np.broadcast_to(m, (c_out,)).astype(np.float32)
        one = self.scalar_f(1.0)
        xin = x.name
        weight = s.weight.numpy()
        if s.op == "linear":  # (N, K) -> (N, K, 1, 1): a hidden Linear is a 1x1 convolution
            xin = self.op("Unsqueeze", [xin, self.const("axes", np.array([2, 3], np.int64))], "as_map")
            weight = weight.reshape(*weight.shape, 1, 1)
        depthwise = s.groups > 1 and s.groups == s.weight.shape[0]
        w, w_zp = self.weight_tensors(s.dst, weight, depthwise, x_span=x.hi - x.lo)
        inputs = [xin, one, self.zp(x.zp, "x_zp"), w, self.const(s.dst + "_ws", w_scale), w_zp, one, y_zp]
        if s.bias is not None:
            inputs.append(self.const(s.dst + "_b", s.bias.numpy().astype(np.int32)))
        out = self.op("QLinearConv", inputs, s.dst, **self._geometry(s, weight.shape[2:]))
        return self.op("Flatten", [out], s.dst + "_flat", axis=1) if s.op == "linear" else out

    @staticmethod
    def _geometry(s: lw.Accumulate, kernel: tuple[int, ...]) -> dict[str, Any]:
        def pair(v: Any) -> list[int]:
            return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]

        if s.op == "linear":
            return {"kernel_shape": [1, 1]}
        if isinstance(s.padding, str):
            raise BitsweepError(f"QOperator ONNX export needs numeric convolution padding, '{s.dst}' has {s.padding!r}")
        ph, pw = pair(s.padding)
        return {"kernel_shape": list(kernel), "strides": pair(s.stride), "pads": [ph, pw, ph, pw],
                "dilations": pair(s.dilation), "group": int(s.groups)}  # fmt: skip

    def _qlinear_pool(self, v: _PendingPool, m: np.ndarray, y_zp: str) -> str:
        s, x = v.step, v.x
        x_zp, one = self.zp(x.zp, "x_zp"), self.scalar_f(1.0)
        if s.kernel is None:  # global: onnxruntime's multiplier is x_scale / (y_scale * H * W)
            window = self.hw
            inputs = [x.name, self.scalar_f(float(pool_scale(m[0], window))), x_zp, one, y_zp]
            return self.op("QLinearGlobalAveragePool", inputs, "pool", MS_DOMAIN, channels_last=0)
        window = s.kernel[0] * s.kernel[1]
        inputs = [x.name, self.scalar_f(float(pool_scale(m[0], window))), x_zp, one, y_zp]
        stride = list(s.stride or s.kernel)
        return self.op("QLinearAveragePool", inputs, "pool", MS_DOMAIN, kernel_shape=list(s.kernel), strides=stride)

    def add(self, s: lw.AddGrids) -> None:
        if s.binary:
            raise BitsweepError("QOperator ONNX export needs <= 8 bits (2..8); a binary residual add")
        a, b = self.materialized(s.a, "a residual add"), self.materialized(s.b, "a residual add")
        unit = 2.0**-s.prec
        inputs = [a.name, self.scalar_f(s.ma * unit), self.zp(a.zp), b.name, self.scalar_f(s.mb * unit),
                  self.zp(b.zp), self.scalar_f(1.0), self.zp(-s.lo, "y_zp")]  # fmt: skip
        self.values[s.dst] = self.ints(self.op("QLinearAdd", inputs, "add", MS_DOMAIN), s.lo, s.hi)

    def pool(self, s: lw.PoolSum) -> None:
        self.values[s.dst] = _PendingPool(s, self.materialized(s.src, "average pooling"))

    def clamp(self, s: lw.ClampInts) -> None:
        v = self.materialized(s.src, "a clamp")
        lo, hi = max(s.lo, v.lo), min(s.hi, v.hi)
        name = self.op("Clip", [v.name, self.zp(lo + v.zp, "lo"), self.zp(hi + v.zp, "hi")], "clamp")
        self.values[s.dst] = _Ints(name, v.zp, lo, hi)

    def apply(self, s: lw.Apply) -> None:
        v = self.value(s.src)
        if s.op[0] == "identity":
            self.values[s.dst] = v
        elif isinstance(v, (_PendingAcc, _PendingPool)):
            if s.op[0] == "maxpool":
                raise BitsweepError("QOperator ONNX export: max pooling of an accumulator is not supported")
            self.values[s.dst] = type(v)(v.step, v.x, (*v.after, s.op))  # type: ignore[arg-type]
        else:
            self.values[s.dst] = _Ints(self.value_op(v.name, s.op, s.dst), v.zp, v.lo, v.hi)

    def output(self, s: lw.Output) -> str:
        v = self.value(s.src)
        scale = s.scale.float().numpy().reshape(-1)
        if isinstance(v, _PendingAcc):
            acc, after = self._int32_layer(v), v.after
            self.classes = int(v.step.weight.shape[0])
            # (acc - zp) * scale with zp = -bias: the int32 bias rides in the zero point, no separate Add
            bias = v.step.bias.numpy() if v.step.bias is not None else np.zeros(scale.shape, np.int64)
            zp = np.broadcast_to(-bias, scale.shape).astype(np.int32)
            logits = self.op("DequantizeLinear", [acc, self.const("logit_scale", scale), self.const("logit_zp", zp)],
                             "logits_dq", axis=1)  # fmt: skip
        elif isinstance(v, _Ints):
            zp_in = self.zp(v.zp)
            logits = self.op("DequantizeLinear", [v.name, self.scalar_f(float(scale[0])), zp_in], "logits_dq")
            after = ()
        else:
            raise BitsweepError("QOperator ONNX export: the logits come straight from a pooling sum")
        for op in after:
            logits = self.value_op(logits, op, "logits")
        if not (math.isinf(s.lo) and math.isinf(s.hi)):  # a clamp on the logits themselves (rare)
            lo, hi = self.scalar_f(max(s.lo, -3.0e38)), self.scalar_f(min(s.hi, 3.0e38))
            logits = self.op("Clip", [logits, lo, hi], "logits_clip")
        return logits

    def _int32_layer(self, v: _PendingAcc) -> str:
        """The classifier's exact int32 accumulator without its bias (the logits' DequantizeLinear adds it)."""
        s, x = v.step, v.x
        x_zp = self.zp(x.zp, "x_zp")
        if s.op == "linear":  # (N, K) @ (K, C) -> (N, C)
            w = self.const(s.dst + "_wt", s.weight.numpy().T.astype(np.int8))
            acc = self.op("MatMulInteger", [x.name, w, x_zp, self.const("w_zp", np.array(0, np.int8))], s.dst)
        else:  # onnxruntime's ConvInteger takes uint8 weights: store w + 128 with zero point 128
            w = self.const(s.dst + "_w", (s.weight.numpy() + 128).astype(np.uint8))
            geom = self._geometry(s, tuple(s.weight.shape[2:]))
            acc = self.op("ConvInteger", [x.name, w, x_zp, self.const("w_zp", np.array(128, np.uint8))], s.dst, **geom)
        return acc


def build_qop(
    program: lw.Program, input_shape: tuple[int, int, int], pool_window: int, *,
    dense_weights: str = "auto",
) -> Any:  # fmt: skip
    """The QOperator ``onnx.ModelProto`` of ``program`` (inputs ``(batch, *input_shape)``, output ``logits``).

    Args:
        program: the model's integer program (:func:`bitsweep.backend.lowering.lower`).
        input_shape: ``(C, H, W)``; the batch dimension is dynamic.
        pool_window: ``H * W`` averaged by a global pooling step (the program keeps only its multiplier).
        dense_weights: ``"uint8"`` or ``"int8"``, see :func:`export_onnx_qop`.
    """
    b = _QopBuilder(dense_weights, pool_window)
    handlers: dict[type, Any] = {
        lw.QuantizeInput: b.quantize_input, lw.Accumulate: b.accumulate, lw.Requantize: b.requantize,
        lw.AddGrids: b.add, lw.PoolSum: b.pool, lw.ClampInts: b.clamp, lw.Apply: b.apply,
    }  # fmt: skip
    logits: str | None = None
    for step in program.steps:
        if isinstance(step, lw.Output):
            logits = b.output(step)
            break
        handlers[type(step)](step)
    if logits is None:
        raise BitsweepError("the integer program has no output step")
    onnx = b.onnx
    b.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="logits_op"))
    float_t = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        b.nodes, "bitsweep_qop", [onnx.helper.make_tensor_value_info("input", float_t, ["batch", *input_shape])],
        [onnx.helper.make_tensor_value_info("logits", float_t, ["batch", b.classes or "classes"])], b.inits,
    )  # fmt: skip
    opsets = [onnx.helper.make_opsetid("", OPSET), onnx.helper.make_opsetid(MS_DOMAIN, 1)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="bitsweep")
    proto.ir_version = 10
    return proto


def _global_pool_window(program: lw.Program, example: torch.Tensor) -> int:
    """H * W entering the program's global pooling, found by running its shapes in the int64 reference."""
    from bitsweep.backend.intref import execute

    global_pools = [s for s in program.steps if isinstance(s, lw.PoolSum) and s.kernel is None]
    if not global_pools:
        return 0
    # The reference executor drops intermediates; rerun the prefix up to the pool's input to read its shape.
    cut = next(i for i, s in enumerate(program.steps) if s is global_pools[0])
    src = global_pools[0].src
    prefix = lw.Program((*program.steps[:cut], lw.Output(src, torch.ones(1, dtype=torch.float64))))
    shape = execute(prefix, example[:1].cpu().float()).shape
    return int(shape[-2] * shape[-1])


def export_onnx_qop(
    model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], *, dense_weights: str = "auto",
    metadata: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Write a converted model (weights and activations of 2..8 bits) as QOperator int8 ONNX, atomically.

    See the module docstring for the operators and how the program's
    requantization and clamps (ReLU, ReLU6) are folded into them.

    ``dense_weights`` picks the container of the weights of dense (not
    depthwise) layers. On CPUs without VNNI/AMX (AVX2 only), onnxruntime's
    uint8 x int8 kernels sum pairs of products in saturating int16
    (``vpmaddubsw``): with 8-bit weights the sums overflow and the logits go
    wrong (measured on a width-0.25 MobileNet-v2: 0.8 % of predictions changed,
    median logit error 0.14). ``"uint8"`` stores those weights as ``w + 128``
    with zero point 128 - the same integers - so onnxruntime takes its exact
    uint8 x uint8 kernels on every CPU. ``"int8"`` (zero point 0) is faster on
    CPUs with VNNI or AMX, where the int8 kernels are exact, and inexact on
    AVX2-only CPUs. ``"auto"`` (the default) takes int8 for each layer whose
    pair sums cannot saturate (``2 * max input * max |w| <= 32767``: every
    layer with weights of 7 bits or fewer against 8-bit activations) and uint8
    for the others, so the file is exact on every CPU and sub-8-bit models get
    the fast kernels. Depthwise layers keep int8 weights with zero point 0
    always: their kernel widens to 32 bits and does not saturate.

    Args:
        model: a converted quantized model (``bitsweep.quant.ptq(...).model``).
        path: destination ``.onnx`` file; nothing is left there when the export fails.
        input_shape: ``(C, H, W)``; the batch dimension is dynamic.
        dense_weights: ``"auto"`` or ``"uint8"`` (exact everywhere), or ``"int8"`` (for VNNI/AMX CPUs).
        metadata: written to the file's ``metadata_props`` (e.g. the input normalization ``mean``/``std``, so a
            deployment needs nothing but the file; onnxruntime reads them with ``get_modelmeta()``).

    Raises:
        BitsweepError: for a wider-than-8-bit or binary operand, or an op the integer program cannot express.
    """
    check_widths(model)
    example = torch.zeros(1, *input_shape)
    program = lw.lower(model, example)
    proto = build_qop(program, input_shape, _global_pool_window(program, example), dense_weights=dense_weights)
    onnx = import_onnx()
    onnx.helper.set_model_props(proto, dict(metadata or {}))
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)
