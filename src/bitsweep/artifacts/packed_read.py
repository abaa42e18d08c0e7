"""Reading a packed file: every header field checked before anything is allocated, every byte accounted for.

The order matters for bad input: the safetensors index is validated against the
file's real size (so no tensor can claim more bytes than exist), the model record
is checked against what that payload can hold (so ``num_classes: 200000`` is refused
before a 2 GB classifier is built), the checksum covers the metadata (so a changed
``bits`` is refused), and decoding must consume every payload byte and fill every
state entry of the rebuilt model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from bitsweep.artifacts.packed import FORMAT, VERSION, PackedMeta, digest, scale_storage
from bitsweep.artifacts.record import ModelRecord, check_finite
from bitsweep.artifacts.restore import build_converted, spec_from_dict
from bitsweep.config import from_dict
from bitsweep.errors import BitsweepError
from bitsweep.quant.bitpack import packed_nbytes, unpack
from bitsweep.quant.config import QuantConfig
from bitsweep.quant.primitives import dequantize

_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_FIXED = {
    "weights.packed",
    "weights.scale",
    "weights.zero_point",
    "biases",
    "activations.scale",
    "activations.zero_point",
}


@dataclass(frozen=True)
class PackedContents:
    """A decoded packed file: what rebuilds the model, before it is built."""

    record: ModelRecord
    config: QuantConfig
    state: dict[str, torch.Tensor]  # the converted state_dict
    specs: dict[str, dict[str, Any]]  # quantizer name -> spec fields
    extra: dict[str, Any]


def _index(header: Any, payload: int, bad: str) -> None:
    """Check the safetensors tensor index: known dtypes, sizes that match, offsets tiling the payload exactly."""
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
        ok = ok and entry["dtype"] in _ITEMSIZE and isinstance(entry["shape"], list)
        ok = ok and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok:
            raise BitsweepError(f"{bad}: header entry '{key}' is not a tensor with dtype, shape and data_offsets")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= payload or end - start != math.prod(entry["shape"]) * _ITEMSIZE[entry["dtype"]]:
            raise BitsweepError(
                f"{bad}: header entry '{key}' has data_offsets {offsets} that do not fit its shape "
                f"and the file's {payload:,} payload bytes"
            )
        if key not in _FIXED and not key.startswith("float."):
            raise BitsweepError(f"{bad}: unexpected tensor '{key}'")
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise BitsweepError(f"{bad}: the tensors leave bytes unused or overlap at byte {pos:,}")
        pos = end
    if pos != payload:
        raise BitsweepError(f"{bad}: {payload - pos:,} payload bytes belong to no tensor")


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The parsed ``bitsweep`` metadata and header length of a packed file, checking the whole index.

    Raises:
        BitsweepError: for a missing, truncated, non-safetensors, non-bitsweep or old-version file.
    """
    info, n, _, _ = _read(Path(path))
    return info, n


def _read(p: Path) -> tuple[dict[str, Any], int, str, str]:
    if not p.is_file():
        raise BitsweepError(f"packed file '{p}' not found; write one with 'bitsweep export CHECKPOINT --format packed'")
    size = p.stat().st_size
    bad = f"'{p}' is not a complete bitsweep packed file (truncated or corrupted); export it again"
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BitsweepError(bad)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise BitsweepError(bad)
        try:
            header = json.loads(f.read(n))
            meta = header["__metadata__"]
            text, checksum = meta["bitsweep"], meta.get("sha256")
            info = json.loads(text)
        except (ValueError, KeyError, TypeError):
            raise BitsweepError(
                f"'{p}' is not a bitsweep packed file (no bitsweep metadata); export it again"
            ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise BitsweepError(f"'{p}' is a safetensors file of another format, not a bitsweep packed model")
    if info.get("version") != VERSION or not isinstance(checksum, str):
        raise BitsweepError(
            f"'{p}' is packed format version {info.get('version')}; this bitsweep reads "
            f"{VERSION}: export it again from its quantized checkpoint"
        )
    _index(header, size - 8 - n, bad)
    return info, 8 + n, text, checksum


def _layer_rows(info: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any]]:
    specs = [spec_from_dict(s) for s in info["specs"]]
    rows = info["weight_layers"]
    aqs = info["activation_quantizers"]
    if not isinstance(rows, list) or not isinstance(aqs, list):
        raise TypeError("weight_layers and activation_quantizers must be lists")
    for name, si, shape, has_bias, n_scales in rows:
        ok = isinstance(name, str) and isinstance(si, int) and 0 <= si < len(specs) and isinstance(shape, list)
        if not (
            ok
            and all(isinstance(d, int) and d > 0 for d in shape)
            and isinstance(has_bias, bool)
            and isinstance(n_scales, int)
            and n_scales >= 1
        ):
            raise TypeError(f"weight layer entry {[name, si, shape, has_bias, n_scales]!r} is malformed")
    for name, si in aqs:
        if not (isinstance(name, str) and isinstance(si, int) and 0 <= si < len(specs)):
            raise TypeError(f"activation quantizer entry {[name, si]!r} is malformed")
    return specs, rows, aqs


def decode(path: str | Path) -> PackedContents:
    """Check and decode a packed file into the converted state of its model (nothing built yet).

    Raises:
        BitsweepError: one line for a damaged, foreign, old or inconsistent file, or non-finite values.
    """
    p = Path(path)
    info, header_bytes, text, checksum = _read(p)
    damaged = f"'{p}' is damaged"
    try:
        record = ModelRecord.from_dict(info["model"])
        config = from_dict(QuantConfig, info["quant_config"])
        specs, rows, aq_rows = _layer_rows(info)
        extra = info.get("extra", {})
    except BitsweepError as e:
        raise BitsweepError(f"{damaged}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise BitsweepError(f"{damaged} ({e}); export it again") from None
    record.check_size(16 * (p.stat().st_size - header_bytes) + 4096)  # >= 1 bit per weight; before building anything
    try:
        tensors = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise BitsweepError(f"{damaged} ({str(e).splitlines()[0][:120]}); export it again") from None
    if digest(text, tensors) != checksum:
        raise BitsweepError(f"{damaged} (checksum mismatch over its header and data); export it again")
    for key in ("weights.scale", "biases"):  # float16 (scale_dtype float16) or float32; read back as float32
        if key in tensors and tensors[key].dtype != scale_storage(config):
            raise BitsweepError(f"{damaged}: '{key}' is {tensors[key].dtype} but its scale_dtype is "
                                f"{config.scale_dtype}; export it again")  # fmt: skip
        if key in tensors:
            tensors[key] = tensors[key].float()
    state = _state(tensors, specs, rows, aq_rows, damaged)
    check_finite(state, "the model file")
    names = {row[0]: specs[row[1]] for row in rows} | {n: specs[si] for n, si in aq_rows}
    spec_dicts = {n: dataclasses.asdict(s) for n, s in names.items()}
    return PackedContents(record, config, state, spec_dicts, extra if isinstance(extra, dict) else {})


def _take(tensors: dict[str, torch.Tensor], key: str, pos: dict[str, int], n: int, damaged: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None or pos.get(key, 0) + n > t.numel():
        raise BitsweepError(f"{damaged}: '{key}' holds fewer values than its layers need; export it again")
    start = pos.get(key, 0)
    pos[key] = start + n
    return t.reshape(-1)[start : start + n].clone()


def _state(
    tensors: dict[str, torch.Tensor], specs: list[Any], rows: list[Any], aq_rows: list[Any], damaged: str
) -> dict[str, torch.Tensor]:
    """The converted state_dict the file encodes; refuses leftover or missing payload values."""
    state: dict[str, torch.Tensor] = {}
    pos: dict[str, int] = {}
    data = tensors["weights.packed"].numpy() if "weights.packed" in tensors else None
    byte = 0
    for name, si, shape, has_bias, n_scales in rows:
        spec = specs[si]
        per_channel = spec.per_channel
        want = shape[spec.channel_axis] if per_channel and spec.channel_axis < len(shape) else 1
        if n_scales != want:
            raise BitsweepError(f"{damaged}: layer '{name}' stores {n_scales} scales for a {shape} weight")
        count, bits = math.prod(shape), 1 if spec.binary else spec.bits
        nb = packed_nbytes(count, bits)
        if data is None or byte + nb > data.shape[0]:
            raise BitsweepError(f"{damaged}: the packed weights end before layer '{name}'; export it again")
        codes = unpack(data[byte : byte + nb], bits, spec.signed and not spec.binary, count)
        byte += nb
        q = torch.from_numpy(codes * 2 - 1 if spec.binary else codes).to(torch.int32).reshape(shape)
        shape0 = () if n_scales == 1 and not per_channel else (n_scales,)
        scale = _take(tensors, "weights.scale", pos, n_scales, damaged).reshape(shape0)
        if spec.symmetric:
            zp = torch.zeros(shape0, dtype=torch.int32)
        else:
            zp = _take(tensors, "weights.zero_point", pos, n_scales, damaged).reshape(shape0)
        prefix = f"{name}." if name else ""
        state[prefix + "weight"] = dequantize(q, scale, zp, spec)
        state[prefix + "weight_quantizer.q"], state[prefix + "weight_quantizer.scale"] = q, scale
        state[prefix + "weight_quantizer.zero_point"] = zp
        if has_bias:
            state[prefix + "bias"] = _take(tensors, "biases", pos, shape[0], damaged)
    for name, _ in aq_rows:
        state[f"{name}.scale"] = _take(tensors, "activations.scale", pos, 1, damaged).reshape(())
        state[f"{name}.zero_point"] = _take(tensors, "activations.zero_point", pos, 1, damaged).reshape(())
    leftover = [k for k in _FIXED - {"weights.packed"} if k in tensors and pos.get(k, 0) != tensors[k].numel()]
    if data is not None and byte != data.shape[0]:
        leftover.append("weights.packed")
    if leftover:
        raise BitsweepError(f"{damaged}: {', '.join(sorted(leftover))} hold values no layer uses; export it again")
    for key, t in tensors.items():
        if key.startswith("float."):
            state[key[len("float.") :]] = t
    return state


def load_packed(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, PackedMeta]:
    """Rebuild the quantized model stored in a packed file, in eval mode on ``device``.

    Raises:
        BitsweepError: for a truncated, corrupted, foreign or old file, or one whose layers
            do not match the model it names.
    """
    contents = decode(path)
    try:
        model = build_converted(contents.record, contents.config, contents.state, contents.specs)
    except BitsweepError as e:
        raise BitsweepError(f"'{path}' does not match the model it names: {e}; export it again") from None
    return model.to(device).eval(), PackedMeta(contents.record, contents.config, contents.extra)
