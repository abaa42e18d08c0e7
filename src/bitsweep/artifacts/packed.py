"""The packed model file: integer weights at their real bit width, in one safetensors file.

Its size on disk is *the* quantized size everywhere in bitsweep. Layout:

* ``weights.packed`` (uint8): every quantized layer's integers bit-packed
  (:mod:`bitsweep.quant.bitpack`), layers concatenated in model order, each
  starting on a byte boundary. Binary (1-bit {-1,+1}) weights are stored as
  one bit, 1 for +1.
* ``weights.scale`` (float32, or float16 when ``QuantConfig.scale_dtype`` is
  ``float16``), ``weights.zero_point`` (int32, asymmetric layers only), ``biases``
  (the same dtype as the scales): concatenated in the same order. Float16 storage
  is exact: conversion already put those values on the float16 grid
  (:mod:`bitsweep.quant.scale_dtype`), and the writer refuses any that are not.
* ``activations.scale`` (float32) / ``activations.zero_point`` (int32): one per
  activation quantizer.
* ``float.<key>``: every other state entry, as stored.
* Header metadata ``bitsweep`` (JSON): format/version, the model record
  (:class:`~bitsweep.artifacts.record.ModelRecord`), the QuantConfig (compact:
  :func:`quant_config_entry`), the spec of every quantizer, layer names and shapes (offsets follow from them), free-form
  ``extra``; and metadata ``sha256``: a SHA-256 of that JSON *and* every tensor's
  name, dtype, shape and bytes, so a changed bit width in the header is refused as
  surely as a flipped payload byte.

Loading (:mod:`bitsweep.artifacts.packed_read`) checks the whole header before it
allocates anything, decodes the file into the converted state, and rebuilds the
model through the same restore path as a quantized checkpoint; the logits equal
the converted fake-quant model's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from bitsweep.artifacts.record import ModelRecord
from bitsweep.config import to_dict
from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path
from bitsweep.quant.bitpack import pack
from bitsweep.quant.inspect import activation_quantizers, other_state, weight_layers
from bitsweep.quant.scale_dtype import storage_dtype

FORMAT = "bitsweep-packed"
VERSION = 2  # 2: the checksum covers the metadata; the model record replaces the architecture


@dataclass(frozen=True)
class PackedMeta:
    """What the packed file says about itself besides its tensors."""

    record: ModelRecord
    config: Any  # bitsweep.quant.QuantConfig
    extra: dict[str, Any] = field(default_factory=dict)  # free-form JSON (metrics, source checkpoint)


@dataclass(frozen=True)
class PackedFile:
    """Where a packed file went and how its bytes split into tensors and header."""

    path: Path
    file_bytes: int
    payload_bytes: int  # tensor data
    header_bytes: int  # 8-byte length + JSON header (tensor index and metadata)


def _codes(q: torch.Tensor, spec: Any) -> tuple[np.ndarray, int, bool]:
    if spec.binary:  # {-1, +1} -> {0, 1}
        return ((q.reshape(-1).cpu().numpy() + 1) // 2).astype(np.int64), 1, False
    return q.reshape(-1).cpu().numpy().astype(np.int64), spec.bits, spec.signed


def digest(metadata: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata JSON and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(metadata.encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"\0{k}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def quant_config_entry(config: Any) -> dict[str, Any]:
    """The header's ``quant_config``: ``to_dict(config)`` without the fields that say "nothing here".

    A searched plan has one override per layer; written in full, each carries four nulls and a
    ``false`` (6.6 kB of a 15 kB header on MobileNet-v2). Dropped are: override fields that are
    None or ``skip: false``, and ``scale_dtype: float32``, the storage of every file before the
    field existed (so float32 files stay readable by older readers). These are the dataclass
    defaults, so ``from_dict(QuantConfig, entry)`` rebuilds exactly ``config``.
    """
    d = to_dict(config)
    if "overrides" in d:
        d["overrides"] = [
            {k: v for k, v in o.items() if v is not None and not (k == "skip" and v is False)} for o in d["overrides"]
        ]
    if d.get("scale_dtype") == "float32":
        del d["scale_dtype"]
    return d


def scale_storage(config: Any) -> torch.dtype:
    """The dtype of ``weights.scale`` and ``biases`` in the packed file of a model quantized with ``config``."""
    return storage_dtype(getattr(config, "scale_dtype", "float32"))


def _stored(values: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``values`` (float32) in ``dtype``; a BitsweepError unless every value survives the round trip exactly."""
    if dtype == values.dtype:
        return values
    stored = values.to(dtype)
    lost = (stored.float() != values) & values.isfinite()  # NaN/inf pass: the reader refuses them by name
    if bool(lost.any()):
        first = float(values[lost][0])
        raise BitsweepError(
            f"{int(lost.sum())} {what} are not {str(dtype).removeprefix('torch.')} values (e.g. {first!r}), so "
            "the file would not hold what the model computes; quantize with this scale_dtype (ptq and "
            "convert_qat round them) or pack with scale_dtype float32"
        )
    return stored


def _spec_index(specs: list[dict[str, Any]], spec: Any) -> int:
    d = to_dict(spec)
    if d not in specs:
        specs.append(d)
    return specs.index(d)


def save_packed(model: nn.Module, path: str | Path, meta: PackedMeta) -> PackedFile:
    """Write the packed file of a converted model (atomically).

    Args:
        model: a converted quantized model (integers and qparams frozen).
        path: destination, conventionally ``*.safetensors``.
        meta: model record and QuantConfig needed to rebuild the model.

    Raises:
        BitsweepError: when the model has no quantized layers or was not converted, or when
            ``meta.config.scale_dtype`` is float16 but a scale or bias is not a float16 value.
    """
    layers: list[tuple[str, Any]] = weight_layers(model)
    if not layers:
        raise BitsweepError("the model has no quantized layers; quantize and convert it before packing")
    specs: list[dict[str, Any]] = []
    packed, scales, zps, biases, layer_meta = [], [], [], [], []
    for name, m in layers:
        wq = m.weight_quantizer
        q = wq.int_weight()
        if q.numel() != m.weight.numel():
            raise BitsweepError(f"layer '{name}' has no integer weights; call bitsweep.quant.convert(model) first")
        codes, bits, signed = _codes(q, wq.spec)
        packed.append(pack(codes, bits, signed))
        scales.append(wq.scale.detach().float().reshape(-1).cpu())
        if not wq.spec.symmetric:
            zps.append(wq.zero_point.detach().to(torch.int32).reshape(-1).cpu())
        if m.bias is not None:
            biases.append(m.bias.detach().float().reshape(-1).cpu())
        layer_meta.append(
            [name, _spec_index(specs, wq.spec), list(m.weight.shape), m.bias is not None, wq.scale.numel()]
        )
    aqs: list[tuple[str, Any]] = activation_quantizers(model)
    dtype = scale_storage(meta.config)
    tensors: dict[str, torch.Tensor] = {
        "weights.packed": torch.from_numpy(np.concatenate(packed)),
        "weights.scale": _stored(torch.cat(scales), dtype, "weight scales"),
    }
    if zps:
        tensors["weights.zero_point"] = torch.cat(zps)
    if biases:
        tensors["biases"] = _stored(torch.cat(biases), dtype, "biases")
    if aqs:
        tensors["activations.scale"] = torch.stack([q.scale.detach().float().reshape(()).cpu() for _, q in aqs])
        tensors["activations.zero_point"] = torch.stack(
            [q.zero_point.detach().to(torch.int32).reshape(()).cpu() for _, q in aqs]
        )
    for key, t in other_state(model).items():
        tensors[f"float.{key}"] = t.detach().cpu()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    info = {
        "format": FORMAT,
        "version": VERSION,
        "model": meta.record.to_dict(),
        "quant_config": quant_config_entry(meta.config),
        "specs": specs,
        "weight_layers": layer_meta,
        "activation_quantizers": [[n, _spec_index(specs, q.spec)] for n, q in aqs],
        "extra": meta.extra,
    }
    text = json.dumps(info, separators=(",", ":"), default=str)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bitsweep": text, "sha256": digest(text, tensors)})
    size = Path(path).stat().st_size
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    return PackedFile(Path(path), size, payload, size - payload)
