"""Bad packed files: each is refused with one line before anything big is allocated, and nothing is written."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitsweep.artifacts import ModelRecord, PackedMeta, load, load_packed, save_packed
from bitsweep.artifacts.packed import digest
from bitsweep.cli import main
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@pytest.fixture
def packed(tmp_path: Path, quantized: QuantFactory, arch: ModelRecord) -> Path:
    model, config = quantized(4, 8)
    return save_packed(model, tmp_path / "m.safetensors", PackedMeta(arch, config)).path


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: dict[str, Any], payload: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def _resign(
    path: Path,
    edit_info: Callable[[dict[str, Any]], None] | None = None,
    edit_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> None:
    """Rewrite the file with changed metadata/tensors and a *valid* checksum, so only the other checks can refuse it."""
    header, _ = _split(path)
    info = json.loads(header["__metadata__"]["bitsweep"])
    tensors = load_file(str(path))
    if edit_info is not None:
        edit_info(info)
    if edit_tensors is not None:
        edit_tensors(tensors)
    text = json.dumps(info, separators=(",", ":"))
    save_file(tensors, str(path), metadata={"bitsweep": text, "sha256": digest(text, tensors)})


def _refused(path: Path, match: str) -> str:
    with pytest.raises(BitsweepError, match=match) as e:
        load_packed(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_changed_bit_width_in_the_header_is_refused(packed: Path) -> None:
    data = packed.read_bytes()
    assert data.count(b'\\"bits\\":4') >= 1
    packed.write_bytes(data.replace(b'\\"bits\\":4', b'\\"bits\\":2'))  # same length: offsets stay valid
    _refused(packed, "checksum mismatch over its header and data")


def test_trailing_or_missing_payload_bytes_are_refused(packed: Path) -> None:
    data = packed.read_bytes()
    packed.write_bytes(data + b"\0" * 8)
    _refused(packed, "8 payload bytes belong to no tensor")
    header, payload = _split_bytes(data)
    _write_header(packed, header, payload[:-1])  # the index still claims the last byte
    _refused(packed, "truncated or corrupted")


def _split_bytes(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_values_no_layer_uses_are_refused(packed: Path) -> None:
    _resign(packed, edit_tensors=lambda t: t.update({"weights.scale": torch.cat([t["weights.scale"], torch.ones(1)])}))
    _refused(packed, "weights.scale hold values no layer uses")


def test_extra_float_tensor_is_refused(packed: Path) -> None:
    _resign(packed, edit_tensors=lambda t: t.update({"float.ghost": torch.zeros(3)}))
    _refused(packed, "does not match the model it names.*ghost")


@pytest.mark.parametrize(
    "entry",
    [
        5,
        {"dtype": "F32", "shape": [2]},
        {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]},
    ],
)
def test_header_entry_that_is_not_a_tensor_is_refused(packed: Path, entry: Any) -> None:
    header, payload = _split(packed)
    header["biases"] = entry
    _write_header(packed, header, payload)
    _refused(packed, "header entry 'biases' is not a tensor with dtype, shape and data_offsets")


@pytest.mark.parametrize("offsets", [[0, 10**12], [-4, 0], [8, 4]])
def test_bad_data_offsets_are_refused(packed: Path, offsets: list[int]) -> None:
    header, payload = _split(packed)
    header["biases"]["data_offsets"] = offsets
    _write_header(packed, header, payload)
    _refused(packed, "header entry 'biases' has data_offsets")


def test_huge_num_classes_is_refused_before_building(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _resign(packed, edit_info=lambda i: i["model"].update(num_classes=200_000))
    monkeypatch.setattr(ModelRecord, "build", lambda self: pytest.fail("model built before the size check"))
    _refused(packed, "more than the file's data can hold")


def test_huge_layer_shape_is_refused_before_unpacking(packed: Path) -> None:
    def grow(info: dict[str, Any]) -> None:
        info["weight_layers"][0][2] = [100_000, 100_000, 3, 3]
        info["weight_layers"][0][4] = 100_000

    _resign(packed, edit_info=grow)
    _refused(packed, "the packed weights end before layer")


def test_malformed_layer_entry_is_refused(packed: Path) -> None:
    _resign(packed, edit_info=lambda i: i["weight_layers"][0].__setitem__(1, 99))
    _refused(packed, "is damaged .*malformed")


def test_old_version_asks_to_re_export(packed: Path) -> None:
    _resign(packed, edit_info=lambda i: i.update(version=1))
    _refused(packed, "packed format version 1; this bitsweep reads 2: export it again")


def test_cli_refuses_a_tampered_file_in_one_line_and_writes_nothing(
    packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = packed.read_bytes()
    packed.write_bytes(data.replace(b'\\"bits\\":4', b'\\"bits\\":2'))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(packed), "--format", "onnx", "--output", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitsweep export: error: ") and "checksum" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(BitsweepError):
        load(packed)
