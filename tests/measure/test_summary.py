"""The four compression figures are built from real files and consistent with each other."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from bitsweep.artifacts import ModelRecord, PackedMeta, save_packed
from bitsweep.measure.summary import compression_summary
from bitsweep.quant import QuantConfig


def test_summary_figures(
    tmp_path: Path, quantized: Callable[..., tuple[nn.Module, QuantConfig]], arch: ModelRecord
) -> None:
    model, config = quantized(4, 8)
    meta = PackedMeta(arch, config)
    info = save_packed(model, tmp_path / "m.safetensors", meta)
    s = compression_summary(model, meta, info.path)
    assert s.packed_file_bytes == info.file_bytes and s.packed_header_bytes == info.header_bytes
    assert s.weight_ratio == pytest.approx(8.0, rel=1e-3)  # 32/4 bits, up to per-layer byte rounding
    assert s.activation_total_ratio == pytest.approx(4.0, rel=1e-2)  # FP32 logits (unquantized) pull it just below 4
    assert s.activation_peak_ratio <= 4.0 + 1e-9
    assert s.model_ratio > 1.0 and s.model_ratio < s.weight_ratio  # overhead (scales, biases, header) costs some ratio
    assert s.size_mb == s.packed_file_bytes / 1e6
    fresh = compression_summary(model, meta)  # writes its own temporary file: same bytes
    assert fresh.packed_file_bytes == info.file_bytes
    d = s.to_dict()
    assert d["model_ratio"] == pytest.approx(s.fp32_file_bytes / s.packed_file_bytes)
    assert "model compression" in s.describe()
