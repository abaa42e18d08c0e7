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
* :class:`~bitsweep.quant.output.QuantOutput` (its own module) - wraps any other
  module (activation, pooling, residual ``Add``) as ``.module`` with
  ``.output_quantizer`` and optional ``.input_quantizers`` (one per positional
  input, or None). ``.fused`` is True when the wrapped clamp-like activation is
  skipped at inference because the quantizer's clamp makes it redundant.

Modes: after ``quantize_`` every quantizer is a no-op (the model computes what
the float model did); ``calibrate`` switches activation quantizers to observe;
``convert`` freezes qparams and computes the quantized weights once.

Seams for learned methods: a weight quantizer's integers come from its
rounding policy (:mod:`bitsweep.quant.rounding`, round-to-nearest by default)
or are set directly with ``set_integers``; ``make_trainable()`` turns a
quantizer's ``scale`` buffer into an ``nn.Parameter`` that fake-quant trains
with the LSQ gradient, and ``freeze()`` turns it back (same state-dict key).
Binary weights (1-bit) have integers -1/+1 and ``zero_point`` 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.quant.observers import ActivationStats, weight_qparams
from bitsweep.quant.primitives import (
    SCALE_EPS,
    dequantize,
    fake_quantize,
    fake_quantize_bias,
    fake_quantize_fast,
    fake_quantize_lsq,
    lsq_grad_scale,
)  # fmt: skip
from bitsweep.quant.rounding import RoundingPolicy, check_integers, rounding_policy
from bitsweep.quant.spec import QuantSpec

MODES = ("off", "observe", "quantize")


def _step_size(scale: torch.Tensor) -> torch.Tensor:
    """The grid step a trainable scale stands for: ``|scale|`` (at least ``SCALE_EPS``).

    A gradient step can push a small learned scale across zero. Its sign means nothing to the grid,
    so the magnitude is used and the gradient keeps flowing (a clamp at zero would freeze the channel
    with every weight on one level, and never let it recover).
    """
    return scale.abs().clamp(min=SCALE_EPS)


def _scale_to_parameter(module: ActivationQuantizer | WeightQuantizer) -> None:
    """Re-register ``module.scale`` as a trainable ``nn.Parameter`` (same name, so state dicts still load)."""
    if not isinstance(module.scale, nn.Parameter):
        value = module.scale.detach().clone().float()
        delattr(module, "scale")
        module.scale = nn.Parameter(value)


def _scale_to_buffer(module: ActivationQuantizer | WeightQuantizer) -> None:
    """Re-register a trainable ``module.scale`` as a plain buffer holding its learned value."""
    if isinstance(module.scale, nn.Parameter):
        value = _step_size(module.scale.detach().clone())
        delattr(module, "scale")
        module.register_buffer("scale", value)


def _assign_scale(module: ActivationQuantizer | WeightQuantizer, value: torch.Tensor) -> None:
    """Set ``module.scale`` to ``value`` whether it is a buffer or a trainable parameter."""
    if isinstance(module.scale, nn.Parameter):
        module.scale.data = value.detach().to(device=module.scale.device, dtype=torch.float32)
    else:
        module.scale = value


class ActivationQuantizer(nn.Module):
    """Fake-quantizes one activation tensor, per tensor, with frozen qparams after ``convert``."""

    scale: torch.Tensor  # a buffer, or an nn.Parameter while trainable
    zero_point: torch.Tensor

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
        self.lsq_grad_scale = True  # scale the step-size gradient by 1/sqrt(elements per image * qmax)
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self._fast: tuple[float, float, float, float] = (1.0, 1.0, float(spec.qmin), float(spec.qmax))

    @property
    def trainable(self) -> bool:
        """True while ``scale`` is an ``nn.Parameter`` learned with the LSQ gradient."""
        return isinstance(self.scale, nn.Parameter)

    def make_trainable(self, grad_scale: bool = True) -> nn.Parameter:
        """Turn ``scale`` into a parameter that fake-quant trains (LSQ); needs frozen qparams (``convert``).

        Args:
            grad_scale: multiply the step-size gradient by ``1 / sqrt(elements per image * qmax)``
                (the LSQ paper's scaling); False passes the plain gradient.

        Returns:
            The new ``scale`` parameter, for the optimizer.
        """
        if self.mode != "quantize":
            raise ValueError(f"the {self.site} quantizer has no qparams yet; calibrate and convert before training")
        _scale_to_parameter(self)
        self.lsq_grad_scale = grad_scale
        return self.scale  # type: ignore[return-value]

    def freeze(self) -> None:
        """Stop learning ``scale``: keep its learned value as a buffer and refresh the inference path."""
        _scale_to_buffer(self)
        self.refresh()

    def set_qparams(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Freeze ``spec``, ``scale`` and ``zero_point`` and switch to quantizing."""
        self.spec = spec
        _assign_scale(self, scale.detach().reshape(()).to(device=self.scale.device, dtype=torch.float32))
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
        if self.trainable:
            if not torch.is_grad_enabled():
                return fake_quantize(x, _step_size(self.scale.detach()), self.zero_point, self.spec)
            per_image = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
            g = lsq_grad_scale(per_image, self.spec) if self.lsq_grad_scale else 1.0
            return fake_quantize_lsq(x, _step_size(self.scale), self.zero_point, self.spec, g)
        if (x.requires_grad and torch.is_grad_enabled()) or x.dtype != torch.float32:
            return fake_quantize(x, self.scale, self.zero_point, self.spec)
        return fake_quantize_fast(x, *self._fast, inplace=self.inplace)

    def extra_repr(self) -> str:
        extra = ", trainable" if self.trainable else ""
        return f"site={self.site}, bits={self.spec.bits}, signed={self.spec.signed}, mode={self.mode}{extra}"


class WeightQuantizer(nn.Module):
    """Per-channel (or per-tensor) weight quantizer; integers computed once at ``convert``.

    Args:
        spec: the weight grid.
        observer: how to choose scale and zero_point (a name in ``OBSERVERS``).
        rounding: the rounding policy (a name in ``ROUNDING_POLICIES`` or a policy object).
        shape: the weight's shape, checked by :meth:`set_integers` when given.
    """

    scale: torch.Tensor  # a buffer, or an nn.Parameter while trainable
    zero_point: torch.Tensor
    q: torch.Tensor

    def __init__(
        self,
        spec: QuantSpec,
        observer: str = "minmax",
        rounding: RoundingPolicy | str = "nearest",
        shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.rounding: RoundingPolicy = rounding_policy(rounding) if isinstance(rounding, str) else rounding
        self.shape = None if shape is None else tuple(shape)
        self.lsq_grad_scale = True  # scale the step-size gradient by 1/sqrt(elements per channel * qmax)
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("q", torch.zeros(0, dtype=torch.int32))
        self.ste_scale: torch.Tensor | None = None  # the scale plain STE training last picked (weight_mode qat)

    @property
    def trainable(self) -> bool:
        """True while ``scale`` is an ``nn.Parameter`` learned with the LSQ gradient."""
        return isinstance(self.scale, nn.Parameter)

    @torch.no_grad()
    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        """Choose qparams for ``weight`` (a trainable scale keeps its learned value), store the integers
        the rounding policy picks, and return the dequantized weight."""
        if not self.trainable:
            scale, zero_point = weight_qparams(weight, self.spec, self.observer)
            self.scale = scale.to(weight.device)
            self.zero_point = zero_point.to(weight.device)
        else:
            self.scale.data = _step_size(self.scale.data)  # a trained step size may have crossed zero
        q = self.rounding(weight, self.scale.detach(), self.zero_point, self.spec)
        self.q = check_integers(q, self.scale.detach(), self.zero_point, self.spec, tuple(weight.shape))
        return self.dequantized().to(weight.dtype)

    @torch.no_grad()
    def set_integers(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store integers an algorithm chose (learned rounding, reconstruction) with their qparams.

        ``q`` must hold whole numbers in ``spec.qmin..spec.qmax`` shaped like the weight; ``scale`` and
        ``zero_point`` one entry per channel (per channel) or one (per tensor). Everything lands on ``q``'s
        device. The owning layer's ``set_integers`` also refreshes its cached dequantized weight.

        Raises:
            ValueError: saying which of those does not hold.
        """
        q32 = check_integers(q, scale, zero_point, self.spec, self.shape)
        shape = (-1,) if self.spec.per_channel and scale.numel() > 1 else ()
        _assign_scale(self, scale.detach().reshape(shape).to(device=q.device, dtype=torch.float32))
        self.zero_point = zero_point.detach().reshape(shape).round().to(device=q.device, dtype=torch.int32)
        self.q = q32.to(q.device)

    def make_trainable(self, grad_scale: bool = True) -> nn.Parameter:
        """Turn ``scale`` into a parameter that :meth:`fake_quantize` trains (LSQ); needs qparams (``convert``).

        Args:
            grad_scale: multiply the step-size gradient by ``1 / sqrt(elements per channel * qmax)``.

        Returns:
            The new ``scale`` parameter, for the optimizer.
        """
        if self.q.numel() == 0:
            raise ValueError("the weight quantizer has no qparams yet; convert (or set_integers) before training them")
        _scale_to_parameter(self)
        self.lsq_grad_scale = grad_scale
        return self.scale  # type: ignore[return-value]

    def freeze(self) -> None:
        """Stop learning ``scale``; its learned value stays (as a buffer)."""
        _scale_to_buffer(self)

    def dequantized(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` from the stored integers."""
        return dequantize(self.q, self.scale.detach(), self.zero_point, self.spec)

    def int_weight(self) -> torch.Tensor:
        """The integer weights (int32, same shape as the weight); empty before ``convert``."""
        return self.q

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fake-quant of a changing weight (for quantization-aware training).

        A trainable scale is used as it is and receives the LSQ gradient; otherwise the
        observer picks qparams from the current weight and only the weight gets a gradient.
        """
        if self.trainable:
            channels = weight.shape[self.spec.channel_axis] if self.spec.per_channel else 1
            g = lsq_grad_scale(weight.numel() // channels, self.spec) if self.lsq_grad_scale else 1.0
            return fake_quantize_lsq(weight, _step_size(self.scale), self.zero_point, self.spec, g)
        scale, zero_point = weight_qparams(weight, self.spec, self.observer)
        self.ste_scale = scale.detach().to(weight.device)
        return fake_quantize(weight, self.ste_scale, zero_point.to(weight.device), self.spec)

    def extra_repr(self) -> str:
        extra = ", trainable" if self.trainable else ""
        return f"bits={self.spec.bits}, granularity={self.spec.granularity}, observer={self.observer}{extra}"


class _QuantWeightMixin:
    """Shared state of quantized weight layers: weight quantizer, optional input/output quantizers."""

    weight: torch.Tensor
    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer | None
    output_quantizer: ActivationQuantizer | None
    weight_mode: str

    def _init_quant(self, spec: QuantSpec, observer: str) -> None:
        self.weight_quantizer = WeightQuantizer(spec, observer, shape=tuple(self.weight.shape))
        self.input_quantizer = None
        self.output_quantizer = None
        self.weight_mode = "off"  # off | quantize (frozen integers) | qat (fake-quant every step)
        self.register_buffer("weight_fq", None, persistent=False)  # type: ignore[attr-defined]
        # The quantizer whose grid this layer's input is on (a tuple, so it is not a submodule); see bind_bias_grid.
        self.bias_grid: tuple[ActivationQuantizer, ...] = ()

    def bind_bias_grid(self, input_grid: ActivationQuantizer | None) -> None:
        """Round the bias in forward as the integer program adds it: on the step ``input_grid.scale * weight scale``.

        Unbound (the default, and ``None``), forward adds the float bias, which differs from the integer
        program's by up to half an accumulator step per channel: noise after post-training quantization,
        but a 4-bit model *trained* on float biases loses points when they are rounded afterwards (see
        :func:`~bitsweep.quant.primitives.fake_quantize_bias`). :func:`bitsweep.quant.bias_grid.bind_bias_grids`
        finds every layer's input quantizer from the graph.
        """
        self.bias_grid = () if input_grid is None else (input_grid,)

    def convert_weight(self) -> None:
        """Quantize the weight once; forward then uses the cached dequantized weight."""
        self.weight_fq = self.weight_quantizer.compute(self.weight)
        self.weight_mode = "quantize"

    def refresh(self) -> None:
        """Rebuild the cached dequantized weight from loaded integer buffers."""
        self.weight_fq = self.weight_quantizer.dequantized().to(self.weight.dtype)
        self.weight_mode = "quantize"

    def set_integers(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Use integers an algorithm chose (see :meth:`WeightQuantizer.set_integers`); forward then uses them."""
        self.weight_quantizer.set_integers(q, scale, zero_point)
        self.refresh()

    def make_trainable(self, grad_scale: bool = True) -> nn.Parameter:
        """Learn the weight scale with LSQ: fake-quantize the weight every step (``weight_mode`` ``qat``).

        Quantizes the weight first when it has no qparams yet. Returns the scale parameter.
        """
        self.train_weight()
        return self.weight_quantizer.make_trainable(grad_scale)

    def train_weight(self) -> None:
        """Fake-quantize the weight every step with the straight-through gradient (``weight_mode`` ``qat``).

        Without :meth:`make_trainable` the observer re-picks the scale from the current weight each step
        (plain STE training); quantizes the weight first when it has no qparams yet.
        """
        if self.weight_quantizer.q.numel() == 0:
            self.convert_weight()
        self.weight_mode = "qat"

    def freeze(self) -> None:
        """Stop learning: keep the learned scale, pick the integers with it and use them (``weight_mode`` quantize)."""
        self.convert_weight()  # while the scale is still trainable, so the learned value is kept
        self.weight_quantizer.freeze()

    def int_weight(self) -> torch.Tensor:
        """The integer weights (int32), same as ``weight_quantizer.int_weight()``."""
        return self.weight_quantizer.int_weight()

    def _current_weight(self) -> torch.Tensor:
        if self.weight_mode == "quantize" and self.weight_fq is not None:
            return self.weight_fq
        if self.weight_mode == "qat":
            return self.weight_quantizer.fake_quantize(self.weight)
        return self.weight

    def _weight_step(self) -> torch.Tensor:
        """The weight grid's step (per channel or one) that the current weight is on."""
        wq = self.weight_quantizer
        if wq.trainable:
            return _step_size(wq.scale.detach())
        if self.weight_mode == "qat" and wq.ste_scale is not None:
            return wq.ste_scale
        return wq.scale

    def _current_bias(self) -> torch.Tensor | None:
        """The float bias, or with a bound input grid the bias the integer program adds (rounded on its grid)."""
        bias: torch.Tensor | None = getattr(self, "bias", None)
        if bias is None or not self.bias_grid or self.weight_mode == "off" or self.bias_grid[0].mode != "quantize":
            return bias
        source = self.bias_grid[0]
        s_in = _step_size(source.scale.detach()) if source.trainable else source.scale
        step = self._weight_step().double().reshape(-1) * s_in.double()  # the lowering's s_w * s_in, in float64
        return fake_quantize_bias(bias, step)

    def _io(
        self, x: torch.Tensor, compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    ) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self._current_weight()  # first: plain STE training picks the weight's scale here
        out = compute(x, weight, self._current_bias())
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is quantized (per output channel by default, depthwise included)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec, observer: str = "minmax") -> QuantConv2d:
        """Build from a float conv, sharing its parameters and keeping its device and dtype."""
        new = cls(  # nn.Conv2d stores its sizes as tuples of any length, its constructor types them as pairs
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
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
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,  # type: ignore[arg-type]
            self.groups, self.bias is not None, self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )  # fmt: skip
        conv.weight = nn.Parameter(self._current_weight().detach().clone())
        conv.bias = self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._io(x, self._conv_forward)


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
        return self._io(x, F.linear)
