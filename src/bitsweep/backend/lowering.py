"""Lowering a converted model to the integer program an integer deployment runs.

A converted model describes *what* to quantize; a deployment needs *how*:
integer weights and biases, one fixed-point multiplier per requantization,
integer clamp bounds. :func:`lower` walks the model's classified graph once
(:mod:`bitsweep.quant.graph`, :func:`bitsweep.quant.walk.walk`: the same walk
the ONNX exporter makes) and writes that down as a flat list of steps with
all constants computed offline. Two
executors run the same steps with different arithmetic:

* :mod:`bitsweep.backend.intref` - the integer reference: int64 tensors,
  integer multiply and rounding right-shift, what a real int kernel does;
* :mod:`bitsweep.backend.simulate` - the fast simulation every accuracy in
  bitsweep comes from: integers carried in float32 tensors (exact below
  2**24), requantization in float64 (exact below 2**53), so it computes the
  same integers as the reference with fast float kernels.

Values between steps are *centered integers* ``q - zero_point`` on a grid
(:class:`Grid`: scale and clamp bounds) or wide *accumulators*
(:class:`Acc`: one scale per channel). The arithmetic, exactly:

* input: ``clamp(round(x * float32(1/scale)), qmin - z, qmax - z)`` (the fake-quant formula);
* conv / linear: ``acc = sum(x * (w - z_w)) + round(b / (s_x s_w))`` (the integer bias added to the exact sum);
* requantize to a grid ``(s_o, z_o)``: ``M = s_in / s_o`` per channel is stored as
  ``m0 * 2**-shift`` with ``m0`` of ``precision`` bits, where ``precision`` is the
  largest that keeps ``|acc| * m0 < 2**52`` for the layer's worst-case
  accumulator (so ``acc * m0 + 2**(shift-1)`` is exact in float64 too); ``q = clamp(floor(acc * m0 /
  2**shift + 1/2), lo, hi)``; ReLU/ReLU6/Hardtanh fold into ``lo``/``hi``;
  binary (1-bit signed) grids take ``+1 if acc >= 0 else -1``;
* residual add (an ``Add`` module, ``a + b`` or ``torch.add``, followed by its quantizer):
  ``clamp(floor((a * ma + b * mb) / 2**p + 1/2), lo, hi)`` with
  integer ``ma, mb`` (``p`` up to 30 bits, chosen so the sum stays below 2**52);
* average pooling (modules, ``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, ``x.mean((2, 3))``):
  the integer window sum, then requantization by ``s / (s_o * window)``;
* max pooling, flatten, reshape, dropout, identity (modules, functions or methods): on the integers;
* logits: ``acc * s_x s_w`` (or ``q * s``) in float64, then float32.

Not supported (BitsweepError naming the op): activations other than clamps
(ReLU, ReLU6, Hardtanh, ``F.relu6``, ``clamp``: SiLU, Hardswish need lookup
tables), unquantized float layers, shape computations, untraceable models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bitsweep.backend.program import (  # re-exported: executors reach the steps through this module
    FLOAT32_EXACT,
    FLOAT64_EXACT,
    Acc,
    Accumulate,
    AddGrids,
    Apply,
    ClampInts,
    Grid,
    Output,
    PoolSum,
    Program,
    QuantizeInput,
    Requantize,
    Step,
    apply_op,
    channel_view,
)
from bitsweep.errors import BitsweepError
from bitsweep.quant.graph import NodeInfo, Op, classify, trace, traced_root
from bitsweep.quant.inspect import is_weight_layer
from bitsweep.quant.modules import ActivationQuantizer
from bitsweep.quant.walk import walk

__all__ = [
    "FLOAT32_EXACT", "FLOAT64_EXACT", "Acc", "AddGrids", "Accumulate", "Apply", "ClampInts", "Grid", "Output",
    "PoolSum", "Program", "QuantizeInput", "Requantize", "Step", "apply_op", "channel_view", "fixed_point", "lower",
]  # fmt: skip


def fixed_point(multiplier: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``multiplier ~= m0 * 2**-shift`` with the most bits of ``m0`` that keep ``bound * m0 < 2**52``.

    The precision depends only on the worst-case accumulator, never on data, so
    every batch is requantized with the same constants. 2**52 rather than 2**53:
    then ``acc * m0 * 2**-shift + 1/2`` is exact in float64 as well, so the
    simulation rounds with one ``floor(y + 1/2)`` (see ``simulate._requant``).
    """
    precision = min(31, 52 - max(int(bound), 1).bit_length())
    if precision < 8:
        raise BitsweepError(
            f"an accumulator of up to {bound} leaves under 8 bits for the requantization multiplier; reduce bit widths"
        )
    mant, exp = torch.frexp(multiplier.double().reshape(-1))  # multiplier = mant * 2**exp, mant in [0.5, 1)
    m0 = torch.round(mant * 2.0**precision).to(torch.int64)
    shift = precision - exp.to(torch.int64)
    if bool((shift < 1).any()):
        big = float(multiplier.max())
        raise BitsweepError(f"a requantization multiplier of {big:.3g} is too large for fixed point; reduce bit widths")
    # Past a 62-bit shift every |acc * m0| < 2**52 rounds to 0: say so exactly (and keep int64 shifts defined).
    tiny = shift > 62
    return torch.where(tiny, 0, m0), torch.where(tiny, 1, shift)


def _grid_of(quantizer: ActivationQuantizer) -> Grid:
    spec = quantizer.spec
    z = int(quantizer.zero_point)
    if spec.binary:
        return Grid(float(quantizer.scale), -1, 1, True)
    return Grid(float(quantizer.scale), spec.qmin - z, spec.qmax - z)


def _grid_bound(value: float, quantizer: ActivationQuantizer) -> int:
    """The centered output-grid integer of a real clamp bound (quantized offline, fake-quant formula)."""
    g = _grid_of(quantizer)
    if math.isinf(value):
        return g.lo if value < 0 else g.hi
    inv = (1.0 / quantizer.scale.float()).item()
    q = torch.round(torch.tensor(value, dtype=torch.float32) * torch.tensor(inv, dtype=torch.float32))
    return int(min(max(int(q.item()), g.lo), g.hi))


@dataclass(frozen=True)
class _PendingAdd:
    """``a + b`` of two grids, written as one AddGrids step once the output grid is known."""

    a: str
    b: str


class _Lowering:
    """The lowering's :class:`~bitsweep.quant.walk.Emitter`: tracks each value (float, Grid, Acc), emits steps."""

    purpose = "the integer lowering"

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.kinds: dict[str, Any] = {}
        self.inexact: list[str] = []
        self.count = 0
        self.program: Program | None = None

    def _new(self, base: str) -> str:
        self.count += 1
        return f"{base}#{self.count}"

    def _value(self, name: str) -> Any:
        v = self.kinds[name]
        if isinstance(v, _PendingAdd):
            raise BitsweepError("the integer lowering needs an activation quantizer right after every residual add")
        return v

    def quantize(self, name: str, quantizer: ActivationQuantizer, node_name: str = "") -> str:
        """Emit what moves value ``name`` onto ``quantizer``'s grid; returns the new value's name."""
        v, g = self.kinds[name], _grid_of(quantizer)
        if isinstance(v, _PendingAdd):
            return self._add(v, quantizer)
        dst = self._new(name)
        if v == "float":
            self.steps.append(QuantizeInput(name, dst, quantizer.scale.float().reshape(()), g.lo, g.hi, g.binary))
        elif isinstance(v, Acc):
            self.steps.append(self._requant(name, dst, v.scale, v.bound, v.dim, g, quantizer, v.lo, v.hi))
        elif isinstance(v, Grid):
            if v == g:
                return name
            scale = torch.tensor([v.scale], dtype=torch.float64)
            self.steps.append(self._requant(name, dst, scale, v.amax, 0, g, quantizer))
        self.kinds[dst] = g
        return dst

    def _requant(
        self, src: str, dst: str, scale: torch.Tensor, bound: int, dim: int, g: Grid, quantizer: ActivationQuantizer,
        lo: float = -math.inf, hi: float = math.inf,
    ) -> Requantize:  # fmt: skip
        m0, shift = fixed_point(scale / g.scale, bound)
        if g.binary:
            const = 1 if lo >= 0 else (-1 if hi < 0 else None)
            return Requantize(src, dst, m0, shift, -1, 1, dim, True, const)
        q_lo = max(g.lo, _grid_bound(lo, quantizer))
        q_hi = min(g.hi, _grid_bound(hi, quantizer))
        return Requantize(src, dst, m0, shift, q_lo, q_hi, dim)

    def weight(self, name: str, m: nn.Module, target: str) -> str:
        if not is_weight_layer(m):
            raise BitsweepError(f"the integer lowering needs every layer quantized; '{target}' is floating point")
        x = self._value(name)
        if not isinstance(x, Grid):
            raise BitsweepError(f"layer '{target}' receives values that are not quantized")
        wq = m.weight_quantizer
        w = wq.int_weight().to(torch.int64).cpu()
        z_w = wq.zero_point.to(torch.int64).reshape(-1).cpu()
        w = w - (z_w.reshape(-1, *([1] * (w.dim() - 1))) if z_w.numel() > 1 else z_w.reshape(()))
        s_w = wq.scale.double().reshape(-1).cpu()
        s_w = s_w.expand(w.shape[0]) if s_w.numel() == 1 else s_w
        scale = s_w * x.scale  # (C_out,)
        bias = None
        if m.bias is not None:
            bias = torch.round(m.bias.detach().double().cpu() / scale).to(torch.int64)
        fan_in = w[0].numel()
        sums = max(x.amax, 1) * max(int(w.abs().max()), 1) * fan_in
        bound = sums + (int(bias.abs().max()) if bias is not None else 0)
        if bound >= FLOAT64_EXACT:
            raise BitsweepError(f"layer {target!r}: its accumulator (fan-in {fan_in}) may exceed 2**53; use fewer bits")
        if sums >= FLOAT32_EXACT and isinstance(m, nn.Conv2d):
            self.inexact.append(target)
        dst = self._new(target)
        geometry = (m.stride, m.padding, m.dilation, m.groups) if isinstance(m, nn.Conv2d) else ()
        op = "conv" if isinstance(m, nn.Conv2d) else "linear"
        step = Accumulate(name, dst, op, w, bias, bound, sums, x.lo, x.hi, *geometry)
        self.steps.append(step)
        self.kinds[dst] = Acc(scale, bound, 4 if isinstance(m, nn.Conv2d) else 2)
        return dst

    def activation(self, name: str, node: NodeInfo, target: str, quantizer: ActivationQuantizer | None) -> str:
        if node.clamp is None:
            raise BitsweepError(
                f"the integer lowering supports clamp-like activations (ReLU, ReLU6, Hardtanh), not '{target}'"
                f" ({type(getattr(node.module, 'module', node.module)).__name__}); see bitsweep.backend.lowering"
            )
        return self.clamp(name, *node.clamp)

    def clamp(self, name: str, lo: float, hi: float) -> str:
        v = self._value(name)
        if isinstance(v, Acc):
            dst = self._new(name)
            self.kinds[dst] = Acc(v.scale, v.bound, v.dim, max(v.lo, lo), min(v.hi, hi))
            self.steps.append(Apply(name, dst, ("identity",)))
            return dst
        if isinstance(v, Grid):  # exact on the grid because quantization is monotone
            q_lo = v.lo if math.isinf(lo) else max(v.lo, math.ceil(lo / v.scale))
            q_hi = v.hi if math.isinf(hi) else min(v.hi, math.floor(hi / v.scale))
            dst = self._new(name)
            self.steps.append(ClampInts(name, dst, q_lo, q_hi))
            self.kinds[dst] = Grid(v.scale, q_lo, q_hi, v.binary)
            return dst
        raise BitsweepError("the integer lowering met a float tensor where integers were expected")

    def add(self, a: str, b: str, target: str) -> str:
        dst = f"{a}+{b}"
        self.kinds[dst] = _PendingAdd(a, b)
        return dst

    def _add(self, pending: _PendingAdd, out_q: ActivationQuantizer) -> str:
        args = [pending.a, pending.b]
        a, b = (self._value(n) for n in args)
        if not (isinstance(a, Grid) and isinstance(b, Grid)):
            raise BitsweepError("the integer lowering adds quantized values only")
        g = _grid_of(out_q)
        ra, rb = a.scale / g.scale, b.scale / g.scale
        worst = a.amax * ra + b.amax * rb
        prec = min(30, 52 - max(1, math.ceil(math.log2(max(worst, 1.0)))))
        ma, mb = round(ra * 2**prec), round(rb * 2**prec)
        dst = self._new("add")
        self.steps.append(AddGrids(args[0], args[1], dst, ma, mb, prec, g.lo, g.hi, g.binary))
        self.kinds[dst] = g
        return dst

    def pool(self, name: str, node: NodeInfo, target: str, shape: torch.Size | None) -> str:
        v, p = self._value(name), node.pool
        if not isinstance(v, Grid):
            raise BitsweepError("the integer lowering supports average pooling of quantized values only")
        if p is None:
            raise BitsweepError(f"the integer lowering supports global and windowed 2-d average pools, not {target!r}")
        kernel, stride = p.kernel, p.stride
        window = kernel[0] * kernel[1] if kernel is not None else 0
        if p.output_size is not None:
            if shape is None or len(shape) != 4:
                raise BitsweepError("the integer lowering needs the feature-map size before adaptive average pooling")
            h, w = int(shape[-2]), int(shape[-1])
            if h % p.output_size[0] or w % p.output_size[1]:
                raise BitsweepError(f"'{target}': adaptive pooling of {h}x{w} to {p.output_size} has uneven windows")
            window = h * w // (p.output_size[0] * p.output_size[1])
            if p.output_size != (1, 1):  # an even adaptive pooling is a window; (1, 1) stays a global sum
                kernel = stride = (h // p.output_size[0], w // p.output_size[1])
        dst = self._new(name)
        self.steps.append(PoolSum(name, dst, kernel, stride))
        self.kinds[dst] = Acc(torch.tensor([v.scale / window], dtype=torch.float64), v.amax * window, 4)
        return dst if p.keepdim else self.passthrough(dst, (("flatten", 1, -1),), target)

    def passthrough(self, name: str, ops: tuple[Op, ...], target: str) -> str:
        for op in ops:
            v = self._value(name)
            dst = self._new(name)
            self.steps.append(Apply(name, dst, op))
            flat = isinstance(v, Acc) and op[0] == "flatten"  # (N, C, 1, 1) -> (N, C): channels stay dim 1
            self.kinds[dst] = Acc(v.scale, v.bound, 2, v.lo, v.hi) if flat else v
            name = dst
        return name

    def input(self, node: fx.Node) -> str:
        self.kinds[node.name] = "float"
        return node.name

    def output(self, name: str) -> None:
        v = self._value(name)
        if isinstance(v, Grid):
            self.steps.append(Output(name, torch.tensor([v.scale], dtype=torch.float64)))
        elif isinstance(v, Acc):
            self.steps.append(Output(name, v.scale, v.lo, v.hi))
        else:
            raise BitsweepError("the model's output is not quantized or accumulated; nothing to lower")
        self.program = Program(tuple(self.steps), tuple(self.inexact))


def _input_shapes(model: nn.Module, graph: fx.Graph, example: torch.Tensor) -> dict[str, torch.Size]:
    """Shape of the first input of every node, from one forward pass of the converted model on ``example``."""
    gm = fx.GraphModule(model, graph)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    ShapeProp(gm).propagate(example[:1].to(device))
    shapes = {}
    for node in gm.graph.nodes:
        first = next((n for n in node.args if isinstance(n, fx.Node)), None)
        meta = first.meta.get("tensor_meta") if first is not None else None
        if meta is not None and hasattr(meta, "shape"):
            shapes[node.name] = meta.shape
    return shapes


@torch.no_grad()
def lower(model: nn.Module, example: torch.Tensor) -> Program:
    """The integer program of a converted ``model`` for inputs shaped like ``example`` (see the module docstring).

    ``example`` (N, C, H, W) fixes the feature-map sizes that global average pooling divides by.

    Raises:
        BitsweepError: for an op the integer arithmetic does not cover, naming it.
    """
    graph = trace(model, "integer lowering")
    assert graph is not None
    try:
        shapes = _input_shapes(traced_root(model), graph, example.float())
    except BitsweepError:
        raise
    except Exception as e:  # noqa: BLE001 - a wrong input shape surfaces deep inside a layer
        raise BitsweepError(f"the model does not run on inputs of shape {tuple(example.shape[1:])}: {e}") from None
    low = _Lowering()
    walk(classify(model, graph), low, shapes)
    assert low.program is not None
    return low.program
