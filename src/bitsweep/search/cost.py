"""The exact size of a packed file (:mod:`bitsweep.artifacts.packed`) for any per-layer plan, without writing it.

The packed file is a safetensors file: an 8-byte header length, a JSON header
padded with spaces to a multiple of 8, then the tensor bytes. So its size is

    8 + pad8(len(header JSON)) + payload

* payload: per weight layer ``ceil(numel * bits / 8)`` bytes of integers (each layer
  starts on a byte boundary), scales (one per channel), int32 zero points
  (asymmetric layers only), biases (scales and biases float32, or float16 under
  ``QuantConfig.scale_dtype`` ``float16``); per activation quantizer a float32 scale
  and an int32 zero point; any state kept in float. Only the integers depend on bits.
* header JSON: per tensor its dtype, shape and data offsets, plus the metadata
  ``bitsweep`` (our JSON, embedded as a string, so every ``"`` costs two bytes) and a
  64-hex-digit ``sha256``. Bits reach the header three ways: the QuantConfig's
  overrides (one per named layer, written without null fields, so a 16-bit layer costs one digit more than an
  8-bit one), the list of distinct quantizer ``specs`` (a bit width used by any layer
  adds one spec entry, about 120 bytes, once), and the digits of the integer tensor's
  length and offsets.

:func:`packed_size` rebuilds that header exactly (the same JSON the writer makes; the
tensor order and dtype names come from safetensors itself), so it equals the file.
:func:`byte_table` splits the size into what the solver can add up: a constant, a
cost per (layer, bits), a cost per (activation site, bits) when activation bits are
searched (they change only the header: the site's override and which spec
entries exist) and a once-only cost per spec. What is left (padding to 8 and
digit-count changes) is at most a few bytes; the caller checks the chosen plan with
:func:`packed_size` and tightens the budget by any overshoot.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from bitsweep.artifacts.packed import FORMAT, VERSION, PackedMeta, quant_config_entry, scale_storage
from bitsweep.config import to_dict
from bitsweep.errors import BitsweepError
from bitsweep.quant import LayerOverride, QuantConfig, QuantSpec
from bitsweep.quant.bitpack import packed_nbytes
from bitsweep.quant.inspect import activation_quantizers, other_state, weight_layers
from bitsweep.search.layer_bits import LayerBits, activation_key, exact_pattern

SHA256_HEX = 64


@dataclass(frozen=True)
class LayerShape:
    """What a weight layer's size depends on besides its bits."""

    name: str
    shape: tuple[int, ...]
    bias: bool

    @property
    def numel(self) -> int:
        """Number of weights."""
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class PackedLayout:
    """Everything a model's packed size depends on besides the QuantConfig (read once from a converted model).

    Attributes:
        weights: weight layers in model order.
        activations: (quantizer module name, config name, saw negative values at calibration).
        other: state kept in float: (key, dtype, shape).
        record / extra: the header's ``model`` and ``extra`` entries.
    """

    weights: tuple[LayerShape, ...]
    activations: tuple[tuple[str, str, bool], ...]
    other: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    record: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def layout_of(model: nn.Module, meta: PackedMeta) -> PackedLayout:
    """The layout of a converted model (any bit widths: calibration decides only signedness)."""
    weights = tuple(LayerShape(n, tuple(m.weight.shape), m.bias is not None) for n, m in weight_layers(model))
    if not weights:
        raise BitsweepError("the model has no quantized layers; quantize and convert it before measuring its size")
    acts = tuple((n, activation_key(n), bool(q.spec.signed)) for n, q in activation_quantizers(model))
    other = tuple((k, t.dtype, tuple(t.shape)) for k, t in other_state(model).items())
    return PackedLayout(weights, acts, other, meta.record.to_dict(), dict(meta.extra))


@dataclass(frozen=True)
class PackedSize:
    """The packed file's bytes, split as the file splits them."""

    file_bytes: int
    payload_bytes: int
    header_json_bytes: int  # before padding to a multiple of 8


def weight_spec_of(config: QuantConfig, name: str) -> QuantSpec:
    """The weight spec ``quantize_`` gives layer ``name``; refuses layers left in float (not supported here)."""
    spec = config.spec_for(name)
    if spec is None:
        raise BitsweepError(f"layer '{name}' would stay in floating point; size prediction needs every layer quantized")
    return spec


def activation_spec_of(config: QuantConfig, key: str, negative: bool) -> QuantSpec:
    """The effective activation spec after calibration (as ``ActivationStats.effective_spec`` makes it)."""
    spec = config.activation_spec_for(key)
    if spec is None:
        raise BitsweepError(f"activation site '{key}' would stay in floating point; size prediction needs it quantized")
    return dataclasses.replace(spec, signed=spec.signed or negative, narrow_range=False)


def _index(specs: list[dict[str, Any]], spec: QuantSpec) -> int:
    d = to_dict(spec)
    if d not in specs:
        specs.append(d)
    return specs.index(d)


def _tensor_order(dtypes: Mapping[str, torch.dtype]) -> list[tuple[str, str]]:
    """(name, safetensors dtype name) in the order safetensors lays tensors out (asked of safetensors itself)."""
    probe = safetensors_bytes({k: torch.zeros(1, dtype=d) for k, d in dtypes.items()})
    n = int.from_bytes(probe[:8], "little")
    header = json.loads(probe[8 : 8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return [(k, str(header[k]["dtype"])) for k in names]


def packed_size(layout: PackedLayout, config: QuantConfig) -> PackedSize:
    """The exact size of the file ``save_packed`` writes for this layout quantized with ``config``."""
    specs: list[dict[str, Any]] = []
    packed = scales = zps = biases = 0
    layer_meta = []
    for layer in layout.weights:
        spec = weight_spec_of(config, layer.name)
        count = layer.shape[spec.channel_axis] if spec.per_channel else 1
        packed += packed_nbytes(layer.numel, 1 if spec.binary else spec.bits)
        scales += count
        zps += 0 if spec.symmetric else count
        biases += layer.shape[0] if layer.bias else 0
        layer_meta.append([layer.name, _index(specs, spec), list(layer.shape), layer.bias, count])
    act_meta = [[n, _index(specs, activation_spec_of(config, key, neg))] for n, key, neg in layout.activations]
    stored = scale_storage(config)  # float32, or float16 under scale_dtype float16
    shapes: dict[str, tuple[torch.dtype, list[int]]] = {
        "weights.packed": (torch.uint8, [packed]),
        "weights.scale": (stored, [scales]),
    }
    if zps:
        shapes["weights.zero_point"] = (torch.int32, [zps])
    if biases:
        shapes["biases"] = (stored, [biases])
    if layout.activations:
        shapes["activations.scale"] = (torch.float32, [len(layout.activations)])
        shapes["activations.zero_point"] = (torch.int32, [len(layout.activations)])
    for key, dtype, dims in layout.other:
        shapes[f"float.{key}"] = (dtype, list(dims))
    info = {
        "format": FORMAT,
        "version": VERSION,
        "model": layout.record,
        "quant_config": quant_config_entry(config),
        "specs": specs,
        "weight_layers": layer_meta,
        "activation_quantizers": act_meta,
        "extra": layout.extra,
    }
    text = json.dumps(info, separators=(",", ":"), default=str)  # what save_packed embeds
    header: dict[str, Any] = {"__metadata__": {"bitsweep": text, "sha256": "0" * SHA256_HEX}}
    offset = 0
    for name, dtype_name in _tensor_order({k: d for k, (d, _) in shapes.items()}):
        dtype, shape = shapes[name]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # serde_json writes compact JSON and escapes like Python's ensure_ascii=False; only the length matters.
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return PackedSize(8 + n + (-n) % 8 + offset, offset, n)


def escaped_len(obj: object) -> int:
    """Bytes ``obj`` takes inside the header: compact JSON, then escaped again as a JSON string."""
    text = json.dumps(obj, separators=(",", ":"), default=str)
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


@dataclass(frozen=True)
class ByteTable:
    """The packed size as a sum the solver can optimize exactly (up to the residual in the module docstring).

    ``bytes(plan) = constant + sum(weights[layer][bits]) + sum(activations[site][bits])
    + sum(specs[s] for s in specs used)``.

    Attributes:
        constant: everything no choice changes.
        weights: layer -> bits -> integer bytes plus the digits of the bits in the layer's override.
        specs: spec label (``w4``, ``a8s``, ``a8u``) -> header bytes of its entry, paid once.
        weight_labels: bits -> the spec label a weight layer at these bits uses.
        activation_labels: labels always paid: those of the fixed activation bits (empty when searched).
        activations: site -> bits -> header bytes of the site's override (searched bits only; 0 at the
            default; the payload, one scale and zero point per quantizer, does not depend on bits).
        site_labels: site -> bits -> the spec labels its quantizers use at these bits (searched bits only).
    """

    constant: int
    weights: Mapping[str, Mapping[int, int]]
    specs: Mapping[str, int]
    weight_labels: Mapping[int, str]
    activation_labels: tuple[str, ...]
    activations: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    site_labels: Mapping[str, Mapping[int, tuple[str, ...]]] = field(default_factory=dict)

    def additive_bytes(self, weight_bits: Mapping[str, int], activation_bits: Mapping[str, int] | None = None) -> int:
        """The table's estimate for one weight-bit choice per layer (and one per site when searched)."""
        acts = activation_bits or {}
        labels = {self.weight_labels[b] for b in weight_bits.values()} | set(self.activation_labels)
        labels.update(label for site, b in acts.items() for label in self.site_labels[site][b])
        return (
            self.constant
            + sum(self.weights[n][b] for n, b in weight_bits.items())
            + sum(self.activations[site][b] for site, b in acts.items())
            + sum(self.specs[s] for s in labels)
        )


def _activation_label(spec: QuantSpec) -> str:
    return f"a{spec.bits}{'s' if spec.signed else 'u'}"


def _override_len(name: str, weight_bits: int | None, activation_bits: int | None) -> int:
    """Header bytes of the plan's override entry for ``name``, as ``quant_config_entry`` writes it."""
    override = LayerOverride(exact_pattern(name), weight_bits=weight_bits, activation_bits=activation_bits)
    return escaped_len(quant_config_entry(QuantConfig(overrides=(override,)))["overrides"][0])


def site_costs(layout: PackedLayout, activation_bits: Iterable[int], weight_bits: int = 8) -> dict[str, dict[int, int]]:
    """Site -> bits -> header bytes the site's override adds, the highest bits being the plan's default (0).

    A site below the default is listed in the plan: a site of its own adds an override entry and a
    comma; a site named like a weight layer (always listed) adds only its ``activation_bits`` field.
    The entry's other fields do not depend on the site's bits, so this is exact and additive.
    """
    a_bits = sorted(set(activation_bits))
    layers = {ly.name for ly in layout.weights}
    out: dict[str, dict[int, int]] = {}
    for key in dict.fromkeys(k for _, k, _ in layout.activations):
        if key in layers:  # the weight layer's entry is there anyway: only the field is added
            listed = {a: _override_len(key, weight_bits, a) - _override_len(key, weight_bits, None) for a in a_bits}
        else:  # a new entry, and the comma before it
            listed = {a: _override_len(key, None, a) + 1 for a in a_bits}
        out[key] = {a: 0 if a == a_bits[-1] else listed[a] for a in a_bits}
    return out


def byte_table(
    layout: PackedLayout, base: QuantConfig, weight_bits: Iterable[int], activation_bits: int | Iterable[int] = 8
) -> ByteTable:
    """Per-option byte costs for explicit plans (:meth:`LayerBits.explicit`: every weight layer listed).

    One activation bit width fixes every site (the plan lists no site); several are searched, the
    highest is the plan's default and a site below it is listed (:func:`site_costs`), so its override
    and the spec entries in use are what change with the choice. The constant is calibrated so the
    table is exact for the all-highest-bits plan.
    """
    bits = sorted(set(weight_bits))
    if not bits:
        raise BitsweepError("give at least one candidate weight bit width")
    a_bits = sorted({activation_bits} if isinstance(activation_bits, int) else set(activation_bits))
    if not a_bits:
        raise BitsweepError("give at least one candidate activation bit width")
    sites = dict.fromkeys(key for _, key, _ in layout.activations)
    searched = len(a_bits) > 1
    w_spec = {b: weight_spec_of(LayerBits(b, a_bits[-1]).to_quant_config(base), "") for b in bits}
    labels = {b: f"w{b}" for b in bits}
    specs = {labels[b]: escaped_len(to_dict(w_spec[b])) + 1 for b in bits}  # + 1: the comma between entries
    site_labels: dict[str, dict[int, set[str]]] = {site: {} for site in sites}
    for a in a_bits:  # the spec each quantizer gets with every site at ``a`` bits (base overrides respected)
        listed = dict.fromkeys(sites, a) if a != a_bits[-1] else {}
        a_cfg = LayerBits.explicit({}, a_bits[-1], listed).to_quant_config(base)
        for _, key, neg in layout.activations:
            spec = activation_spec_of(a_cfg, key, neg)
            specs[_activation_label(spec)] = escaped_len(to_dict(spec)) + 1
            site_labels[key].setdefault(a, set()).add(_activation_label(spec))
    table = {
        layer.name: {b: packed_nbytes(layer.numel, 1 if w_spec[b].binary else b) + len(str(b)) for b in bits}
        for layer in layout.weights
    }
    top_acts = dict.fromkeys(sites, a_bits[-1]) if searched else None
    top = LayerBits.explicit({ly.name: bits[-1] for ly in layout.weights}, a_bits[-1])  # no site below the default
    exact = packed_size(layout, top.to_quant_config(base)).file_bytes
    fixed = () if searched else tuple(sorted(set().union(*(ls[a_bits[0]] for ls in site_labels.values()))))
    partial = ByteTable(
        0, table, specs, labels, fixed,
        site_costs(layout, a_bits) if searched else {},
        {site: {a: tuple(sorted(ls)) for a, ls in by_bits.items()} for site, by_bits in site_labels.items()}
        if searched else {},
    )  # fmt: skip
    constant = exact - partial.additive_bytes(dict(top.weights), top_acts)
    return dataclasses.replace(partial, constant=constant)
