"""Lowering a converted model to the integer program an integer deployment runs.

A converted model describes *what* to quantize; a deployment needs *how*:
integer weights and biases, one fixed-point multiplier per requantization,
integer clamp bounds. :func:`lower` walks the traced model once and writes
that down as a flat list of steps with all constants computed offline. Two
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
  largest that keeps ``|acc| * m0 < 2**53`` for the layer's worst-case
  accumulator (29 bits at 8-bit widths); ``q = clamp(floor(acc * m0 /
  2**shift + 1/2), lo, hi)``; ReLU/ReLU6/Hardtanh fold into ``lo``/``hi``;
  binary (1-bit signed) grids take ``+1 if acc >= 0 else -1``;
* residual add: ``clamp(floor((a * ma + b * mb) / 2**p + 1/2), lo, hi)`` with
  integer ``ma, mb`` (``p`` up to 30 bits, chosen so the sum stays below 2**52);
* average pooling: the integer window sum, then requantization by ``s / (s_o * window)``;
* max pooling, flatten, reshape, dropout, identity: on the integers;
* logits: ``acc * s_x s_w`` (or ``q * s``) in float64, then float32.

Not supported (BitsweepError naming the op): activations other than
ReLU/ReLU6/Hardtanh (SiLU, Hardswish need lookup tables), functional adds
outside a quantized ``Add`` module, unquantized float layers, untraceable models.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.inspect import is_activation_quantizer, is_weight_layer
from bitsweep.backend.program import (  # re-exported: executors reach the steps through this module
    FLOAT32_EXACT,
    FLOAT64_EXACT,
    Acc,
    AddGrids,
    Accumulate,
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

__all__ = [
    "FLOAT32_EXACT", "FLOAT64_EXACT", "Acc", "AddGrids", "Accumulate", "Apply", "ClampInts", "Grid", "Output",
    "PoolSum", "Program", "QuantizeInput", "Requantize", "Step", "apply_op", "channel_view", "clamp_bounds", "fixed_point", "lower",
    "trace_quantized",
]  # fmt: skip

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_weight_layer(m) or is_activation_quantizer(m) or hasattr(m, "output_quantizer"):
            return True
        return super().is_leaf_module(m, qualname)


def trace_quantized(model: nn.Module, purpose: str) -> fx.Graph:
    """The fx graph of a converted model with quantized layers and quantizers kept opaque.

    Shared by the lowering and the ONNX exporter, which walk the same graph;
    ``purpose`` names the caller in the one-line error for untraceable models.
    """
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises many types
        raise BitsweepError(f"cannot trace {type(model).__name__} for {purpose}: {e}") from None


def fixed_point(multiplier: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``multiplier ~= m0 * 2**-shift`` with the most bits of ``m0`` that keep ``bound * m0 < 2**53``.

    The precision depends only on the worst-case accumulator, never on data, so
    every batch is requantized with the same constants.
    """
    precision = min(31, 53 - max(int(bound), 1).bit_length())
    if precision < 8:
        raise BitsweepError(
            f"an accumulator of up to {bound} leaves under 8 bits for the requantization multiplier; reduce bit widths"
        )
    mant, exp = torch.frexp(multiplier.double().reshape(-1))  # multiplier = mant * 2**exp, mant in [0.5, 1)
    m0 = torch.round(mant * 2.0**precision).to(torch.int64)
    shift = precision - exp.to(torch.int64)
    if bool((shift < 1).any()):
        raise BitsweepError(f"a requantization multiplier of {float(multiplier.max()):.3g} is too large for fixed point")
    # Past a 62-bit shift every |acc * m0| < 2**53 rounds to 0: say so exactly (and keep int64 shifts defined).
    tiny = shift > 62
    return torch.where(tiny, 0, m0), torch.where(tiny, 1, shift)


def _grid_of(quantizer: nn.Module) -> Grid:
    spec = quantizer.spec
    z = int(quantizer.zero_point)
    if spec.binary:
        return Grid(float(quantizer.scale), -1, 1, True)
    return Grid(float(quantizer.scale), spec.qmin - z, spec.qmax - z)


def _grid_bound(value: float, quantizer: nn.Module) -> int:
    """The centered output-grid integer of a real clamp bound (quantized offline, fake-quant formula)."""
    g = _grid_of(quantizer)
    if math.isinf(value):
        return g.lo if value < 0 else g.hi
    inv = (1.0 / quantizer.scale.float()).item()
    q = torch.round(torch.tensor(value, dtype=torch.float32) * torch.tensor(inv, dtype=torch.float32))
    return int(min(max(int(q.item()), g.lo), g.hi))


_CLAMPS = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0)}
_CLAMP_FNS = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0)}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze"}


def clamp_bounds(m: nn.Module) -> tuple[float, float] | None:
    """Real bounds of a clamp-like module (ReLU, ReLU6, Hardtanh), else None."""
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return float(m.min_val), float(m.max_val)
    for cls, b in _CLAMPS.items():
        if isinstance(m, cls):
            return b
    return None


class _Lowering:
    """Walks the graph, tracks what each value is (float, Grid, Acc) and emits steps."""

    def __init__(self, model: nn.Module) -> None:
        self.mods = dict(model.named_modules())
        self.steps: list[Step] = []
        self.kinds: dict[str, Any] = {}
        self.inexact: list[str] = []
        self.count = 0

    def _new(self, base: str) -> str:
        self.count += 1
        return f"{base}#{self.count}"

    def to_grid(self, name: str, quantizer: nn.Module) -> str:
        """Emit what moves value ``name`` onto ``quantizer``'s grid; returns the new value's name."""
        v, g = self.kinds[name], _grid_of(quantizer)
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
        self, src: str, dst: str, scale: torch.Tensor, bound: int, dim: int, g: Grid, quantizer: nn.Module,
        lo: float = -math.inf, hi: float = math.inf,
    ) -> Requantize:  # fmt: skip
        m0, shift = fixed_point(scale / g.scale, bound)
        if g.binary:
            const = 1 if lo >= 0 else (-1 if hi < 0 else None)
            return Requantize(src, dst, m0, shift, -1, 1, dim, True, const)
        q_lo = max(g.lo, _grid_bound(lo, quantizer))
        q_hi = min(g.hi, _grid_bound(hi, quantizer))
        return Requantize(src, dst, m0, shift, q_lo, q_hi, dim)

    def weighted(self, target: str, m: nn.Module, name: str) -> str:
        if m.input_quantizer is not None:
            name = self.to_grid(name, m.input_quantizer)
        x = self.kinds[name]
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
            raise BitsweepError(f"layer '{target}': its accumulator (fan-in {fan_in}) may exceed 2**53; reduce bit widths")
        if sums >= FLOAT32_EXACT and isinstance(m, nn.Conv2d):
            self.inexact.append(target)
        dst = self._new(target)
        geometry = (m.stride, m.padding, m.dilation, m.groups) if isinstance(m, nn.Conv2d) else ()
        op = "conv" if isinstance(m, nn.Conv2d) else "linear"
        step = Accumulate(name, dst, op, w, bias, bound, sums, x.lo, x.hi, *geometry)
        self.steps.append(step)
        self.kinds[dst] = Acc(scale, bound, 4 if isinstance(m, nn.Conv2d) else 2)
        return self.to_grid(dst, m.output_quantizer) if m.output_quantizer is not None else dst

    def clamp(self, name: str, lo: float, hi: float) -> str:
        v = self.kinds[name]
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

    def quant_output(self, m: nn.Module, args: list[str], shape: torch.Size | None = None) -> str:
        if m.input_quantizers is not None:
            args = [a if isinstance(q, nn.Identity) else self.to_grid(a, q) for a, q in zip(args, m.input_quantizers)]
        inner, out_q = m.module, m.output_quantizer
        if out_q is None:
            raise BitsweepError(f"the integer lowering needs a quantized output after {type(inner).__name__}")
        bounds = clamp_bounds(inner)
        if bounds is not None:
            return self.to_grid(self.clamp(args[0], *bounds), out_q)
        if isinstance(inner, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            return self.to_grid(self.avgpool(inner, args[0], shape), out_q)
        if len(args) == 2 and type(inner).__name__ == "Add":
            return self.add(args, out_q)
        raise BitsweepError(f"the integer lowering does not support {type(inner).__name__} (see bitsweep.backend.lowering)")

    def avgpool(self, m: nn.Module, name: str, shape: torch.Size | None) -> str:
        v = self.kinds[name]
        if not isinstance(v, Grid):
            raise BitsweepError("the integer lowering supports average pooling of quantized values only")
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            if shape is None or len(shape) != 4:
                raise BitsweepError("the integer lowering needs the feature-map size before global average pooling")
            kernel = stride = None
            window = int(shape[-1] * shape[-2])
        elif isinstance(m, nn.AvgPool2d) and m.padding in (0, (0, 0)):
            kernel = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
            s = m.stride if m.stride is not None else kernel
            stride = s if isinstance(s, tuple) else (s, s)
            window = kernel[0] * kernel[1]
        else:
            raise BitsweepError(f"the integer lowering supports global average pooling and AvgPool2d, not {m}")
        dst = self._new(name)
        self.steps.append(PoolSum(name, dst, kernel, stride))
        self.kinds[dst] = Acc(torch.tensor([v.scale / window], dtype=torch.float64), v.amax * window, 4)
        return dst

    def add(self, args: list[str], out_q: nn.Module) -> str:
        a, b = (self.kinds[n] for n in args)
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



def _input_shapes(model: nn.Module, graph: fx.Graph, example: torch.Tensor) -> dict[str, torch.Size]:
    """Shape of the first input of every node, from one forward pass of the converted model on ``example``."""
    from torch.fx.passes.shape_prop import ShapeProp

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
    graph = trace_quantized(model, "integer lowering")
    try:
        shapes = _input_shapes(model, graph, example.float())
    except BitsweepError:
        raise
    except Exception as e:  # noqa: BLE001 - a wrong input shape surfaces deep inside a layer
        raise BitsweepError(f"the model does not run on inputs of shape {tuple(example.shape[1:])}: {e}") from None
    low = _Lowering(model)
    env: dict[fx.Node, str] = {}
    for node in graph.nodes:
        a = [env[n] if isinstance(n, fx.Node) else n for n in node.args]
        if node.op == "placeholder":
            env[node] = node.name
            low.kinds[node.name] = "float"
        elif node.op == "call_module":
            m = low.mods[str(node.target)]
            if is_weight_layer(m):
                env[node] = low.weighted(str(node.target), m, a[0])
            elif is_activation_quantizer(m):
                env[node] = low.to_grid(a[0], m)
            elif hasattr(m, "output_quantizer") and hasattr(m, "module"):
                env[node] = low.quant_output(m, a, shapes.get(node.name))
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                env[node] = a[0]
            elif isinstance(m, nn.Flatten):
                env[node] = _apply(low, a[0], ("flatten", m.start_dim, m.end_dim))
            elif isinstance(m, nn.MaxPool2d):
                op = ("maxpool", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
                env[node] = _apply(low, a[0], op)
            elif clamp_bounds(m) is not None:
                env[node] = low.clamp(a[0], *clamp_bounds(m))
            else:
                raise BitsweepError(f"the integer lowering does not support module {type(m).__name__} ('{node.target}')")
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            if any(isinstance(r, fx.Node) for r in node.args[1:]):
                raise BitsweepError(f"the integer lowering needs constant arguments to .{node.target}() (e.g. flatten(1))")
            env[node] = _apply(low, a[0], ("method", str(node.target), tuple(a[1:])))
        elif node.op == "call_function" and node.target is torch.flatten:
            start, end = (list(a[1:]) + [0, -1][len(a) - 1 :])[:2]
            env[node] = _apply(low, a[0], ("flatten", start, end))
        elif node.op == "call_function" and node.target in _CLAMP_FNS:
            env[node] = low.clamp(a[0], *_CLAMP_FNS[node.target])
        elif node.op == "output":
            v = low.kinds[a[0]]
            if isinstance(v, Grid):
                low.steps.append(Output(a[0], torch.tensor([v.scale], dtype=torch.float64)))
            elif isinstance(v, Acc):
                low.steps.append(Output(a[0], v.scale, v.lo, v.hi))
            else:
                raise BitsweepError("the model's output is not quantized or accumulated; nothing to lower")
            return Program(tuple(low.steps), tuple(low.inexact))
        else:
            name = getattr(node.target, "__name__", str(node.target))
            if node.target in (operator.add, torch.add):
                name = "functional add (use a quantized Add module)"
            raise BitsweepError(f"the integer lowering does not support {node.op} {name}")
    raise BitsweepError("the model graph has no output")


def _apply(low: _Lowering, name: str, op: tuple[Any, ...]) -> str:
    v = low.kinds[name]
    dst = low._new(name)
    low.steps.append(Apply(name, dst, op))
    low.kinds[dst] = v
    return dst
