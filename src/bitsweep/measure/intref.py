"""Integer reference executor: the converted model computed with integers only, as a deployment would.

Fake-quant simulation computes in float32 on dequantized values. A real
integer runtime never does: it multiplies integer activations by integer
weights, accumulates in wide integers, adds integer biases and rescales with
an integer multiplier and a shift. This module runs the converted model that
way, so the simulated accuracy can be checked against real integer math.

Arithmetic (per op of the traced graph):

* network input: quantized once with the model's input quantizer (the only float -> int step);
* Conv2d (plain, depthwise, grouped) / Linear: ``acc = sum((q_x - z_x) * (q_w - z_w)) + round(b / (s_x s_w))``
  exactly in int64 (computed with float32 convolution when ``max|x| max|w| fan_in < 2**24``
  and float64 otherwise: integer sums are exact in floating point below those bounds, which are checked);
* requantization to the next quantizer ``(s_o, z_o)``: the real multiplier
  ``M = s_x s_w / s_o`` (per output channel) becomes ``M0 * 2**-shift`` with an
  integer ``M0`` of up to 31 bits (fewer when the accumulator is wide, so
  ``acc * M0`` fits int64 - this is what 16-bit needs), then
  ``q = clamp(((acc * M0) + 2**(shift-1)) >> shift + z_o, qmin, qmax)``;
* ReLU / ReLU6 / Hardtanh: clamps folded into the requantization (bounds quantized on the output grid);
* residual add: both inputs rescaled to the output grid with 30-bit fixed-point multipliers, summed, shifted once;
* average pooling (global or ``AvgPool2d``): integer sum, then requantization by ``s_in / (s_out * window)``;
  max pooling, flatten, reshape, dropout and identity act on the integers directly;
* the logits: the final accumulator (or grid) times its scale, in float.

Not supported (raises BitsweepError naming the op): binary (1-bit signed)
activations, activations other than ReLU/ReLU6/Hardtanh (SiLU, Hardswish need
lookup tables), functional adds/concatenations outside a quantized ``Add``
module, unquantized layers left in floating point, and models fx cannot trace.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.measure._modules import is_activation_quantizer, is_weight_layer

_EXACT = 2**53


@dataclass
class _Q:
    """Integers on a grid: real value = (q - zp) * scale."""

    q: torch.Tensor  # int64
    scale: float
    zp: int


@dataclass
class _Acc:
    """Wide accumulator with one scale per channel (dim 1) and a pending clamp in real units."""

    acc: torch.Tensor  # int64 (N, C, ...)
    scale: torch.Tensor  # float64 (C,)
    lo: float = -math.inf
    hi: float = math.inf


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_weight_layer(m) or is_activation_quantizer(m) or hasattr(m, "output_quantizer"):
            return True
        return super().is_leaf_module(m, qualname)


def trace_quantized(model: nn.Module, purpose: str) -> fx.Graph:
    """The fx graph of a converted model with quantized layers and quantizers kept opaque.

    Shared by the integer reference and the ONNX exporter, which walk the same
    graph; ``purpose`` names the caller in the one-line error for untraceable models.
    """
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises many types
        raise BitsweepError(f"cannot trace {type(model).__name__} for {purpose}: {e}") from None


def _quantize_float(x: torch.Tensor, quantizer: nn.Module) -> _Q:
    from bitsweep.quant.primitives import quantize

    spec = quantizer.spec
    if spec.binary:
        raise BitsweepError("the integer reference does not support binary (1-bit signed) activations")
    q = quantize(x.float(), quantizer.scale, quantizer.zero_point, spec).to(torch.int64)
    return _Q(q, float(quantizer.scale), int(quantizer.zero_point))


def _grid_bound(value: float, quantizer: nn.Module) -> int:
    """The output-grid integer of a real clamp bound (quantized once, offline)."""
    spec = quantizer.spec
    if math.isinf(value):
        return spec.qmin if value < 0 else spec.qmax
    return int(_quantize_float(torch.tensor([value]), quantizer).q.item())


def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector (C,) so it broadcasts along dim 1 of ``like``."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2))) if t.numel() > 1 else t.reshape(())


def _requant(acc: torch.Tensor, multiplier: torch.Tensor, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(acc * multiplier) + zp)`` with an integer multiplier and shift per channel."""
    amax = int(acc.abs().max().item()) if acc.numel() else 0
    precision = max(8, min(31, 62 - amax.bit_length()))
    mult = multiplier.double().reshape(-1)
    mant, exp = torch.frexp(mult)  # mult = mant * 2**exp, mant in [0.5, 1)
    m0 = torch.round(mant * 2.0**precision).to(torch.int64)  # <= 2**precision
    shift = precision - exp.to(torch.int64)
    m0, shift = _channel(m0, acc), _channel(shift, acc)
    prod = acc * m0
    right = torch.clamp(shift, min=1)
    out = torch.where(
        shift > 0,
        (prod + (torch.ones_like(prod) << (right - 1))) >> right,
        prod << torch.clamp(-shift, min=0),
    )
    return torch.clamp(out + zp, qmin, qmax)


def _to_grid(v: _Q | _Acc | torch.Tensor, quantizer: nn.Module) -> _Q:
    """Move any value onto the grid of ``quantizer`` (quantize, requantize, or rescale)."""
    spec = quantizer.spec
    if isinstance(v, torch.Tensor):
        return _quantize_float(v, quantizer)
    if spec.binary:
        raise BitsweepError("the integer reference does not support binary (1-bit signed) activations")
    s_o, z_o = float(quantizer.scale), int(quantizer.zero_point)
    lo, hi = spec.qmin, spec.qmax
    if isinstance(v, _Acc):
        lo, hi = max(lo, _grid_bound(v.lo, quantizer)), min(hi, _grid_bound(v.hi, quantizer))
        return _Q(_requant(v.acc, v.scale / s_o, z_o, lo, hi), s_o, z_o)
    if v.scale == s_o and v.zp == z_o:
        return _Q(torch.clamp(v.q, lo, hi), s_o, z_o)
    return _Q(_requant(v.q - v.zp, torch.tensor([v.scale / s_o]), z_o, lo, hi), s_o, z_o)


def _weighted(m: nn.Module, x: _Q) -> _Acc:
    wq = m.weight_quantizer
    w = wq.int_weight().to(torch.int64)
    s_w = wq.scale.double().reshape(-1).expand(w.shape[0]) if wq.scale.numel() == 1 else wq.scale.double()
    z_w = wq.zero_point.to(torch.int64).reshape(-1)
    w = w - (z_w.reshape(-1, *([1] * (w.dim() - 1))) if z_w.numel() > 1 else z_w.reshape(()))
    fan_in = w[0].numel()
    bound = max(int((x.q - x.zp).abs().max()), 1) * max(int(w.abs().max()), 1) * fan_in
    if bound >= _EXACT:
        raise BitsweepError(f"accumulator of layer with fan-in {fan_in} may exceed 2**53; reduce bit widths")
    # Integer sums computed in floating point are exact while every partial sum is an integer below
    # 2**24 (float32) or 2**53 (float64) in magnitude; ``bound`` guarantees that, so use the fast type that is exact.
    dtype = torch.float32 if bound < 2**24 else torch.float64
    xi = (x.q - x.zp).to(dtype)
    if isinstance(m, nn.Conv2d):
        acc = F.conv2d(xi, w.to(dtype), None, m.stride, m.padding, m.dilation, m.groups)
    else:
        acc = F.linear(xi, w.to(dtype))
    scale = s_w * x.scale  # (C_out,)
    acc = acc.round().to(torch.int64)
    if m.bias is not None:
        b = torch.round(m.bias.detach().double() / scale).to(torch.int64)
        acc = acc + _channel(b, acc)
    return _Acc(acc, scale)


def _avgpool(m: nn.Module, v: _Q | _Acc) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer window sums and the per-channel scale of one summed unit (scale / window)."""
    t = (v.q - v.zp) if isinstance(v, _Q) else v.acc
    scale = torch.tensor([v.scale], dtype=torch.float64) if isinstance(v, _Q) else v.scale
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        window = t.shape[-1] * t.shape[-2]
        s = t.sum(dim=(-2, -1), keepdim=True)
    elif isinstance(m, nn.AvgPool2d) and m.padding in (0, (0, 0)):
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
        window = k[0] * k[1]
        s = (F.avg_pool2d(t.double(), m.kernel_size, m.stride) * window).round().to(torch.int64)
    else:
        raise BitsweepError(f"the integer reference supports global average pooling and AvgPool2d, not {m}")
    return s, scale / window


_CLAMPS = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0)}
_CLAMP_FNS = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0)}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze"}


def _clamp_bounds(m: nn.Module) -> tuple[float, float] | None:
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return float(m.min_val), float(m.max_val)
    for cls, b in _CLAMPS.items():
        if isinstance(m, cls):
            return b
    return None


def _clamp(v: Any, lo: float, hi: float) -> Any:
    if isinstance(v, _Acc):
        return _Acc(v.acc, v.scale, max(v.lo, lo), min(v.hi, hi))
    if isinstance(v, _Q):  # clamp on the input grid; exact because quantization is monotone
        q_lo = v.zp + (math.ceil(lo / v.scale) if not math.isinf(lo) else -(2**62))
        q_hi = v.zp + (math.floor(hi / v.scale) if not math.isinf(hi) else 2**62)
        return _Q(torch.clamp(v.q, q_lo, q_hi), v.scale, v.zp)
    raise BitsweepError("the integer reference met a float tensor where integers were expected")


def _shape_op(v: Any, fn: Any) -> Any:
    if isinstance(v, _Q):
        return _Q(fn(v.q), v.scale, v.zp)
    if isinstance(v, _Acc):
        return _Acc(fn(v.acc), v.scale, v.lo, v.hi)
    return fn(v)


def _quant_output(m: nn.Module, args: list[Any]) -> Any:
    if m.input_quantizers is not None:
        args = [a if isinstance(q, nn.Identity) else _to_grid(a, q) for a, q in zip(args, m.input_quantizers)]
    inner, out_q = m.module, m.output_quantizer
    if out_q is None:
        raise BitsweepError(f"the integer reference needs a quantized output after {type(inner).__name__}")
    bounds = _clamp_bounds(inner)
    if bounds is not None:
        return _to_grid(_clamp(args[0], *bounds), out_q)
    if isinstance(inner, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        s, unit = _avgpool(inner, args[0])
        return _to_grid(_Acc(s, unit.expand(s.shape[1]) if unit.numel() == 1 else unit), out_q)
    if len(args) == 2 and all(isinstance(a, _Q) for a in args) and type(inner).__name__ == "Add":
        a, b = args
        s_o = float(out_q.scale)
        prec = 30 - max(0, max(int((a.q - a.zp).abs().max()), int((b.q - b.zp).abs().max())).bit_length() - 24)
        ma, mb = round(a.scale / s_o * 2**prec), round(b.scale / s_o * 2**prec)
        total = (a.q - a.zp) * ma + (b.q - b.zp) * mb
        q = ((total + (1 << (prec - 1))) >> prec) + int(out_q.zero_point)
        return _Q(torch.clamp(q, out_q.spec.qmin, out_q.spec.qmax), s_o, int(out_q.zero_point))
    raise BitsweepError(f"the integer reference does not support {type(inner).__name__} (see bitsweep.measure.intref)")


@torch.no_grad()
def run_integer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of the converted ``model`` on ``x`` computed with integer arithmetic.

    Raises:
        BitsweepError: for an op the reference does not support (see the module docstring).
    """
    graph = trace_quantized(model, "the integer reference")
    mods = dict(model.named_modules())
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        a = [env[n] if isinstance(n, fx.Node) else n for n in node.args]
        if node.op == "placeholder":
            env[node] = x.cpu().float()
        elif node.op == "call_module":
            m = mods[str(node.target)]
            if is_weight_layer(m):
                v = a[0]
                if m.input_quantizer is not None:
                    v = _to_grid(v, m.input_quantizer)
                if not isinstance(v, _Q):
                    raise BitsweepError(f"layer '{node.target}' receives values that are not quantized")
                out: Any = _weighted(m, v)
                env[node] = _to_grid(out, m.output_quantizer) if m.output_quantizer is not None else out
            elif is_activation_quantizer(m):
                env[node] = _to_grid(a[0], m)
            elif hasattr(m, "output_quantizer") and hasattr(m, "module"):
                env[node] = _quant_output(m, a)
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                env[node] = a[0]
            elif isinstance(m, nn.Flatten):
                env[node] = _shape_op(a[0], lambda t, m=m: t.flatten(m.start_dim, m.end_dim))
            elif isinstance(m, nn.MaxPool2d):
                env[node] = _shape_op(a[0], lambda t, m=m: m(t.double()).to(torch.int64))
            elif _clamp_bounds(m) is not None:
                env[node] = _clamp(a[0], *_clamp_bounds(m))
            else:
                raise BitsweepError(f"the integer reference does not support module {type(m).__name__} ('{node.target}')")
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            rest = a[1:]
            env[node] = _shape_op(a[0], lambda t, n=node.target, r=rest: getattr(t, n)(*r))
        elif node.op == "call_function" and node.target in (torch.flatten,):
            env[node] = _shape_op(a[0], lambda t, r=a[1:]: torch.flatten(t, *r))
        elif node.op == "call_function" and node.target in _CLAMP_FNS:
            env[node] = _clamp(a[0], *_CLAMP_FNS[node.target])
        elif node.op == "output":
            v = a[0]
            if isinstance(v, _Q):
                return ((v.q - v.zp).double() * v.scale).float()
            if isinstance(v, _Acc):
                return (v.acc.double() * _channel(v.scale, v.acc)).clamp(v.lo, v.hi).float()
            return v
        else:
            name = getattr(node.target, "__name__", str(node.target))
            if node.target in (operator.add, torch.add):
                name = "functional add (use a quantized Add module)"
            raise BitsweepError(f"the integer reference does not support {node.op} {name}")
    raise BitsweepError("the model graph has no output")


@dataclass(frozen=True)
class Agreement:
    """How closely the integer reference matches the fake-quant simulation."""

    images: int
    top1_agreement: float  # percent of images where both predict the same class
    max_logit_diff: float
    mean_abs_logit_diff: float
    simulated_top1: float | None  # percent correct, when labels were given
    integer_top1: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


@torch.no_grad()
def compare(model: nn.Module, batches: Any, max_batches: int | None = None) -> Agreement:
    """Run the simulation and the integer reference on the same images and compare.

    Args:
        model: a converted quantized model (on CPU).
        batches: an iterable of image tensors or ``(images, labels)`` pairs (normalized float).
        max_batches: stop after this many batches.
    """
    model.eval()
    n = agree = sim_ok = int_ok = 0
    labelled = True
    max_diff = sum_diff = 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x.cpu().float()
        sim = model(x).float()
        ref = run_integer(model, x)
        diff = (sim - ref).abs()
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.mean()) * x.shape[0]
        agree += int((sim.argmax(1) == ref.argmax(1)).sum())
        if y is None:
            labelled = False
        else:
            y = y.cpu()
            sim_ok += int((sim.argmax(1) == y).sum())
            int_ok += int((ref.argmax(1) == y).sum())
        n += x.shape[0]
    if n == 0:
        raise BitsweepError("no images to compare; give at least one batch")
    return Agreement(
        images=n,
        top1_agreement=100.0 * agree / n,
        max_logit_diff=max_diff,
        mean_abs_logit_diff=sum_diff / n,
        simulated_top1=100.0 * sim_ok / n if labelled else None,
        integer_top1=100.0 * int_ok / n if labelled else None,
    )
