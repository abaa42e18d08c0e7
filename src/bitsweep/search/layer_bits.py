"""The per-layer bit-width plan: which weight layer and which activation site gets how many bits.

A plan is the search's answer and the file users hand to other commands, so it
must mean exactly one thing: every name in it is matched *exactly* (never as a
pattern) against the names :func:`bitsweep.quant.quantize_` uses when it places
quantizers, and a name the model does not have is refused instead of silently
doing nothing.

Names, as ``quantize_`` looks them up in ``QuantConfig``:

* weight layers: the Conv2d/Linear module name (``features.0.0``);
* activation sites: the module that owns the quantizer, i.e. the quantizer's module
  name without ``.input_quantizer`` / ``.output_quantizer`` / ``.input_quantizers.N``
  (``features.0.2`` for a wrapped ReLU6, ``features.1.conv.1.0`` for a conv's output,
  ``features.0.0`` for the network input feeding the first conv), or the inserted
  module name for functional ops (``quant_add_add_1``). One name may cover several
  quantizers (an add's inputs and output); they all get the same bits.

>>> plan = LayerBits(weight_bits=4, weights={"features.0.0": 8})
>>> cfg = plan.to_quant_config()
>>> cfg.spec_for("features.0.0").bits, cfg.spec_for("features.0.00").bits, cfg.activation_spec_for("x").bits
(8, 4, 8)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.io import write_text_atomic
from bitsweep.quant import LayerOverride, QuantConfig, quantize_
from bitsweep.quant.inspect import activation_quantizers, weight_layers
from bitsweep.quant.scale_dtype import check_scale_dtype

FORMAT = "bitsweep-layer-bits"
VERSION = 1
_KEYS = {"format", "version", "weight_bits", "activation_bits", "weights", "activations", "scale_dtype"}
_SUFFIX = re.compile(r"\.(input_quantizer|output_quantizer|input_quantizers\.\d+)$")


def activation_key(quantizer_name: str) -> str:
    """The config lookup name of an activation quantizer module (see the module docstring).

    >>> activation_key("features.1.add.input_quantizers.0"), activation_key("quant_add_add_1")
    ('features.1.add', 'quant_add_add_1')
    """
    return _SUFFIX.sub("", quantizer_name)


def exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches ``name`` and nothing else (``*``, ``?`` and ``[`` escaped).

    >>> exact_pattern("a[0]*")
    'a[[]0][*]'
    """
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class LayerNames:
    """The weight layer names and activation site names of one model, in model order."""

    weights: tuple[str, ...]
    activations: tuple[str, ...]


def layer_names(model: nn.Module, base: QuantConfig | None = None) -> LayerNames:
    """Names a plan may use for ``model``, found by preparing a deep copy exactly as ``ptq`` would."""
    prepared = copy.deepcopy(model).eval()
    quantize_(prepared, base or QuantConfig())
    acts = dict.fromkeys(activation_key(n) for n, _ in activation_quantizers(prepared))
    return LayerNames(tuple(n for n, _ in weight_layers(prepared)), tuple(acts))


def _bits(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitsweepError(f"{what} must be a whole number of bits from 1 to 16, got {value!r}")
    if not 1 <= value <= 16:
        raise BitsweepError(f"{what} is {value}; bit widths are 1 to 16")
    return value


def _bit_map(value: object, what: str) -> Mapping[str, int]:
    if not isinstance(value, Mapping):
        raise BitsweepError(f"'{what}' must be a mapping of layer name to bits, got {type(value).__name__}")
    out: dict[str, int] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise BitsweepError(f"'{what}' has a key {k!r} that is not a layer name; quote names as strings")
        out[k] = _bits(v, f"{what}['{k}']")
    return MappingProxyType(out)


@dataclass(frozen=True)
class LayerBits:
    """Default weight/activation bits plus exact per-layer exceptions.

    Attributes:
        weight_bits: bits of every weight layer not listed in ``weights``.
        activation_bits: bits of every activation site not listed in ``activations``.
        weights: weight layer name -> bits.
        activations: activation site name -> bits (see the module docstring for the names).
        scale_dtype: how the packed file stores weight scales and biases (``float32`` or ``float16``,
            see ``QuantConfig.scale_dtype``); None leaves it to the base config. The search writes it,
            since the sizes it chose for were measured with it.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    weights: Mapping[str, int] = field(default_factory=dict)
    activations: Mapping[str, int] = field(default_factory=dict)
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        _bits(self.weight_bits, "weight_bits")
        _bits(self.activation_bits, "activation_bits")
        object.__setattr__(self, "weights", _bit_map(self.weights, "weights"))
        object.__setattr__(self, "activations", _bit_map(self.activations, "activations"))
        if self.scale_dtype is not None:
            check_scale_dtype(self.scale_dtype)

    def weight_bits_of(self, name: str) -> int:
        """Bits of weight layer ``name``."""
        return self.weights.get(name, self.weight_bits)

    def activation_bits_of(self, name: str) -> int:
        """Bits of activation site ``name``."""
        return self.activations.get(name, self.activation_bits)

    def check_names(self, names: LayerNames) -> None:
        """Refuse names ``names`` does not contain (a typo would otherwise be silently ignored)."""
        for what, given, known in (
            ("weight layer", self.weights, names.weights),
            ("activation site", self.activations, names.activations),
        ):
            unknown = [n for n in given if n not in set(known)]
            if unknown:
                close = difflib.get_close_matches(unknown[0], known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known names start {', '.join(known[:3])}"
                raise BitsweepError(
                    f"the model has no {what} named '{unknown[0]}'{hint}; "
                    f"{len(unknown)} unknown {what} name(s) in the layer-bits file"
                )

    def to_quant_config(self, base: QuantConfig | None = None) -> QuantConfig:
        """The QuantConfig that quantizes exactly as planned.

        ``base`` supplies everything but bit widths (observers, granularity, method, and the
        scale dtype unless the plan names one); its own overrides come after the plan's, so the
        plan's exact names win.
        """
        base = base or QuantConfig()
        if base.weight is None or base.activation is None:
            raise BitsweepError("a layer-bits plan needs a base config that quantizes weights and activations")
        w = dataclasses.replace(
            base.weight, bits=self.weight_bits, narrow_range=base.weight.signed and self.weight_bits > 1
        )
        a = dataclasses.replace(base.activation, bits=self.activation_bits)
        overrides = [
            LayerOverride(exact_pattern(n), weight_bits=self.weights.get(n), activation_bits=self.activations.get(n))
            for n in dict.fromkeys([*self.weights, *self.activations])
        ]
        return dataclasses.replace(base, weight=w, activation=a, overrides=(*overrides, *base.overrides),
                                   scale_dtype=self.scale_dtype or base.scale_dtype)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "weights": dict(self.weights),
            "activations": dict(self.activations),
            **({} if self.scale_dtype is None else {"scale_dtype": self.scale_dtype}),
        }

    @classmethod
    def from_dict(cls, data: object, names: LayerNames | None = None) -> LayerBits:
        """Validate plain data (from YAML/JSON); with ``names``, also refuse unknown layer names."""
        if not isinstance(data, Mapping):
            raise BitsweepError(f"a layer-bits file must be a mapping with {', '.join(sorted(_KEYS))}")
        unknown = set(data) - _KEYS
        if unknown:
            raise BitsweepError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))} in layer-bits file; "
                                f"allowed: {', '.join(sorted(_KEYS))}")  # fmt: skip
        if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) != VERSION:
            raise BitsweepError(f"not a {FORMAT} version {VERSION} file (format {data.get('format')!r}, "
                                f"version {data.get('version')!r})")  # fmt: skip
        plan = cls(
            weight_bits=data.get("weight_bits", 8),
            activation_bits=data.get("activation_bits", 8),
            weights=data.get("weights") or {},
            activations=data.get("activations") or {},
            scale_dtype=data.get("scale_dtype"),
        )
        if names is not None:
            plan.check_names(names)
        return plan

    @classmethod
    def explicit(
        cls, weights: Mapping[str, int], activation_bits: int = 8, activations: Mapping[str, int] | None = None
    ) -> LayerBits:
        """A plan that lists every weight layer (and every activation site when their bits are searched),
        the form the search writes.

        The defaults are fixed (8-bit weights, the given activation bits) rather than derived from the
        choice, so the header's size changes only with the listed bits and stays a sum the solver can optimize.
        """
        return cls(weight_bits=8, activation_bits=activation_bits, weights=dict(weights),
                   activations=dict(activations or {}))  # fmt: skip


def save_layer_bits(plan: LayerBits, path: str | Path) -> Path:
    """Write ``plan`` as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(plan.to_dict(), sort_keys=False))
    return Path(path)


def load_layer_bits(path: str | Path, names: LayerNames | None = None) -> LayerBits:
    """Read a layer-bits YAML file; with ``names`` (a model's :func:`layer_names`), refuse unknown names."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise BitsweepError(f"cannot read layer-bits file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise BitsweepError(f"layer-bits file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BitsweepError(f"layer-bits file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return LayerBits.from_dict(data, names)
    except BitsweepError as e:
        raise BitsweepError(f"{p}: {e}") from None
