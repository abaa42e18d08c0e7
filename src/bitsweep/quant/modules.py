"""Quantizer modules: what a prepared or converted model is made of.

Stable attributes that measurement and export read (and nothing else):

* :class:`ActivationQuantizer` - one per activation site. ``.spec`` (the
  effective :class:`QuantSpec`; after calibration ``signed`` is True exactly
  where the site held negative values), ``.scale`` (float32, 0-d) and
  ``.zero_point`` (int32, 0-d). ``.site`` names what it quantizes
  (``input``, ``activation``, ``add``, ``add_input``, ``pool``, ``output``).
* :class:`QuantConv2d` / :class:`QuantLinear` - subclasses of ``nn.Conv2d`` /
  ``nn.Linear`` with ``.weight_quantizer`` (:class:`WeightQuantizer`: ``.spec``,
  ``.scale`` and ``.zero_point`` of shape (C_out,) per channel or 0-d,
  ``int_weight()`` an int32 tensor shaped like the weight), an optional
  ``.input_quantizer`` (the network input, when this layer consumes it) and
  an optional ``.output_quantizer`` (outputs not followed by an activation).
  ``.weight`` stays the floating-point (BN-folded) weight; ``.bias`` is float.
* :class:`QuantOutput` - wraps any other module (activation, pooling,
  residual ``Add``) as ``.module`` with ``.output_quantizer`` and optional
  ``.input_quantizers`` (one per positional input, or None). ``.fused`` is True
  when the wrapped clamp-like activation is skipped at inference because the
  quantizer's clamp makes it redundant (exact; see :meth:`QuantOutput.try_fuse`).

Modes: after ``quantize_`` every quantizer is a no-op (the model computes what
the float model did); ``calibrate`` switches activation quantizers to observe;
``convert`` freezes qparams and computes the quantized weights once.
Binary weights (1-bit) have integers -1/+1 and ``zero_point`` 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.quant.observers import ActivationStats, weight_qparams
from bitsweep.quant.primitives import dequantize, fake_quantize, fake_quantize_fast, quantize
from bitsweep.quant.spec import QuantSpec

MODES = ("off", "observe", "quantize")


class ActivationQuantizer(nn.Module):
    """Fake-quantizes one activation tensor, per tensor, with frozen qparams after ``convert``."""

    def __init__(
        self, spec: QuantSpec, observer: str = "minmax", site: str = "activation", inplace: bool = False
    ) -> None:
        super().__init__()
        self.inplace = inplace  # overwrite the input in inference: only for tensors this quantizer owns
        self.spec = spec
        self.requested_spec = spec  # the configured spec; ``spec`` becomes the effective one at convert
        self.observer = observer
        self.site = site
        self.mode = "off"
        self.stats: ActivationStats | None = None
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self._fast: tuple[float, float, float, float] = (1.0, 1.0, float(spec.qmin), float(spec.qmax))

    def set_qparams(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Freeze ``spec``, ``scale`` and ``zero_point`` and switch to quantizing."""
        self.spec = spec
        self.scale = scale.detach().reshape(()).to(device=self.scale.device, dtype=torch.float32)
        self.zero_point = zero_point.detach().reshape(()).to(device=self.zero_point.device, dtype=torch.int32)
        self.refresh()
        self.mode = "quantize"

    def refresh(self) -> None:
        """Recompute the cached floats of the fast path from the buffers (after ``load_state_dict``)."""
        inv = (1.0 / self.scale.float()).item()  # float32 1/scale, as in the reference formula
        z = int(self.zero_point.item())
        self._fast = (inv, float(self.scale.item()), float(self.spec.qmin - z), float(self.spec.qmax - z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            if self.stats is None:
                self.stats = ActivationStats()
            self.stats.update(x)
            return x
        if self.mode != "quantize":
            return x
        if (x.requires_grad and torch.is_grad_enabled()) or x.dtype != torch.float32:
            return fake_quantize(x, self.scale, self.zero_point, self.spec)
        return fake_quantize_fast(x, *self._fast, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"site={self.site}, bits={self.spec.bits}, signed={self.spec.signed}, mode={self.mode}"


class WeightQuantizer(nn.Module):
    """Per-channel (or per-tensor) weight quantizer; integers computed once at ``convert``."""

    def __init__(self, spec: QuantSpec, observer: str = "minmax") -> None:
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("q", torch.zeros(0, dtype=torch.int32))

    @torch.no_grad()
    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        """Choose qparams for ``weight``, store its integers, and return the dequantized weight."""
        scale, zero_point = weight_qparams(weight, self.spec, self.observer)
        self.scale = scale.to(weight.device)
        self.zero_point = zero_point.to(weight.device)
        self.q = quantize(weight, self.scale, self.zero_point, self.spec)
        return self.dequantized().to(weight.dtype)

    def dequantized(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` from the stored integers."""
        return dequantize(self.q, self.scale, self.zero_point, self.spec)

    def int_weight(self) -> torch.Tensor:
        """The integer weights (int32, same shape as the weight); empty before ``convert``."""
        return self.q

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fake-quant of a changing weight (for quantization-aware training)."""
        scale, zero_point = weight_qparams(weight, self.spec, self.observer)
        return fake_quantize(weight, scale.to(weight.device), zero_point.to(weight.device), self.spec)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, granularity={self.spec.granularity}, observer={self.observer}"


class _QuantWeightMixin:
    """Shared state of quantized weight layers: weight quantizer, optional input/output quantizers."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer | None
    output_quantizer: ActivationQuantizer | None
    weight_mode: str

    def _init_quant(self, spec: QuantSpec, observer: str) -> None:
        self.weight_quantizer = WeightQuantizer(spec, observer)
        self.input_quantizer = None
        self.output_quantizer = None
        self.weight_mode = "off"  # off | quantize (frozen integers) | qat (fake-quant every step)
        self.register_buffer("weight_fq", None, persistent=False)  # type: ignore[attr-defined]

    def convert_weight(self) -> None:
        """Quantize the weight once; forward then uses the cached dequantized weight."""
        self.weight_fq = self.weight_quantizer.compute(self.weight)
        self.weight_mode = "quantize"

    def refresh(self) -> None:
        """Rebuild the cached dequantized weight from loaded integer buffers."""
        self.weight_fq = self.weight_quantizer.dequantized().to(self.weight.dtype)
        self.weight_mode = "quantize"

    def int_weight(self) -> torch.Tensor:
        """The integer weights (int32), same as ``weight_quantizer.int_weight()``."""
        return self.weight_quantizer.int_weight()

    def _current_weight(self) -> torch.Tensor:
        if self.weight_mode == "quantize" and self.weight_fq is not None:
            return self.weight_fq
        if self.weight_mode == "qat":
            return self.weight_quantizer.fake_quantize(self.weight)
        return self.weight

    def _io(self, x: torch.Tensor, compute) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        out = compute(x, self._current_weight())
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is quantized (per output channel by default, depthwise included)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec, observer: str = "minmax") -> QuantConv2d:
        """Build from a float conv, sharing its parameters and keeping its device and dtype."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        new.weight = conv.weight
        new.bias = conv.bias
        new._init_quant(spec, observer)
        new.train(conv.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the current (dequantized when converted) weight."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )  # fmt: skip
        conv.weight = nn.Parameter(self._current_weight().detach().clone())
        conv.bias = self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._io(x, lambda t, w: self._conv_forward(t, w, self.bias))


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` whose weight is quantized per output feature by default."""

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec, observer: str = "minmax") -> QuantLinear:
        """Build from a float linear layer, sharing its parameters and keeping its device and dtype."""
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )  # fmt: skip
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_quant(spec, observer)
        new.train(linear.training)
        return new

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the current (dequantized when converted) weight."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
        lin.weight = nn.Parameter(self._current_weight().detach().clone())
        lin.bias = self.bias
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._io(x, lambda t, w: F.linear(t, w, self.bias))


@torch.no_grad()
def clamp_bounds(module: nn.Module) -> tuple[float, float] | None:
    """(a, b) if ``module(x) == clamp(x, a, b)`` on a probe of values from -1e4 to 1e4, else None."""
    if list(module.parameters()) or list(module.buffers()):
        return None
    x = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.linspace(-20, 20, 4001)])
    try:
        y = module(x.clone())
        a, b = module(torch.tensor([-1e6])).item(), module(torch.tensor([1e6])).item()
    except Exception:  # noqa: BLE001 - not an elementwise activation of a 1-d tensor
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not a < b:
        return None
    return (a, b) if torch.equal(y, x.clamp(a, b)) else None


class QuantOutput(nn.Module):
    """Wraps a module whose output (and optionally inputs) an integer deployment holds."""

    def __init__(
        self,
        module: nn.Module,
        output_quantizer: ActivationQuantizer | None,
        input_quantizers: list[ActivationQuantizer | None] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.output_quantizer = output_quantizer
        self.input_quantizers = (
            nn.ModuleList([q if q is not None else nn.Identity() for q in input_quantizers])
            if input_quantizers
            else None
        )
        self.fused = False  # set by try_fuse(): skip a clamp-like activation the quantizer's clamp subsumes

    @torch.no_grad()
    def try_fuse(self) -> bool:
        """Skip the wrapped activation at inference when that is exact, and say whether it is.

        A clamp-like activation (``f(x) == clamp(x, a, b)``: ReLU, ReLU6, Hardtanh;
        found by probing, not by class) is redundant when every value it clips
        already lands on the quantizer's lowest/highest level:
        ``round(a / scale) <= qmin - zp`` and ``round(b / scale) >= qmax - zp``.
        Then ``fake_quant(f(x)) == fake_quant(x)`` bit for bit, and one
        elementwise pass per activation is saved.
        """
        q = self.output_quantizer
        self.fused = False
        if q is None or self.input_quantizers is not None or q.mode != "quantize" or q.site != "activation":
            return False
        bounds = clamp_bounds(self.module)
        if bounds is not None:
            inv, _, lo, hi = q._fast
            a, b = (torch.round(torch.tensor(v, dtype=torch.float32) * inv).item() for v in bounds)
            self.fused = a <= lo and b >= hi
        return self.fused

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        q = self.output_quantizer
        if self.fused and q is not None and q.mode == "quantize" and len(args) == 1 and not (
            args[0].requires_grad and torch.is_grad_enabled()
        ) and args[0].dtype == torch.float32:
            return fake_quantize_fast(args[0], *q._fast)  # never in place: the input may have other readers
        if self.input_quantizers is not None:
            qs = list(self.input_quantizers)
            args = tuple(qs[i](a) if i < len(qs) else a for i, a in enumerate(args))
        out = self.module(*args)
        return self.output_quantizer(out) if self.output_quantizer is not None else out

    def to_float(self) -> nn.Module:
        """The wrapped float module."""
        return self.module
