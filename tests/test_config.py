"""Config validation: unknown keys, wrong types and bad sections are one clear BitsweepError, never a default."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitsweep.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_run_config,
    load_yaml,
    parse_override,
    to_dict,
)
from bitsweep.errors import BitsweepError


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?); valid keys: data, model, train, seed"),
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch' (did you mean 'epochs'?)"),
        ({"data": {"augment": {"cutuot": 1}}}, "unknown key 'data.augment.cutuot' (did you mean 'cutout'?)"),
        ({"model": {"colour": 1}}, "unknown key 'model.colour'; valid keys: name, width, dropout"),
    ],
)
def test_unknown_keys_are_named_with_their_path_and_a_suggestion(data: dict, message: str) -> None:
    with pytest.raises(BitsweepError) as err:
        from_dict(RunConfig, data)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"epochs": "x"}}, "train.epochs: expected a whole number, got 'x'"),
        ({"train": {"epochs": True}}, "train.epochs: expected a whole number, got True"),  # bool is not an int here
        ({"train": {"epochs": 3.5}}, "train.epochs: expected a whole number, got 3.5"),
        ({"train": {"nesterov": "yes"}}, "train.nesterov: expected true or false, got 'yes'"),
        ({"train": {"amp": 1}}, "train.amp: expected true or false, got 1"),
        ({"model": {"width": "wide"}}, "model.width: expected a number, got 'wide'"),
        ({"data": {"name": ["digits"]}}, "data.name: expected a string, got ['digits']"),
        ({"seed": None}, "seed: expected a whole number, got None"),
        ({"data": {"val_size": "ten"}}, "data.val_size: expected a whole number, got 'ten'"),
    ],
)
def test_wrong_types_are_refused(data: dict, message: str) -> None:
    with pytest.raises(BitsweepError) as err:
        from_dict(RunConfig, data)
    assert str(err.value) == message


TRAIN_HINT = "(--set train.epochs=200, or epochs: 200 indented under train:)"
AUGMENT_HINT = "(--set data.augment.crop_padding=4, or crop_padding: 4 indented under data.augment:)"
MODEL_HINT = "(--set model.name=mobilenetv2, or name: mobilenetv2 indented under model:)"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": 5}, f"train must be a mapping of train options {TRAIN_HINT}, got 5"),
        ({"train": None}, f"train must be a mapping of train options {TRAIN_HINT}, got None"),
        ({"data": {"augment": 3}}, f"data.augment must be a mapping of augment options {AUGMENT_HINT}, got 3"),
        ({"model": [1, 2]}, f"model must be a mapping of model options {MODEL_HINT}, got [1, 2]"),
    ],
)
def test_a_section_that_is_not_a_mapping_is_refused(data: dict, message: str) -> None:
    with pytest.raises(BitsweepError) as err:
        from_dict(RunConfig, data)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"epochs": 0}}, "train: epochs must be a positive whole number, got 0"),
        ({"model": {"width": 0}}, "model: model width must be in (0, 4], got 0.0"),
        ({"data": {"val_size": -1}}, "data: val_size must be >= 0, got -1"),
        ({"data": {"augment": {"cutout": -2}}}, "data.augment: cutout must be >= 0, got -2"),
    ],
)
def test_out_of_range_values_name_their_section(data: dict, message: str) -> None:
    with pytest.raises(BitsweepError) as err:
        from_dict(RunConfig, data)
    assert str(err.value) == message


def test_the_top_level_must_be_a_mapping() -> None:
    with pytest.raises(BitsweepError, match="RunConfig: expected a mapping, got \\[1\\]"):
        from_dict(RunConfig, [1])  # type: ignore[arg-type]


def test_lossless_conversions_are_accepted_and_defaults_fill_the_rest() -> None:
    config = from_dict(RunConfig, {"train": {"epochs": 3.0, "lr": 1}, "model": {"width": 1}, "run_name": None})
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.width == 1.0 and isinstance(config.model.width, float)
    assert config.run_name is None
    assert config.data == DataConfig() and config.train.batch_size == TrainConfig().batch_size
    assert from_dict(DataConfig, {"name": 10}).name == "10"  # a YAML number where a name is expected


def test_to_dict_round_trips() -> None:
    config = RunConfig(
        data=DataConfig(name="cifar10", val_size=5000, augment=AugmentConfig(cutout=8, autoaugment=True)),
        model=ModelConfig(name="resnet20", width=0.5, dropout=0.0),
        train=TrainConfig(epochs=3, lr=0.1),
        seed=7,
        run_name="x",
    )
    assert from_dict(RunConfig, to_dict(config)) == config


def test_overrides_are_yaml_values_on_nested_keys() -> None:
    assert parse_override("train.lr=0.1") == (["train", "lr"], 0.1)
    assert parse_override("data.augment.hflip=false") == (["data", "augment", "hflip"], False)
    assert parse_override("run_name=") == (["run_name"], "")
    for bad, message in (("train.lr", "must look like section.key=value"), ("=3", "has no key")):
        with pytest.raises(BitsweepError, match=message):
            parse_override(bad)
    base = {"train": {"epochs": 2}}
    out = apply_overrides(base, ["train.lr=0.5", "model.width=0.25"])
    assert out == {"train": {"epochs": 2, "lr": 0.5}, "model": {"width": 0.25}}
    assert base == {"train": {"epochs": 2}}  # the input is not modified
    config = load_run_config(None, ["train.epochs=4", "data.augment.cutout=2"])
    assert config.train.epochs == 4 and config.data.augment.cutout == 2
    with pytest.raises(BitsweepError, match="train must be a mapping of train options"):
        load_run_config(None, ["train=5"])
    with pytest.raises(BitsweepError, match="unknown key 'train.epohcs'"):
        load_run_config(None, ["train.epohcs=4"])


def test_yaml_files(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  name: vgg16\n  width: 0.5\ntrain:\n  epochs: 2\n")
    config = load_run_config(good, ["train.epochs=3"])
    assert (config.model.name, config.model.width, config.train.epochs) == ("vgg16", 0.5, 3)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(BitsweepError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1,\n")
    with pytest.raises(BitsweepError, match="is not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BitsweepError, match="must hold a mapping of sections"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "section.yaml").write_text("train: 5\n")
    with pytest.raises(BitsweepError, match="train must be a mapping of train options"):
        load_run_config(tmp_path / "section.yaml")
