"""The four compression figures in one value: what ``bitsweep quantize`` and ``bitsweep export`` print.

Definitions (docs/measure.md):

* model compression ratio = FP32 file bytes / packed file bytes (both real files on disk);
* weight compression ratio = FP32 weight bytes / bit-packed weight-payload bytes (quantized layers);
* activation compression ratio = FP32 activation bytes / quantized activation bytes,
  for the sum over all tensors and for the peak of simultaneously live tensors (batch 1);
* final size in MB = packed file bytes / 1e6 (decimal megabytes; MiB = 2**20 bytes also shown).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bitsweep.artifacts import ModelRecord, PackedMeta, record_of, save_packed
from bitsweep.errors import BitsweepError
from bitsweep.measure.activations import activation_memory
from bitsweep.measure.size import fp32_file_bytes, size_report


@dataclass(frozen=True)
class CompressionSummary:
    """Measured sizes (bytes) and the ratios built from them."""

    fp32_file_bytes: int
    packed_file_bytes: int
    packed_header_bytes: int  # safetensors header: tensor index + metadata JSON
    payload_bytes: int  # analytic estimate of the packed tensors (= file - header)
    weight_fp32_bytes: int
    weight_payload_bytes: int
    qparam_bytes: int
    activation_fp32_total: int
    activation_quant_total: int
    activation_fp32_peak: int
    activation_quant_peak: int

    @property
    def model_ratio(self) -> float:
        """FP32 file bytes / packed file bytes."""
        return self.fp32_file_bytes / self.packed_file_bytes

    @property
    def weight_ratio(self) -> float:
        """FP32 weight bytes / packed weight-payload bytes."""
        return self.weight_fp32_bytes / max(1, self.weight_payload_bytes)

    @property
    def activation_total_ratio(self) -> float:
        """FP32 / quantized activation bytes, summed over all activation tensors."""
        return self.activation_fp32_total / max(1, self.activation_quant_total)

    @property
    def activation_peak_ratio(self) -> float:
        """FP32 / quantized peak live activation bytes."""
        return self.activation_fp32_peak / max(1, self.activation_quant_peak)

    @property
    def size_mb(self) -> float:
        """Packed file size in decimal megabytes (1 MB = 1e6 bytes)."""
        return self.packed_file_bytes / 1e6

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the ratios."""
        d = asdict(self)
        d.update(model_ratio=self.model_ratio, weight_ratio=self.weight_ratio, size_mb=self.size_mb,
                 activation_total_ratio=self.activation_total_ratio,
                 activation_peak_ratio=self.activation_peak_ratio)  # fmt: skip
        return d

    def describe(self) -> str:
        """Human-readable lines with every figure and how it was measured."""
        kb = 1e3
        overhead = self.qparam_bytes + self.packed_header_bytes
        return "\n".join([
            f"FP32 file (safetensors): {self.fp32_file_bytes / kb:,.1f} kB",
            f"packed file: {self.packed_file_bytes / kb:,.1f} kB = {self.size_mb:.4f} MB "
            f"({self.packed_file_bytes / 2**20:.4f} MiB); analytic payload {self.payload_bytes / kb:,.1f} kB "
            f"+ header {self.packed_header_bytes:,} B",
            f"model compression: {self.model_ratio:.2f}x (FP32 file / packed file)",
            f"weight compression: {self.weight_ratio:.2f}x ({self.weight_fp32_bytes / kb:,.1f} kB FP32 weights / "
            f"{self.weight_payload_bytes / kb:,.1f} kB packed)",
            f"activation compression (batch 1): total {self.activation_total_ratio:.2f}x "
            f"({self.activation_fp32_total / kb:,.1f} -> {self.activation_quant_total / kb:,.1f} kB), "
            f"peak {self.activation_peak_ratio:.2f}x ({self.activation_fp32_peak / kb:,.1f} -> "
            f"{self.activation_quant_peak / kb:,.1f} kB)",
            f"overhead: qparams {self.qparam_bytes:,} B + header {self.packed_header_bytes:,} B = "
            f"{100 * overhead / self.packed_file_bytes:.1f}% of the packed file",
        ])  # fmt: skip


def compression_summary(
    model: nn.Module, meta: PackedMeta, packed_path: str | Path | None = None
) -> CompressionSummary:
    """Measure a converted model: write (or stat) its packed file and the FP32 reference file.

    Args:
        model: a converted quantized model.
        meta: model record and QuantConfig (their JSON is part of the packed file's size).
        packed_path: an existing packed file of this model to stat; None writes one to a temporary folder.
    """
    report = size_report(model, getattr(meta.config, "scale_dtype", "float32"))
    acts = activation_memory(model, meta.record.input_shape)
    with tempfile.TemporaryDirectory() as d:
        if packed_path is None:
            info = save_packed(model, Path(d) / "model.safetensors", meta)
            file_bytes = info.file_bytes
        else:
            file_bytes = Path(packed_path).stat().st_size
    return CompressionSummary(
        fp32_file_bytes=fp32_file_bytes(model),
        packed_file_bytes=file_bytes,
        packed_header_bytes=file_bytes - report.payload_bytes,
        payload_bytes=report.payload_bytes,
        weight_fp32_bytes=report.weight_fp32_bytes,
        weight_payload_bytes=report.weight_payload_bytes,
        qparam_bytes=report.qparam_bytes,
        activation_fp32_total=acts.total_fp32_bytes,
        activation_quant_total=acts.total_quant_bytes,
        activation_fp32_peak=acts.peak_fp32_bytes,
        activation_quant_peak=acts.peak_quant_bytes,
    )


def describe_compression(model: nn.Module, config: Any, source: ModelRecord | dict[str, Any]) -> str:
    """The compression summary lines ``bitsweep quantize`` prints for a converted model.

    Args:
        model: the converted model.
        config: its QuantConfig.
        source: the float network's record, or the float checkpoint dict it is read from.

    Never raises for an unmeasurable model: quantization already succeeded, so a
    model the measurement cannot trace gets one explanatory line instead.
    """
    try:
        record = source if isinstance(source, ModelRecord) else record_of(source)
        return compression_summary(model, PackedMeta(record, config)).describe()
    except BitsweepError as e:
        return f"compression summary unavailable: {e}"
