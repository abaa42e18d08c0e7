"""Frozen configuration dataclasses and their loading from dicts, YAML recipes and overrides.

Every run is described by one :class:`RunConfig` value. It is built from a YAML
recipe (``configs/*.yaml``), then ``section.key=value`` overrides from the
command line, and validated once: unknown keys and wrong types are rejected
with a message naming the key and the closest valid spelling, so a typo in a
recipe never silently trains the default model.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from bitsweep.errors import BitsweepError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it where lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except BitsweepError as e:
                errors.append(str(e))
        raise BitsweepError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):  # a dataclass type, never an instance, in annotations
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise BitsweepError(not_a_mapping(where, tp, value))
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BitsweepError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BitsweepError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise BitsweepError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BitsweepError(f"{where}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise BitsweepError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise BitsweepError(f"{where}: expected a string, got {value!r}")
    return value


def not_a_mapping(where: str, cls: Any, value: Any) -> str:
    """The message for a section given a single value, e.g. ``train: 5`` or ``--set train=5``.

    >>> print(not_a_mapping("train", TrainConfig, 5))
    train must be a mapping of train options (--set train.epochs=200, or epochs: 200 indented under train:), got 5
    """
    first = dataclasses.fields(cls)[0]
    example = first.default if first.default is not dataclasses.MISSING else "..."
    return (f"{where} must be a mapping of {where.rsplit('.', 1)[-1]} options (--set {where}.{first.name}={example}, "
            f"or {first.name}: {example} indented under {where}:), got {value!r}")  # fmt: skip


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``"a.b"``, creating sections; a section holding a value is a user error.

    >>> d = {}
    >>> set_dotted(d, "train.epochs", 3)
    >>> d
    {'train': {'epochs': 3}}
    >>> set_dotted({"train": 5}, "train.epochs", 3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bitsweep.errors.BitsweepError: train must be a mapping of train options (...), got 5
    """
    node = data
    *parents, last = dotted.split(".")
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            section = _section_class(where)
            raise BitsweepError(not_a_mapping(where, section, child) if section is not None else
                                f"{where} must be a mapping, got {child!r}")  # fmt: skip
        node = child
    node[last] = value


def _section_class(where: str) -> Any:
    """The config dataclass at the dotted path ``where`` of a RunConfig, or None."""
    cls: Any = RunConfig
    for key in where.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(key)
        if cls is None:
            return None
    return cls if dataclasses.is_dataclass(cls) else None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    >>> from_dict(AugmentConfig, {"cutout": 8}).cutout
    8
    >>> from_dict(AugmentConfig, {"cutuot": 8})  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    bitsweep.errors.BitsweepError: unknown key 'cutuot' (did you mean 'cutout'?);
        valid keys: crop_padding, hflip, autoaugment, cutout
    """
    if not isinstance(data, dict):
        raise BitsweepError(f"{where or _type_name(cls)}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BitsweepError(f"unknown key '{path}'{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise BitsweepError(f"{where + ': ' if where else ''}{e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass, suitable for YAML/JSON and ``from_dict``."""
    out = dataclasses.asdict(config)

    def _plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [_plain(x) for x in v]
        if isinstance(v, dict):
            return {k: _plain(x) for k, x in v.items()}
        return v

    plain: dict[str, Any] = _plain(out)
    return plain


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.epochs=3"`` into (``["train", "epochs"]``, ``3``); the value is read as YAML.

    >>> parse_override("train.lr=0.1")
    (['train', 'lr'], 0.1)
    """
    if "=" not in text:
        raise BitsweepError(f"override '{text}' must look like section.key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise BitsweepError(f"override '{text}' has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``data`` with each ``a.b=value`` override applied."""
    out = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict, with one clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise BitsweepError(f"config file '{p}' not found; recipes ship in the configs/ folder of the repository")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise BitsweepError(f"config file '{p}' is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                            "save it as UTF-8") from None  # fmt: skip
    except yaml.YAMLError as e:
        raise BitsweepError(f"config file '{p}' is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise BitsweepError(f"config file '{p}' must hold a mapping of sections (data, model, train, ...)")
    return data


# --------------------------------------------------------------------------- run configuration


@dataclass(frozen=True)
class AugmentConfig:
    """Batched training-time augmentation; each op runs on whole batches of uint8 images."""

    crop_padding: int = 4  # random crop after zero padding by this many pixels; 0 disables
    hflip: bool = True
    autoaugment: bool = False  # the CIFAR-10 AutoAugment policy (Cubuk et al., 2019)
    cutout: int = 0  # side of the square Cutout hole in pixels; 0 disables

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.cutout < 0:
            raise ValueError(f"cutout must be >= 0, got {self.cutout}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how the validation split is held out."""

    name: str = "digits"  # cifar10, cifar100, fashion_mnist, digits, synthetic
    data_dir: str | None = None  # extracted archives or IDX files; None = default search paths
    download: bool = True  # fetch the official archive when it is not found locally
    val_size: int | None = None  # images held out of the training set; None = dataset default
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.val_size is not None and self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")


@dataclass(frozen=True)
class ModelConfig:
    """A registered architecture and its size options (see ``bitsweep.models.list_models``)."""

    name: str = "mobilenetv2"
    width: float = 1.0  # channel multiplier
    dropout: float = 0.2  # before the classifier

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 4.0:
            raise ValueError(f"model width must be in (0, 4], got {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe. Defaults are the reference CIFAR-100 MobileNet-v2 recipe."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # not applied to BatchNorm parameters and biases
    warmup_epochs: float = 10.0  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1
    eval_batch_size: int = 1024
    channels_last: bool = True
    amp: bool = True  # bf16 autocast where the device supports it (CUDA); ignored on CPU
    compile: bool = False  # torch.compile the model
    tensorboard: bool = True  # log to TensorBoard when it is installed
    wandb: bool = False  # log to Weights & Biases in offline mode when it is installed

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be a positive whole number, got {self.epochs}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError("batch sizes must be positive")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on; saved resolved in every run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps, ...
    output_dir: str = "runs"
    run_name: str | None = None  # default: <dataset>-<model>-<timestamp>


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from an optional YAML recipe plus ``a.b=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)
