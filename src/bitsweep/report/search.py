"""Search results read back for the report: the searched plans' points and each layer's share of the packed file.

Everything comes from files ``bitsweep search`` wrote, so the report still needs no model
and no data: ``search.json`` (sizes, accuracies, the budget, the QAT fine-tuning) and the
packed model file it names. The per-layer bytes are read from that file's header, not
predicted: its ``weight_layers`` entries (name, spec, shape, bias, number of scales) say
how many integers and scales each layer stores, and the safetensors index says how wide
each stored element is (float32 or float16 scales and biases, int32 zero points), so the
table adds up to the file whatever precision the qparams were written in.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsweep.artifacts import read_header
from bitsweep.artifacts.restore import spec_from_dict
from bitsweep.errors import BitsweepError
from bitsweep.quant.bitpack import packed_nbytes

SEARCH_FILE = "search.json"
PACKED_FILE = "model.safetensors"


@dataclass(frozen=True)
class LayerBytes:
    """One weight layer's bytes in the packed file.

    Attributes:
        name: module name (as in the layer-bits file).
        shape: weight shape.
        bits: stored bits per weight (1 for binary weights).
        integer_bytes: the bit-packed integers.
        scale_bytes / zero_point_bytes / bias_bytes: the layer's per-channel (or per-tensor) scales,
            zero points (asymmetric layers only) and bias, at the file's element widths.
    """

    name: str
    shape: tuple[int, ...]
    bits: int
    integer_bytes: int
    scale_bytes: int
    zero_point_bytes: int
    bias_bytes: int

    @property
    def overhead_bytes(self) -> int:
        """Everything but the integers: what a smaller bit width does not shrink."""
        return self.scale_bytes + self.zero_point_bytes + self.bias_bytes

    @property
    def total_bytes(self) -> int:
        """The layer's share of the payload."""
        return self.integer_bytes + self.overhead_bytes


@dataclass(frozen=True)
class PackedBreakdown:
    """A packed file's bytes split by layer, plus what belongs to no weight layer.

    ``sum(layer.total_bytes) + activation_bytes + float_bytes == payload_bytes`` and
    ``payload_bytes + header_bytes == file_bytes`` (checked when read).
    """

    path: Path
    layers: tuple[LayerBytes, ...]
    activation_bytes: int  # activation quantizers' scales and zero points
    float_bytes: int  # state kept in floating point
    header_bytes: int  # the 8-byte length and the JSON header (tensor index and metadata)
    file_bytes: int
    dtypes: Mapping[str, str] = field(default_factory=dict)  # tensor -> safetensors dtype (F32, F16, I32, U8)

    @property
    def payload_bytes(self) -> int:
        """Tensor data."""
        return self.file_bytes - self.header_bytes


def _tensor_index(path: Path) -> dict[str, tuple[str, int, int]]:
    """tensor name -> (dtype, element count, bytes), from the safetensors header (already checked by read_header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {
        k: (str(v["dtype"]), math.prod(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__"
    }


def packed_breakdown(path: str | os.PathLike[str]) -> PackedBreakdown:
    """Split a packed file's bytes by weight layer (model order), integers and overhead apart.

    Raises:
        BitsweepError: a missing or damaged file, or one whose layer entries do not account for its tensors.
    """
    p = Path(path)
    info, header_bytes = read_header(p)
    index = _tensor_index(p)

    def width(key: str) -> int:  # bytes per stored element, as the file stores it
        _, count, nbytes = index.get(key, ("", 0, 0))
        return nbytes // count if count else 0

    try:
        specs = [spec_from_dict(s) for s in info["specs"]]
        layers = []
        for name, si, shape, has_bias, n_scales in info["weight_layers"]:
            spec = specs[si]
            layers.append(
                LayerBytes(
                    name=str(name),
                    shape=tuple(int(d) for d in shape),
                    bits=1 if spec.binary else spec.bits,
                    integer_bytes=packed_nbytes(math.prod(shape), 1 if spec.binary else spec.bits),
                    scale_bytes=n_scales * width("weights.scale"),
                    zero_point_bytes=0 if spec.symmetric else n_scales * width("weights.zero_point"),
                    bias_bytes=int(shape[0]) * width("biases") if has_bias else 0,
                )
            )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BitsweepError(f"'{p}' has malformed layer entries ({e}); export it again") from None

    def nbytes(*keys: str) -> int:
        return sum(index[k][2] for k in keys if k in index)

    sums = {
        "weights.packed": sum(ly.integer_bytes for ly in layers),
        "weights.scale": sum(ly.scale_bytes for ly in layers),
        "weights.zero_point": sum(ly.zero_point_bytes for ly in layers),
        "biases": sum(ly.bias_bytes for ly in layers),
    }
    wrong = [k for k, v in sums.items() if v != nbytes(k)]
    if wrong:
        raise BitsweepError(
            f"'{p}': the layer entries account for {sums[wrong[0]]:,} bytes of '{wrong[0]}' but it holds "
            f"{nbytes(wrong[0]):,}; this bitsweep cannot split the file by layer (export it again with it)"
        )
    file_bytes = p.stat().st_size
    return PackedBreakdown(
        path=p,
        layers=tuple(layers),
        activation_bytes=nbytes("activations.scale", "activations.zero_point"),
        float_bytes=nbytes(*(k for k in index if k.startswith("float."))),
        header_bytes=header_bytes,
        file_bytes=file_bytes,
        dtypes={k: v[0] for k, v in index.items()},
    )


@dataclass(frozen=True)
class SearchPoint:
    """One measured mixed-precision model: a searched plan (PTQ) or its QAT fine-tuning."""

    label: str
    file_bytes: int
    val_top1: float | None
    test_top1: float | None
    simulation: str

    def accuracy(self, metric: str) -> float | None:
        """``val`` or ``test`` top-1."""
        return self.val_top1 if metric == "val" else self.test_top1


@dataclass(frozen=True)
class SearchRun:
    """A ``bitsweep search`` output folder read back.

    Attributes:
        name: what the report calls it (the folder name).
        path: its search.json.
        plan: the searched plan's point; finetune: its QAT fine-tuning's, when ``--finetune qat`` ran.
        fp32_bytes: the FP32 reference file the ratio refers to (the sweep's ``fp32_bytes``).
        val_images / test_images: images behind its validation and test accuracies.
        budget: the budget in words.
        breakdown: the plan's packed file split by layer; None when the file is not there (see ``notes``).
        checkpoint_sha256: of the searched checkpoint, when its sensitivity cache records it.
        notes: what could not be read, in words.
    """

    name: str
    path: Path
    plan: SearchPoint
    finetune: SearchPoint | None
    fp32_bytes: int
    val_images: int | None
    test_images: int | None
    budget: str
    breakdown: PackedBreakdown | None
    checkpoint_sha256: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def points(self) -> tuple[SearchPoint, ...]:
        """The plan, then its fine-tuning when there is one."""
        return (self.plan,) if self.finetune is None else (self.plan, self.finetune)


def _number(data: Mapping[str, Any], key: str, where: Path, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BitsweepError(f"'{where}' has no number '{key}' (got {value!r}); pass a search.json that "
                            "'bitsweep search' wrote")  # fmt: skip
    return value


def _first_file(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _checkpoint_sha(folder: Path) -> str | None:
    """The searched checkpoint's SHA-256, from the sensitivity cache's key (search.json does not record it)."""
    try:
        key = json.loads((folder / "sensitivity.json").read_text(encoding="utf-8"))["key"]
        return str(key["checkpoint_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_search(path: str | os.PathLike[str], name: str | None = None) -> SearchRun:
    """Read a search output folder (or its search.json) and split its packed file by layer.

    The packed file is looked for in the search folder first (folders get moved), then at the
    path search.json recorded; a missing one leaves ``breakdown`` None with a note.

    Raises:
        BitsweepError: no search.json there, or one without the numbers a search writes.
    """
    p = Path(path)
    file = p / SEARCH_FILE if p.is_dir() else p
    if not file.is_file():
        raise BitsweepError(f"no {SEARCH_FILE} at '{p}'; pass the --output-dir of a 'bitsweep search' run "
                            "(or its search.json)")  # fmt: skip
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BitsweepError(
            f"cannot read '{file}' as JSON ({e}); pass the search.json 'bitsweep search' wrote"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("layer_bits"), dict):
        raise BitsweepError(f"'{file}' is not a search.json of 'bitsweep search' (no layer_bits plan in it)")
    folder = file.parent
    label = name or folder.resolve().name
    notes: list[str] = []
    plan = SearchPoint(
        label=label,
        file_bytes=int(_number(data, "file_bytes", file)),
        val_top1=float(_number(data, "val_top1", file)),
        test_top1=None if data.get("test_top1") is None else float(_number(data, "test_top1", file)),
        simulation=str(data.get("simulation", "?")),
    )
    finetune = None
    tuned = data.get("finetune")
    if isinstance(tuned, dict):
        epochs = tuned.get("epochs")
        finetune = SearchPoint(
            label=f"{label} + QAT ({epochs} epoch{'s' if epochs != 1 else ''})",
            file_bytes=int(_number(tuned, "file_bytes", file)),
            val_top1=_number(tuned, "val_top1", file, optional=True),
            test_top1=_number(tuned, "test_top1", file, optional=True),
            simulation=str(tuned.get("simulation", "?")),
        )
    max_bytes, max_drop = data.get("max_bytes"), data.get("max_drop")
    size = f"{max_bytes:,} bytes" if isinstance(max_bytes, int) else "?"
    if isinstance(max_drop, (int, float)):
        budget = f"validation drop <= {max_drop:g} points"
    elif isinstance(data.get("max_ratio"), (int, float)):
        budget = f">= {data['max_ratio']:g}x smaller ({size})"
    else:
        budget = f"<= {size}"
    recorded = data.get("packed_file")
    packed = (
        _first_file(folder / Path(recorded).name, Path(recorded)) if recorded else _first_file(folder / PACKED_FILE)
    )
    breakdown = None
    if packed is None:
        notes.append(f"{label}: its packed file ({recorded or PACKED_FILE}) is not in {folder.name}/ nor at the "
                     "recorded path, so the per-layer bytes are left out")  # fmt: skip
    else:
        breakdown = packed_breakdown(packed)
        if breakdown.file_bytes != plan.file_bytes:
            notes.append(f"{label}: {packed.name} has {breakdown.file_bytes:,} bytes but search.json records "
                         f"{plan.file_bytes:,}; the file was rewritten after the search")  # fmt: skip
    return SearchRun(
        name=label,
        path=file,
        plan=plan,
        finetune=finetune,
        fp32_bytes=int(_number(data, "fp32_bytes", file)),
        val_images=data.get("val_images"),
        test_images=data.get("test_images"),
        budget=budget,
        breakdown=breakdown,
        checkpoint_sha256=_checkpoint_sha(folder),
        notes=tuple(notes),
    )


def read_searches(paths: Sequence[str | os.PathLike[str]]) -> tuple[SearchRun, ...]:
    """:func:`read_search` of each path, named by folder (with its parent when two folders share a name)."""
    folders = [(Path(p) if Path(p).is_dir() else Path(p).parent).resolve() for p in paths]
    names = [f.name for f in folders]
    return tuple(
        read_search(p, name=f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name)
        for p, f in zip(paths, folders, strict=True)
    )
