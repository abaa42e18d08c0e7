from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.inspect import activation_quantizers, weight_layers
from bitsweep.search.layer_bits import LayerBits, activation_key, load_layer_bits, save_layer_bits


def test_yaml_round_trip(tmp_path: Path, tiny) -> None:
    plan = LayerBits(4, 6, {tiny.names.weights[0]: 8}, {tiny.names.activations[0]: 8})
    path = save_layer_bits(plan, tmp_path / "bits.yaml")
    assert load_layer_bits(path, tiny.names) == plan


def test_scale_dtype_travels_with_the_plan(tmp_path: Path, tiny) -> None:
    """The search writes its scale dtype into the plan, so 'quantize --layer-bits' makes the same file."""
    plan = LayerBits(4, 8, {tiny.names.weights[0]: 8}, scale_dtype="float16")
    path = save_layer_bits(plan, tmp_path / "bits.yaml")
    assert yaml.safe_load(path.read_text())["scale_dtype"] == "float16"
    assert load_layer_bits(path, tiny.names) == plan
    assert plan.to_quant_config().scale_dtype == "float16"
    assert LayerBits(4, 8).to_quant_config(QuantConfig(scale_dtype="float16")).scale_dtype == "float16"
    assert "scale_dtype" not in LayerBits(4, 8).to_dict()  # unset: files stay as before


def test_every_name_takes_effect_in_ptq(tiny) -> None:
    """All weight layers at 3 bits (first at 2) and all sites at 5 (default 8): proves the names are ptq's."""
    weights = {n: 3 for n in tiny.names.weights} | {tiny.names.weights[0]: 2}
    plan = LayerBits(8, 8, weights, {n: 5 for n in tiny.names.activations})
    model = ptq(copy.deepcopy(tiny.model), plan.to_quant_config(), stats=tiny.stats).model
    layers = dict(weight_layers(model))
    first = layers[tiny.names.weights[0]].weight_quantizer
    assert first.spec.bits == 2 and set(first.int_weight().unique().tolist()) <= {-1, 0, 1}
    assert {m.weight_quantizer.spec.bits for n, m in layers.items() if n != tiny.names.weights[0]} == {3}
    assert all(m.weight_quantizer.int_weight().abs().max() <= 3 for m in layers.values())
    quantizers = activation_quantizers(model)
    assert {activation_key(n) for n, _ in quantizers} == set(tiny.names.activations)
    assert {q.spec.bits for _, q in quantizers} == {5}


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bits.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"weight_bits": 17}, "bit widths are 1 to 16"),
        ({"weight_bits": 0}, "bit widths are 1 to 16"),
        ({"weight_bits": "4"}, "whole number of bits"),
        ({"weight_bits": True}, "whole number of bits"),
        ({"weights": ["features.0.0"]}, "mapping of layer name to bits"),
        ({"weights": {"features.0.0": 4.5}}, "whole number of bits"),
        ({"weights": {"features.0.O": 4}}, "did you mean 'features.0.0'"),
        ({"activations": {"nope": 4}}, "no activation site named 'nope'"),
        ({"bits": 4}, "unknown key(s) bits"),
        ({"format": "other"}, "not a bitsweep-layer-bits"),
        ({"scale_dtype": "bfloat16"}, "scale_dtype must be one of float32, float16"),
        ([4, 8], "must be a mapping"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(tmp_path: Path, tiny, data: object, message: str) -> None:
    with pytest.raises(BitsweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_layer_bits(_write(tmp_path, data), tiny.names)


def test_non_utf8_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bits.yaml"
    path.write_bytes(b"weight_bits: 4\n# \xff\xfe\n")
    with pytest.raises(BitsweepError, match="not UTF-8"):
        load_layer_bits(path)
    path.write_text("weights: {a: [", encoding="utf-8")
    with pytest.raises(BitsweepError, match="not valid YAML"):
        load_layer_bits(path)
    with pytest.raises(BitsweepError, match="cannot read"):
        load_layer_bits(tmp_path / "missing.yaml")


def test_names_are_exact_not_patterns() -> None:
    cfg = LayerBits(4, 8, {"features.1*": 2}).to_quant_config()
    assert cfg.spec_for("features.1*").bits == 2
    assert cfg.spec_for("features.10").bits == 4
