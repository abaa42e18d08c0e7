"""The packed model file: integer weights at their real bit width, in one safetensors file.

Its size on disk is *the* quantized size everywhere in bitsweep. Layout:

* ``weights.packed`` (uint8): every quantized layer's integers bit-packed
  (:mod:`bitsweep.quant.bitpack`), layers concatenated in model order, each
  starting on a byte boundary. Binary (1-bit {-1,+1}) weights are stored as
  one bit, 1 for +1.
* ``weights.scale`` (float32), ``weights.zero_point`` (int32, asymmetric layers
  only), ``biases`` (float32): concatenated in the same order.
* ``activations.scale`` (float32) / ``activations.zero_point`` (int32): one per
  activation quantizer.
* ``float.<key>``: every other state entry, as stored.
* Header metadata ``bitsweep`` (JSON): format/version, architecture
  (``create_model`` name/options, classes, channels, image size, mean/std),
  the QuantConfig, the spec of every quantizer, layer names and shapes
  (offsets follow from them), and a SHA-256 of the tensor bytes so a
  corrupted file is refused instead of silently computing garbage.

Loading rebuilds the float architecture, applies ``quantize_`` with the stored
config, and sets every integer and qparam from the file; the logits equal the
converted fake-quant model's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitsweep.config import from_dict, to_dict
from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path
from bitsweep.quant.inspect import activation_quantizers, other_state, weight_layers
from bitsweep.quant.bitpack import pack, packed_nbytes, unpack

FORMAT = "bitsweep-packed"
VERSION = 1


@dataclass(frozen=True)
class Architecture:
    """How to rebuild the float network: a registered model plus its data geometry."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)  # create_model options (width, dropout)

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width), got {self.image_size}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")

    def build(self) -> nn.Module:
        """A fresh float model of this architecture (random weights)."""
        from bitsweep.models import create_model

        return create_model(self.name, self.num_classes, self.in_channels, **self.options)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.in_channels, *self.image_size)


@dataclass(frozen=True)
class PackedMeta:
    """What the packed file says about itself besides its tensors."""

    architecture: Architecture
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


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


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
        meta: architecture and QuantConfig needed to rebuild the model.

    Raises:
        BitsweepError: when the model has no quantized layers or was not converted.
    """
    layers = weight_layers(model)
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
        layer_meta.append([name, _spec_index(specs, wq.spec), list(m.weight.shape), m.bias is not None,
                           wq.scale.numel()])  # fmt: skip
    aqs = activation_quantizers(model)
    tensors: dict[str, torch.Tensor] = {
        "weights.packed": torch.from_numpy(np.concatenate(packed)),
        "weights.scale": torch.cat(scales),
    }
    if zps:
        tensors["weights.zero_point"] = torch.cat(zps)
    if biases:
        tensors["biases"] = torch.cat(biases)
    if aqs:
        tensors["activations.scale"] = torch.stack([q.scale.detach().float().reshape(()).cpu() for _, q in aqs])
        tensors["activations.zero_point"] = torch.stack(
            [q.zero_point.detach().to(torch.int32).reshape(()).cpu() for _, q in aqs]
        )
    for key, t in other_state(model).items():
        tensors[f"float.{key}"] = t.detach().cpu()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    arch = meta.architecture
    info = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": {**to_dict(arch), "image_size": list(arch.image_size)},
        "quant_config": to_dict(meta.config),
        "specs": specs,
        "weight_layers": layer_meta,
        "activation_quantizers": [[n, _spec_index(specs, q.spec)] for n, q in aqs],
        "sha256": _digest(tensors),
        "extra": meta.extra,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bitsweep": json.dumps(info, separators=(",", ":"), default=str)})
    size = Path(path).stat().st_size
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    return PackedFile(Path(path), size, payload, size - payload)


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The parsed ``bitsweep`` metadata and header length of a packed file, checking it is complete.

    Raises:
        BitsweepError: for a missing, truncated, non-safetensors or non-bitsweep file.
    """
    p = Path(path)
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
            info = json.loads(header["__metadata__"]["bitsweep"])
        except (ValueError, KeyError, TypeError):
            raise BitsweepError(f"'{p}' is not a bitsweep packed file (no bitsweep metadata); export it again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise BitsweepError(f"'{p}' is a safetensors file of another format, not a bitsweep packed model")
    if info.get("version") != VERSION:
        raise BitsweepError(f"'{p}' is packed format version {info.get('version')}; this bitsweep reads {VERSION}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise BitsweepError(bad)
    return info, 8 + n


def load_packed(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, PackedMeta]:
    """Rebuild the quantized model stored in a packed file, in eval mode on ``device``.

    Raises:
        BitsweepError: for a truncated, corrupted or foreign file, or one whose layers
            do not match the architecture it names.
    """
    from bitsweep.quant import QuantConfig, quantize_

    info, _ = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise BitsweepError(f"'{path}' is corrupted ({e}); export it again") from None
    if _digest(tensors) != info["sha256"]:
        raise BitsweepError(f"'{path}' is corrupted (checksum mismatch); export it again")
    try:
        a = info["architecture"]
        arch = from_dict(Architecture, {**a, "image_size": tuple(a["image_size"])})
        config = from_dict(QuantConfig, info["quant_config"])
        model = arch.build()
        model.eval()
        quantize_(model, config)
        _fill(model, info, tensors)
    except BitsweepError as e:
        raise BitsweepError(f"'{path}' does not match the architecture it names: {e}") from None
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
        raise BitsweepError(f"'{path}' does not match the architecture it names ({e}); export it again") from None
    model.eval()
    return model.to(device), PackedMeta(arch, config, info.get("extra", {}))


@torch.no_grad()
def _fill(model: nn.Module, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Set every integer, qparam, bias and float tensor of ``model`` from the file's tensors."""
    from bitsweep.quant.spec import QuantSpec

    specs = [from_dict(QuantSpec, s) for s in info["specs"]]
    layers = dict(weight_layers(model))
    stored = [row[0] for row in info["weight_layers"]]
    if sorted(stored) != sorted(layers):
        raise BitsweepError(f"file has {len(stored)} quantized layers, the rebuilt model {len(layers)}")
    data = tensors["weights.packed"].numpy()
    pos = {"byte": 0, "scale": 0, "zp": 0, "bias": 0}
    for name, si, shape, has_bias, n_scales in info["weight_layers"]:
        m, spec = layers[name], specs[si]
        if list(m.weight.shape) != shape:
            raise BitsweepError(f"layer '{name}' is {list(m.weight.shape)} in the model, {shape} in the file")
        count = int(np.prod(shape))
        bits = 1 if spec.binary else spec.bits
        nb = packed_nbytes(count, bits)
        codes = unpack(data[pos["byte"] : pos["byte"] + nb], bits, spec.signed and not spec.binary, count)
        pos["byte"] += nb
        q = torch.from_numpy(codes * 2 - 1 if spec.binary else codes).to(torch.int32).reshape(shape)
        scale = tensors["weights.scale"][pos["scale"] : pos["scale"] + n_scales].clone()
        pos["scale"] += n_scales
        if spec.symmetric:
            zp = torch.zeros(n_scales, dtype=torch.int32)
        else:
            zp = tensors["weights.zero_point"][pos["zp"] : pos["zp"] + n_scales].clone()
            pos["zp"] += n_scales
        shape0 = () if n_scales == 1 and not spec.per_channel else (n_scales,)
        wq = m.weight_quantizer
        wq.spec = spec
        wq.scale, wq.zero_point, wq.q = scale.reshape(shape0), zp.reshape(shape0), q
        m.weight.copy_(wq.dequantized().to(m.weight.dtype))
        if has_bias:
            n = m.bias.numel()
            m.bias.copy_(tensors["biases"][pos["bias"] : pos["bias"] + n].reshape(m.bias.shape))
            pos["bias"] += n
        m.refresh()
    aqs = dict(activation_quantizers(model))
    stored_aq = info["activation_quantizers"]
    if sorted(n for n, _ in stored_aq) != sorted(aqs):
        raise BitsweepError(f"file has {len(stored_aq)} activation quantizers, the rebuilt model {len(aqs)}")
    for i, (name, si) in enumerate(stored_aq):
        aqs[name].set_qparams(specs[si], tensors["activations.scale"][i], tensors["activations.zero_point"][i])
    for m in model.modules():  # same inference shortcut convert() enables (exact, see QuantOutput.try_fuse)
        if hasattr(m, "try_fuse"):
            m.try_fuse()
    state = model.state_dict()
    for key, t in tensors.items():
        if key.startswith("float."):
            k = key[len("float.") :]
            if k not in state or state[k].shape != t.shape:
                raise BitsweepError(f"float tensor '{k}' has no place of that shape in the rebuilt model")
            state[k].copy_(t)
