"""QuantConfig: the whole quantization recipe as one frozen value.

Defaults follow integer deployments: weights signed, symmetric, per output
channel (narrow range, so 2 bits are ternary {-1, 0, +1}); activations
asymmetric, per tensor, unsigned where they never go negative and signed
where they do (the network input, residual sums; decided at calibration).
Per-layer overrides match module names with fnmatch patterns, first match wins.

>>> cfg = QuantConfig.from_bits(4, 8, overrides=(LayerOverride("features.0*", weight_bits=8),))
>>> cfg.weight.bits, cfg.activation.bits, cfg.spec_for("features.0.0").bits, cfg.spec_for("classifier.1").bits
(4, 8, 8, 4)
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from bitsweep.quant.methods import check_method
from bitsweep.quant.observers import check_observer
from bitsweep.quant.scale_dtype import check_scale_dtype
from bitsweep.quant.spec import GRANULARITIES, QuantSpec, check_bits


def split_observers(text: str) -> tuple[str, str]:
    """``'mse'`` -> ``('mse', 'mse')``; ``'mse/minmax'`` -> weights ``mse``, activations ``minmax``.

    >>> split_observers("mse/minmax")
    ('mse', 'minmax')
    >>> split_observers("percentile")
    ('percentile', 'percentile')
    """
    parts = str(text).split("/")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise ValueError(
            f"observer {text!r} must be one name (minmax, moving_average, percentile, mse) for weights and "
            "activations, or two as WEIGHTS/ACTIVATIONS such as mse/minmax"
        )
    weights, activations = parts[0].strip(), parts[-1].strip()
    return weights, activations


def weight_spec(bits: int, granularity: str = "per_channel") -> QuantSpec:
    """The default weight spec: signed symmetric, narrow range (ternary at 2 bits), per channel."""
    check_bits(bits, "weight bits")
    return QuantSpec(bits, signed=True, symmetric=True, narrow_range=bits > 1, granularity=granularity)


def activation_spec(bits: int) -> QuantSpec:
    """The default activation spec: asymmetric, per tensor, unsigned until calibration sees negatives."""
    check_bits(bits, "activation bits")
    return QuantSpec(bits, signed=False, symmetric=False, granularity="per_tensor")


@dataclass(frozen=True)
class LayerOverride:
    """Different treatment for modules whose name matches ``pattern`` (fnmatch, e.g. ``features.0*``).

    Attributes:
        pattern: fnmatch pattern on module names as ``model.named_modules()`` gives them.
        weight_bits / weight: new weight bit width or full spec (spec wins).
        activation_bits / activation: new bit width or spec for the output quantizer of matching modules.
        skip: leave matching layers in floating point.
    """

    pattern: str
    weight_bits: int | None = None
    activation_bits: int | None = None
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError("override pattern must be a non-empty module-name pattern such as 'features.0*'")
        if self.weight_bits is not None:
            check_bits(self.weight_bits, f"weight bits of override '{self.pattern}'")
        if self.activation_bits is not None:
            check_bits(self.activation_bits, f"activation bits of override '{self.pattern}'")

    def matches(self, name: str) -> bool:
        """True when ``name`` matches the pattern."""
        return fnmatch.fnmatchcase(name, self.pattern)

    @classmethod
    def parse(cls, text: str) -> LayerOverride:
        """Parse ``'PATTERN=W,A'``, ``'PATTERN=W'``, ``'PATTERN=,A'`` or ``'PATTERN=skip'`` (CLI syntax).

        >>> LayerOverride.parse("classifier*=8,8")
        LayerOverride(pattern='classifier*', weight_bits=8, activation_bits=8, weight=None, activation=None, skip=False)
        """
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"override {text!r} must look like PATTERN=W,A (e.g. 'features.0*=8,8') or PATTERN=skip")
        if value.strip().lower() in ("skip", "fp", "float"):
            return cls(pattern, skip=True)
        parts = [p.strip() for p in value.split(",")]
        if len(parts) > 2:
            raise ValueError(f"override {text!r}: give at most two bit widths, weight and activation (W,A)")

        def _bits(p: str) -> int | None:
            if not p:
                return None
            try:
                return int(p)
            except ValueError:
                raise ValueError(f"override {text!r}: bit widths must be whole numbers from 1 to 16") from None

        return cls(pattern, weight_bits=_bits(parts[0]), activation_bits=_bits(parts[1]) if len(parts) > 1 else None)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize, to how many bits, and how to pick the ranges.

    Attributes:
        weight: spec of Conv2d/Linear weights, or None to keep weights in floating point.
        activation: spec of activation quantizers, or None for weight-only quantization.
        weight_observer / activation_observer: one of ``minmax``, ``moving_average``, ``percentile``, ``mse``.
        fold_bn: fold BatchNorm into the preceding conv before quantizing weights (what deployments do).
        overrides: per-layer changes, first matching pattern wins.
        method: the post-training method :func:`bitsweep.quant.ptq` applies (a name in
            ``bitsweep.quant.methods.PTQ_METHODS``; ``rtn`` is round-to-nearest).
        scale_dtype: ``float32`` or ``float16``: the grid conversion puts weight scales and biases on,
            and the dtype the packed file stores them in (``float16`` halves those bytes, exactly:
            see :mod:`bitsweep.quant.scale_dtype`).
    """

    weight: QuantSpec | None = dataclasses.field(default_factory=lambda: weight_spec(8))
    activation: QuantSpec | None = dataclasses.field(default_factory=lambda: activation_spec(8))
    weight_observer: str = "minmax"
    activation_observer: str = "minmax"
    fold_bn: bool = True
    overrides: tuple[LayerOverride, ...] = ()
    method: str = "rtn"
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_method(self.method)
        check_scale_dtype(self.scale_dtype)
        check_observer(self.weight_observer)
        check_observer(self.activation_observer)
        if self.activation is not None and self.activation.per_channel:
            raise ValueError("activation quantization is per tensor; use granularity='per_tensor' for activations")
        if not isinstance(self.overrides, tuple):
            object.__setattr__(self, "overrides", tuple(self.overrides))

    @classmethod
    def from_bits(
        cls,
        weight_bits: int | None,
        activation_bits: int | None,
        granularity: str = "per_channel",
        observer: str = "minmax",
        *,
        activation_observer: str | None = None,
        fold_bn: bool = True,
        overrides: tuple[LayerOverride, ...] = (),
        method: str = "rtn",
        scale_dtype: str = "float32",
    ) -> QuantConfig:
        """The usual recipe from bit widths (None keeps that part in floating point).

        ``observer`` names one observer for weights and activations, or two as ``WEIGHTS/ACTIVATIONS``
        (``mse/minmax``: MSE weight scales, min-max activation ranges), the form every command's
        ``--observer`` takes; ``activation_observer``, when given, is the activations' one.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        weight_observer, split_activation = split_observers(observer)
        if activation_observer is not None and "/" in str(observer):
            raise ValueError(f"observer {observer!r} already names the activation observer; drop one of the two")
        return cls(
            weight=None if weight_bits is None else weight_spec(weight_bits, granularity),
            activation=None if activation_bits is None else activation_spec(activation_bits),
            weight_observer=weight_observer,
            activation_observer=activation_observer or split_activation,
            fold_bn=fold_bn,
            overrides=tuple(overrides),
            method=method,
            scale_dtype=scale_dtype,
        )

    def override_for(self, name: str) -> LayerOverride | None:
        """The first override whose pattern matches ``name``."""
        return next((o for o in self.overrides if o.matches(name)), None)

    def spec_for(self, name: str) -> QuantSpec | None:
        """Weight spec of the layer ``name`` after overrides (None: keep it in floating point)."""
        o = self.override_for(name)
        if o is not None:
            if o.skip:
                return None
            if o.weight is not None:
                return o.weight
            if o.weight_bits is not None:
                base = self.weight or weight_spec(o.weight_bits)
                return dataclasses.replace(base, bits=o.weight_bits, narrow_range=base.signed and o.weight_bits > 1)
        return self.weight

    def activation_spec_for(self, name: str) -> QuantSpec | None:
        """Spec of the activation quantizer attached to module ``name`` (or graph node ``name``)."""
        o = self.override_for(name)
        if o is not None:
            if o.skip:
                return None
            if o.activation is not None:
                return o.activation
            if o.activation_bits is not None:
                base = self.activation or activation_spec(o.activation_bits)
                return dataclasses.replace(base, bits=o.activation_bits)
        return self.activation
