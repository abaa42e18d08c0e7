"""Grid expansion: the axes of a sweep become a list of frozen :class:`Cell` values.

A cell is one quantization configuration to try. Its id is a hash of its
configuration (not of its position in the grid), so a resumed sweep
recognises finished cells even when the grid was written in another order or
grew new values.

The id must also survive new axes: results files outlive releases, and a
sweep resumed after an upgrade must not redo cells it already finished. So
the hash covers the axes results files were first written with
(:data:`ID_BASE_AXES`, always, which keeps every id written then), plus each
later axis only when its value differs from its default. Adding an axis with
a default therefore changes no existing id; a cell that uses a non-default
value gets a new one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bitsweep.errors import BitsweepError

GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel")

# The axes of results-file version 1 (before ``method``). They always enter the cell id; axes added
# since enter it only with a non-default value (see the module docstring), so they need a plain
# ``default`` (not a ``default_factory``). Never add to this tuple.
ID_BASE_AXES: tuple[str, ...] = ("weight_bits", "activation_bits", "granularity", "observer", "symmetric")


@dataclass(frozen=True)
class Cell:
    """One configuration of a sweep.

    ``weight_bits=None`` and ``activation_bits=None`` together are the FP32
    baseline: the unquantized model, evaluated once per sweep so that every
    accuracy drop is measured against the same number.

    Attributes:
        weight_bits: bits of every quantized weight (1..16), None for float weights.
        activation_bits: bits of every quantized activation (1..16), None for float activations.
        granularity: ``per_channel`` (one scale per output channel) or ``per_tensor`` weight scales.
        observer: how ranges are chosen from the calibration statistics, for weights and activations
            (``minmax``, ``mse``, ... as ``bitsweep.quant`` names them).
        symmetric: symmetric (zero point 0) weight quantization.
        method: how weights are rounded to integers (``rtn``: round to nearest; other names as
            ``bitsweep.quant`` registers them).
        checkpoint: a quantized checkpoint (a QAT run's ``quantized.pt``, a ``bitsweep quantize`` output)
            measured as this cell instead of quantizing the sweep's float model; the other fields then
            describe that checkpoint's recipe. Empty for the cells the sweep quantizes itself.
        layer_bits: the per-layer bit-width file (``bitsweep search``'s ``layer_bits.yaml``) this cell
            quantizes with, as an absolute path; it names the cell. ``weight_bits`` and ``activation_bits``
            are then the plan's defaults (the bits of layers it does not list). Empty for uniform cells.
        per_layer: the plan's per-layer exceptions as compact JSON, ``{"activations": {name: bits},
            "weights": {name: bits}}``, plus ``"scale_dtype"`` when the plan names one (:func:`per_layer_json`).
            The cell carries the plan itself, not just its path, so a worker on another machine needs no
            file, the results row says exactly what was measured, and an edited file is a new cell rather
            than a stale resumed one.
    """

    weight_bits: int | None = 8
    activation_bits: int | None = 8
    granularity: str = "per_channel"
    observer: str = "minmax"
    symmetric: bool = True
    method: str = "rtn"
    checkpoint: str = ""
    layer_bits: str = ""
    per_layer: str = ""

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if bits is None:
                continue
            if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
                raise ValueError(f"{name} must be a whole number from 1 to 16, got {bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if not isinstance(self.observer, str) or not self.observer:
            raise ValueError(f"observer must be a name such as minmax or mse, got {self.observer!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a rounding method name such as rtn, got {self.method!r}")
        if bool(self.layer_bits) != bool(self.per_layer):
            raise ValueError("a per-layer cell needs both layer_bits (its file) and per_layer (its bits)")
        if self.layer_bits and self.checkpoint:
            raise ValueError("a cell measures a quantized checkpoint or quantizes with a layer-bits plan, not both")
        if self.layer_bits and (self.weight_bits is None or self.activation_bits is None):
            raise ValueError("a per-layer cell needs the plan's default weight_bits and activation_bits")
        if self.per_layer:
            self.per_layer_bits()  # validates the JSON

    @property
    def is_mixed(self) -> bool:
        """True for a cell quantized with a per-layer plan (``layer_bits``)."""
        return bool(self.layer_bits)

    def per_layer_bits(self) -> tuple[dict[str, int], dict[str, int]]:
        """The plan's exceptions: (weight layer -> bits, activation site -> bits); empty for uniform cells.

        >>> Cell(4, 8, layer_bits="/p.yaml", per_layer=per_layer_json({"fc": 8}, {})).per_layer_bits()
        ({'fc': 8}, {})
        """
        if not self.per_layer:
            return {}, {}
        try:
            data = json.loads(self.per_layer)
        except json.JSONDecodeError:
            raise ValueError(f"per_layer must be JSON from per_layer_json, got {self.per_layer[:60]!r}") from None
        extra = set(data) - {"weights", "activations", "scale_dtype"} if isinstance(data, dict) else set()
        if extra:
            raise ValueError(f"per_layer has unknown key(s) {', '.join(sorted(extra))}")
        maps = []
        for key in ("weights", "activations"):
            value = data.get(key) if isinstance(data, dict) else None
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 16
                for k, b in value.items()
            ):
                raise ValueError(f"per_layer needs '{key}': a mapping of layer name to bits 1..16")
            maps.append(dict(value))
        return maps[0], maps[1]

    @property
    def plan_scale_dtype(self) -> str | None:
        """The storage of scales and biases the plan names (``float16``), or None: the recipe's default."""
        if not self.per_layer:
            return None
        value = json.loads(self.per_layer).get("scale_dtype")
        return None if value is None else str(value)

    @property
    def is_baseline(self) -> bool:
        """True for the unquantized FP32 reference cell."""
        return self.weight_bits is None and self.activation_bits is None

    @property
    def cell_id(self) -> str:
        """A stable 12-hex-digit id: the SHA-256 of :meth:`id_fields` as sorted JSON.

        Python's ``hash`` is salted per process, so it cannot identify a cell
        across a resumed run; this id can.

        >>> Cell(4, 8).cell_id == Cell(weight_bits=4, activation_bits=8).cell_id
        True
        >>> Cell(4, 8).cell_id == Cell(8, 4).cell_id
        False
        >>> Cell(4, 8).cell_id == Cell(4, 8, method="rtn").cell_id  # a default-valued new axis changes nothing
        True
        """
        text = json.dumps(self.id_fields(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def id_fields(self) -> dict[str, Any]:
        """What the id hashes: every :data:`ID_BASE_AXES` value, and each later axis that is not at its default.

        >>> sorted(Cell(4, 8).id_fields())
        ['activation_bits', 'granularity', 'observer', 'symmetric', 'weight_bits']
        >>> Cell(4, 8, method="adaround").id_fields()["method"]
        'adaround'
        """
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in ID_BASE_AXES or getattr(self, f.name) != f.default
        }

    @property
    def label(self) -> str:
        """A short human name such as ``W4A8 per_channel minmax`` or ``FP32``."""
        if self.is_baseline:
            return "FP32"
        w = "Wfp" if self.weight_bits is None else f"W{self.weight_bits}"
        a = "Afp" if self.activation_bits is None else f"A{self.activation_bits}"
        if self.checkpoint:
            return f"{w}{a} from {checkpoint_tag(self.checkpoint)}"
        extra = ("" if self.symmetric else " asym") + ("" if self.method == "rtn" else f" {self.method}")
        if self.layer_bits:  # the plan's defaults say little (a searched plan lists every layer): name the file
            return f"mixed {self.granularity} {self.observer}{extra} from {checkpoint_tag(self.layer_bits)}"
        return f"{w}{a} {self.granularity} {self.observer}{extra}"

    def to_dict(self) -> dict[str, Any]:
        """The cell's configuration as a plain dict (the columns it contributes to a results row)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        """Rebuild a cell from a results row (extra keys such as accuracies are ignored).

        Rows written before an axis existed lack its column; the cell then takes the
        axis default, which is what those rows were computed with.
        """
        return cls(**{name: data[name] for name in AXES if name in data})


AXES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Cell))


class PerLayerPlan(Protocol):
    """What a per-layer plan offers to become a cell; :class:`bitsweep.search.LayerBits` is one.

    A protocol rather than an import: the search package sits above the sweep. An optional
    ``scale_dtype`` attribute (``float16``: how the packed file stores scales and biases) is honoured too.
    """

    @property
    def weight_bits(self) -> int: ...  # noqa: D102 - the defaults and exceptions of LayerBits
    @property
    def activation_bits(self) -> int: ...  # noqa: D102
    @property
    def weights(self) -> Mapping[str, int]: ...  # noqa: D102
    @property
    def activations(self) -> Mapping[str, int]: ...  # noqa: D102


def per_layer_json(weights: Mapping[str, int], activations: Mapping[str, int], scale_dtype: str | None = None) -> str:
    """A plan's exceptions as compact JSON, names in the plan's order (model order for a searched plan).

    The order is kept, not sorted, so the cell's QuantConfig lists its overrides exactly as
    ``LayerBits.to_quant_config`` does; the same file always gives the same text, hence the same id.
    ``scale_dtype`` (how the packed file stores scales and biases) is written only when the plan names it.

    >>> per_layer_json({"b": 2, "a": 4}, {})
    '{"activations":{},"weights":{"b":2,"a":4}}'
    """
    data: dict[str, Any] = {"activations": dict(activations), "weights": dict(weights)}
    if scale_dtype is not None:
        data["scale_dtype"] = scale_dtype
    return json.dumps(data, separators=(",", ":"))


def plan_cell(path: str | os.PathLike[str], plan: PerLayerPlan, like: Cell = Cell()) -> Cell:
    """The cell that quantizes with ``plan`` (read from ``path``), with ``like``'s other axes.

    >>> class P:
    ...     weight_bits, activation_bits, weights, activations = 8, 8, {"fc": 2}, {}
    >>> plan_cell("/s/search/layer_bits.yaml", P()).label
    'mixed per_channel minmax from search/layer_bits.yaml'
    """
    return dataclasses.replace(
        like,
        weight_bits=plan.weight_bits,
        activation_bits=plan.activation_bits,
        checkpoint="",
        layer_bits=str(Path(path).resolve()),
        # scale_dtype: LayerBits names one when the search measured its sizes with float16 scales
        per_layer=per_layer_json(plan.weights, plan.activations, getattr(plan, "scale_dtype", None)),
    )


def checkpoint_tag(path: str) -> str:
    """A short name of a cell's quantized checkpoint: its folder and file name (``qat-w2a4/quantized.pt``).

    >>> checkpoint_tag("/runs/fmnist/qat-w2a4/quantized.pt")
    'qat-w2a4/quantized.pt'
    """
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def baseline_cell() -> Cell:
    """The FP32 reference cell (no quantization)."""
    return Cell(weight_bits=None, activation_bits=None)


def expand_grid(axes: Mapping[str, Sequence[Any]], include_baseline: bool = True) -> list[Cell]:
    """Every combination of the axis values, in order, as cells (the FP32 baseline first).

    Args:
        axes: axis name (a :class:`Cell` field) -> the values to try. Axes left out keep
            the :class:`Cell` default.
        include_baseline: prepend the FP32 baseline cell, which every accuracy drop refers to.

    Raises:
        BitsweepError: for an unknown axis, an axis without values, or an invalid value.

    >>> [c.label for c in expand_grid({"weight_bits": [2, 4], "activation_bits": [8]})]
    ['FP32', 'W2A8 per_channel minmax', 'W4A8 per_channel minmax']
    """
    names = list(axes)
    for name in names:
        if name not in AXES:
            close = difflib.get_close_matches(name, AXES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BitsweepError(f"unknown sweep axis '{name}'{hint}; valid axes: {', '.join(AXES)}")
        values = axes[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise BitsweepError(f"sweep axis '{name}' needs a list of values, got {values!r}")
        if len(values) == 0:
            raise BitsweepError(
                f"sweep axis '{name}' has no values; give at least one, e.g. --{name.replace('_', '-')} 8"
            )
    cells: list[Cell] = [baseline_cell()] if include_baseline else []
    seen = {c.cell_id for c in cells}
    for combo in itertools.product(*(axes[n] for n in names)):
        try:
            cell = Cell(**dict(zip(names, combo, strict=True)))
        except ValueError as e:
            raise BitsweepError(f"invalid sweep value: {e}") from None
        if cell.cell_id not in seen:  # repeated values in an axis would otherwise run twice
            seen.add(cell.cell_id)
            cells.append(cell)
    if len(cells) == (1 if include_baseline else 0):
        raise BitsweepError("the sweep grid is empty; give at least one weight and one activation bit width")
    return cells


def compile_group(cell: Cell) -> str:
    """Which compiled graph of the integer-exact simulation ``cell`` runs on (a heuristic, see below).

    ``float`` (the FP32 baseline, nothing compiled), ``wide`` (a 16-bit operand: float32 kernels),
    ``w8a8`` (8-bit weights and activations: its own graph on AVX2-only CPUs, split int8 weights)
    and ``narrow`` (everything else up to 8 bits).
    """
    if cell.is_baseline:
        return "float"
    w, a = cell.weight_bits or 32, cell.activation_bits or 32
    if max(w, a) > 8:
        return "wide"
    return "w8a8" if (w, a) == (8, 8) else "narrow"


def spread_compiles(cells: Sequence[Cell]) -> list[Cell]:
    """``cells`` with one cell of every :func:`compile_group` first (baseline, narrow, wide, w8a8).

    Each sweep worker compiles a graph the first time it meets its group, unless
    another worker already put it in the shared on-disk compile cache (a cache hit
    loads in ~15 s, a compile takes 30-100 s). Starting the workers on different
    groups lets them compile different graphs at the same time instead of the same
    one twice. Only the order changes: cells keep their ids, and results are
    written in completion order anyway.

    >>> [c.label.split()[0] for c in spread_compiles(expand_grid({"weight_bits": [4, 8, 16],
    ...                                                             "activation_bits": [8]}))]
    ['FP32', 'W4A8', 'W16A8', 'W8A8']
    """
    rank = {"float": 0, "narrow": 1, "wide": 2, "w8a8": 3}
    first: dict[str, Cell] = {}
    for cell in cells:
        first.setdefault(compile_group(cell), cell)
    lead = sorted(first.values(), key=lambda c: rank[compile_group(c)])
    return lead + [c for c in cells if all(c is not f for f in lead)]
