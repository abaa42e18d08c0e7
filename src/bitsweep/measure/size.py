"""Size accounting: what each layer costs on disk, and the four compression figures.

Everything here is *analytic* (elements x bits, rounded up to whole bytes per
tensor) and follows the exact storage rules of the packed file
(:mod:`bitsweep.artifacts.packed`), so the estimate and the real file differ only
by the safetensors header (metadata JSON and tensor index), which is reported.

Storage rules (also in docs/measure.md):

* quantized weights: ``ceil(elements * bits / 8)`` bytes per layer (bit-packed);
* weight scales: float32 (float16 under ``QuantConfig.scale_dtype`` ``float16``), one per channel
  (per-channel) or one per layer;
* weight zero-points: int32, stored only for asymmetric grids (symmetric grids have 0 by definition);
* biases: the same dtype as the weight scales;
* activation quantizers: one float32 scale + one int32 zero-point each;
* every other state entry (unquantized layers, unfolded BatchNorm): as stored (its dtype).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bitsweep.quant.bitpack import packed_nbytes
from bitsweep.quant.inspect import activation_quantizers, other_state, weight_layers
from bitsweep.quant.scale_dtype import storage_dtype

SCALE_BYTES = 4  # float32 (activation scales always; weight scales and biases under scale_dtype float32)
ZERO_POINT_BYTES = 4  # int32
BIAS_BYTES = 4  # float32


@dataclass(frozen=True)
class LayerSize:
    """Stored bytes of one quantized weight layer."""

    name: str
    bits: int
    weight_elements: int
    weight_bytes: int  # bit-packed integer payload
    scale_bytes: int
    zero_point_bytes: int
    bias_bytes: int
    fp32_bytes: int  # the same weight and bias in float32

    @property
    def total_bytes(self) -> int:
        """Everything this layer stores."""
        return self.weight_bytes + self.scale_bytes + self.zero_point_bytes + self.bias_bytes


@dataclass(frozen=True)
class SizeReport:
    """Analytic storage of a quantized model, per layer and in total (bytes)."""

    layers: tuple[LayerSize, ...]
    weight_payload_bytes: int  # bit-packed integer weights only
    weight_fp32_bytes: int  # the same weights in float32
    qparam_bytes: int  # weight scales/zero-points + activation scales/zero-points
    bias_bytes: int
    float_bytes: int  # state kept as stored (unquantized layers, unfolded BN, ...)
    activation_quantizers: int

    @property
    def payload_bytes(self) -> int:
        """All tensor bytes the packed file holds (the analytic estimate of its size minus its header)."""
        return self.weight_payload_bytes + self.qparam_bytes + self.bias_bytes + self.float_bytes

    @property
    def weight_ratio(self) -> float:
        """FP32 weight bytes / packed weight-payload bytes (quantized layers only)."""
        return self.weight_fp32_bytes / max(1, self.weight_payload_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["layers"] = [{**asdict(layer), "total_bytes": layer.total_bytes} for layer in self.layers]
        d["payload_bytes"] = self.payload_bytes
        d["weight_ratio"] = self.weight_ratio
        return d


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(model: nn.Module, scale_dtype: str = "float32") -> SizeReport:
    """Account for every byte the packed file of ``model`` stores, per layer.

    Args:
        model: a converted quantized model (weight layers expose ``weight_quantizer``).
        scale_dtype: its ``QuantConfig.scale_dtype``: the dtype of the stored weight scales and biases.
    """
    stored = storage_dtype(scale_dtype).itemsize
    layers = []
    for name, m in weight_layers(model):
        wq = m.weight_quantizer
        spec = wq.spec
        n = m.weight.numel()
        n_scales = wq.scale.numel()
        zp = 0 if spec.symmetric else wq.zero_point.numel() * ZERO_POINT_BYTES
        bias = m.bias.numel() * stored if m.bias is not None else 0
        layers.append(
            LayerSize(
                name=name,
                bits=spec.bits,
                weight_elements=n,
                weight_bytes=packed_nbytes(n, spec.bits),
                scale_bytes=n_scales * stored,
                zero_point_bytes=zp,
                bias_bytes=bias,
                fp32_bytes=4 * n + (m.bias.numel() * BIAS_BYTES if m.bias is not None else 0),
            )
        )
    n_aq = len(activation_quantizers(model))
    return SizeReport(
        layers=tuple(layers),
        weight_payload_bytes=sum(layer.weight_bytes for layer in layers),
        weight_fp32_bytes=sum(4 * layer.weight_elements for layer in layers),
        qparam_bytes=sum(layer.scale_bytes + layer.zero_point_bytes for layer in layers)
        + n_aq * (SCALE_BYTES + ZERO_POINT_BYTES),
        bias_bytes=sum(layer.bias_bytes for layer in layers),
        float_bytes=sum(_nbytes(t) for t in other_state(model).values()),
        activation_quantizers=n_aq,
    )


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The FP32 model that the quantized one replaces: float weights, biases and other state.

    For a quantized model this is the BN-folded float network (weights before
    quantization), i.e. exactly the tensors an FP32 deployment of the same
    graph would store, with no quantizer buffers. For a float model it is its
    state dict with floating tensors in float32.
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in weight_layers(model):
        out[f"{name}.weight"] = m.weight.detach().float()
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
    for key, t in other_state(model).items():
        out[key] = t.detach().float() if t.is_floating_point() else t.detach()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def fp32_file_bytes(model: nn.Module) -> int:
    """Bytes on disk of :func:`float_state_dict` written with safetensors (the FP32 reference file)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fp32.safetensors"
        save_file(float_state_dict(model), str(path))
        return path.stat().st_size
