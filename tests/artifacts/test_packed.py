"""The packed file: exact logits after reload, size = analytic estimate + header, clear errors."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bitsweep.artifacts.packed as packed_format
from bitsweep.artifacts import ModelRecord, PackedMeta, load_packed, read_header, save_packed
from bitsweep.config import to_dict
from bitsweep.errors import BitsweepError
from bitsweep.measure.size import fp32_file_bytes, size_report
from bitsweep.quant import LayerOverride, QuantConfig
from bitsweep.quant.inspect import weight_layers
from bitsweep.quant.scale_dtype import apply_scale_dtype

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@pytest.mark.parametrize("weight_bits", [1, 3, 8, 16])
def test_round_trip_logits_identical_and_size_matches(
    tmp_path: Path, weight_bits: int, quantized: QuantFactory, arch: ModelRecord
) -> None:
    model, config = quantized(weight_bits, 8)
    info = save_packed(model, tmp_path / "m.safetensors", PackedMeta(arch, config, {"note": "test"}))
    loaded, meta = load_packed(info.path)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.extra == {"note": "test"} and meta.record == arch
    report = size_report(model)
    assert info.file_bytes == info.path.stat().st_size
    assert info.payload_bytes == report.payload_bytes  # analytic estimate = tensor bytes in the file
    _, header = read_header(info.path)
    assert info.file_bytes - report.payload_bytes == header == info.header_bytes
    # The packed weights really take bits/32 of the float weights.
    assert report.weight_payload_bytes == sum((layer.weight_elements * weight_bits + 7) // 8 for layer in report.layers)
    assert info.file_bytes < fp32_file_bytes(model)


def test_sub_8_bit_file_is_smaller_than_8_bit(tmp_path: Path, quantized: QuantFactory, arch: ModelRecord) -> None:
    sizes = {}
    for bits in (2, 4, 8):
        model, config = quantized(bits, 8)
        sizes[bits] = save_packed(model, tmp_path / f"{bits}.safetensors", PackedMeta(arch, config)).file_bytes
    assert sizes[2] < sizes[4] < sizes[8]


@pytest.fixture
def packed_file(tmp_path: Path, quantized: QuantFactory, arch: ModelRecord) -> Path:
    model, config = quantized(4, 8)
    return save_packed(model, tmp_path / "m.safetensors", PackedMeta(arch, config)).path


def test_truncated_file_is_refused(packed_file: Path) -> None:
    data = packed_file.read_bytes()
    for cut in (4, 100, len(data) - 1):
        packed_file.write_bytes(data[:cut])
        with pytest.raises(BitsweepError, match="truncated or corrupted"):
            load_packed(packed_file)


def test_flipped_payload_byte_is_refused(packed_file: Path) -> None:
    data = bytearray(packed_file.read_bytes())
    data[-10] ^= 0xFF
    packed_file.write_bytes(bytes(data))
    with pytest.raises(BitsweepError, match="checksum"):
        load_packed(packed_file)


def test_foreign_safetensors_and_missing_file(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(BitsweepError, match="not a bitsweep packed file"):
        load_packed(other)
    with pytest.raises(BitsweepError, match="not found"):
        load_packed(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(BitsweepError, match="bitsweep packed"):
        load_packed(garbage)


def test_other_architecture_is_refused(tmp_path: Path, quantized: QuantFactory, arch: ModelRecord) -> None:
    model, config = quantized(4, 8)
    wrong = dataclasses.replace(arch, options={"width": 0.5})
    path = save_packed(model, tmp_path / "m.safetensors", PackedMeta(wrong, config)).path
    with pytest.raises(BitsweepError, match="does not match the model it names"):
        load_packed(path)


def test_float16_scales_and_biases_are_stored_in_two_bytes_exactly(
    tmp_path: Path, quantized: QuantFactory, arch: ModelRecord
) -> None:
    model32, config32 = quantized(4, 8)
    config = dataclasses.replace(config32, scale_dtype="float16")
    model = apply_scale_dtype(copy.deepcopy(model32), "float16")  # what ptq does last under this config
    info = save_packed(model, tmp_path / "m.safetensors", PackedMeta(arch, config))
    with safe_open(str(info.path), "pt") as f:
        assert f.get_slice("weights.scale").get_dtype() == f.get_slice("biases").get_dtype() == "F16"
    loaded, meta = load_packed(info.path)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.config == config
    report = size_report(model, "float16")
    assert info.payload_bytes == report.payload_bytes
    assert info.file_bytes - report.payload_bytes == read_header(info.path)[1]
    smaller = save_packed(model32, tmp_path / "m32.safetensors", PackedMeta(arch, config32)).payload_bytes
    assert smaller - info.payload_bytes == 2 * sum(
        m.weight_quantizer.scale.numel() + (m.bias.numel() if m.bias is not None else 0)
        for _, m in weight_layers(model)
    )


def test_float16_storage_of_unrounded_scales_is_refused(
    tmp_path: Path, quantized: QuantFactory, arch: ModelRecord
) -> None:
    model, config = quantized(4, 8)  # converted with float32 scales
    with pytest.raises(BitsweepError, match="weight scales are not float16 values.*scale_dtype"):
        save_packed(
            model, tmp_path / "m.safetensors", PackedMeta(arch, dataclasses.replace(config, scale_dtype="float16"))
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_header_writes_overrides_without_nulls_and_loads_the_same_config(
    tmp_path: Path, quantized: QuantFactory, arch: ModelRecord
) -> None:
    model, config = quantized(4, 8)
    overrides = (LayerOverride("features.0*", weight_bits=4), LayerOverride("nothing", skip=True))
    config = dataclasses.replace(config, overrides=overrides)
    info = save_packed(model, tmp_path / "m.safetensors", PackedMeta(arch, config))
    entry = read_header(info.path)[0]["quant_config"]
    assert entry["overrides"] == [{"pattern": "features.0*", "weight_bits": 4}, {"pattern": "nothing", "skip": True}]
    assert "scale_dtype" not in entry  # float32, as every file before the field: older readers still read it
    assert load_packed(info.path)[1].config == config


def test_files_written_with_full_overrides_still_load(
    tmp_path: Path, quantized: QuantFactory, arch: ModelRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 files from before the compact header (every override field written, nulls included)."""
    model, config = quantized(4, 8)
    config = dataclasses.replace(config, overrides=(LayerOverride("features.0*", weight_bits=4),))
    monkeypatch.setattr(packed_format, "quant_config_entry", lambda c: {k: v for k, v in to_dict(c).items()
                                                                 if k != "scale_dtype"})  # fmt: skip
    info = save_packed(model, tmp_path / "m.safetensors", PackedMeta(arch, config))
    assert read_header(info.path)[0]["quant_config"]["overrides"][0]["activation_bits"] is None
    assert load_packed(info.path)[1].config == config
