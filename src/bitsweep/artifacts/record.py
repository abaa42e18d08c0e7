"""The model record: everything needed to rebuild a float network, stored in every model file.

A record names how to build the network (a registry name with its options, or an
importable factory ``"package.module:callable"`` with JSON keyword arguments for a
user's own ``nn.Module``), the data geometry it expects (classes, channels, image
size, normalization) and the shape of every parameter or buffer whose shape differs
from what that factory builds. Storing only the differences keeps an unpruned
model's packed file as small as before, while a pruned model (fewer channels in some
Conv2d/BatchNorm2d/Linear layers) is rebuilt at its stored shapes before its state
is loaded. Building first happens on the ``meta`` device, so a damaged record that
asks for gigabytes is refused before anything is allocated.

>>> from bitsweep.models import create_model
>>> model = create_model("mobilenetv2", 10, 1, width=0.25)
>>> record = ModelRecord.of(model, name="mobilenetv2", options={"width": 0.25}, num_classes=10, in_channels=1,
...                         image_size=(8, 8), mean=(0.5,), std=(0.25,))
>>> record.shapes, ModelRecord.from_dict(record.to_dict()) == record
({}, True)
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.models import create_model

# Largest factory model (elements) built before its record's shapes are checked against a file's payload.
FACTORY_SLACK_ELEMENTS = 1 << 25  # 128 MiB of float32


@dataclass(frozen=True)
class ModelRecord:
    """How to rebuild a float network: its factory, data geometry and the shapes that differ from the factory's.

    Attributes:
        name: a registered model name (``bitsweep.models.list_models()``), or None with ``factory``.
        factory: ``"package.module:callable"`` returning an ``nn.Module``, for models outside the registry.
        options: keyword arguments of the registry model (``width``, ``dropout``) or of ``factory``; JSON values.
        num_classes: classifier outputs.
        in_channels: image channels.
        image_size: (height, width) of one input image.
        mean: per-channel normalization mean.
        std: per-channel normalization standard deviation.
        shapes: state key -> shape, for every parameter/buffer whose shape differs from the factory's.
    """

    name: str | None
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.name is None) == (self.factory is None):
            raise ValueError("a model record needs exactly one of a registry name or a 'module:callable' factory")
        if self.factory is not None and (self.factory.count(":") != 1 or not all(self.factory.split(":"))):
            raise ValueError(f"factory must look like 'package.module:callable', got {self.factory!r}")
        if self.num_classes < 1 or self.in_channels < 1:
            raise ValueError(
                f"num_classes and in_channels must be positive, got {self.num_classes}, {self.in_channels}"
            )
        if len(self.image_size) != 2 or min(self.image_size) < 1 or max(self.image_size) > 16384:
            raise ValueError(f"image_size must be (height, width) between 1 and 16384, got {self.image_size}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")
        for key, shape in self.shapes.items():
            if any(d < 0 for d in shape):
                raise ValueError(f"shape of {key} has a negative size: {shape}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.in_channels, *self.image_size)

    @property
    def label(self) -> str:
        """The registry name or the factory, for messages."""
        return self.name if self.name is not None else str(self.factory)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
        factory: str | None = None,
    ) -> ModelRecord:
        """The record of a float ``model`` (before ``quantize_``), with the shapes where it differs from its factory.

        Without ``name`` and ``factory`` the model's own class is the factory (called with ``options``).

        Raises:
            BitsweepError: the factory cannot be imported, or builds a model with other state keys.
        """
        if name is None and factory is None:
            factory = f"{type(model).__module__}:{type(model).__qualname__}"
        record = cls(
            name,
            num_classes,
            in_channels,
            (int(image_size[0]), int(image_size[1])),
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
            dict(options or {}),
            factory,
        )
        record.to_dict()  # options must be JSON
        built = record.factory_shapes()
        have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if set(built) != set(have):
            extra, missing = sorted(set(have) - set(built)), sorted(set(built) - set(have))
            raise BitsweepError(
                f"{record.label} with options {record.options} does not build this model "
                f"(only in the model: {extra[:3]}, only in the factory's: {missing[:3]}); "
                "pass the factory and options that build it"
            )
        diff = {k: s for k, s in have.items() if built[k] != s}
        return cls(
            record.name,
            num_classes,
            in_channels,
            record.image_size,
            record.mean,
            record.std,
            record.options,
            record.factory,
            diff,
        )

    def _factory_model(self) -> nn.Module:
        if self.name is not None:
            return create_model(self.name, self.num_classes, self.in_channels, **self.options)
        module_name, attr = str(self.factory).split(":")
        try:
            fn: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                fn = getattr(fn, part)
        except (ImportError, AttributeError) as e:
            raise BitsweepError(
                f"cannot import the model factory '{self.factory}' ({e}); install the package that defines it"
            ) from None
        try:
            model = fn(**self.options)
        except TypeError as e:
            raise BitsweepError(f"model factory '{self.factory}' refused options {self.options}: {e}") from None
        if not isinstance(model, nn.Module):
            raise BitsweepError(f"model factory '{self.factory}' returned {type(model).__name__}, not an nn.Module")
        return model

    def factory_shapes(self) -> dict[str, tuple[int, ...]]:
        """State key -> shape of the factory's model, built on the ``meta`` device (nothing allocated)."""
        with torch.device("meta"):
            model = self._factory_model()
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """State key -> shape of the rebuilt model: the factory's, with the stored shapes applied."""
        shapes = self.factory_shapes()
        unknown = sorted(set(self.shapes) - set(shapes))
        if unknown:
            raise BitsweepError(f"the model record stores shapes for {unknown[:3]}, which {self.label} does not have")
        return {**shapes, **self.shapes}

    def check_size(self, max_elements: int) -> None:
        """Refuse a record whose model would hold more than ``max_elements`` values (before allocating it).

        Raises:
            BitsweepError: the factory or the rebuilt model is larger than the file can hold.
        """
        factory = sum(math.prod(s) for s in self.factory_shapes().values())
        final = sum(math.prod(s) for s in self.state_shapes().values())
        if final > max_elements or factory > max(16 * max_elements, FACTORY_SLACK_ELEMENTS):
            raise BitsweepError(
                f"the model record asks for {max(final, factory):,} values, more than the file's "
                f"data can hold ({max_elements:,}); the file is damaged, write it again"
            )

    def build(self) -> nn.Module:
        """A fresh float model (random weights) at the stored shapes, ready for ``load_state_dict``.

        Raises:
            BitsweepError: the factory is missing, or a stored shape has no place in its model.
        """
        model = self._factory_model()
        if self.shapes:
            unknown = sorted(set(self.shapes) - set(model.state_dict()))
            if unknown:
                raise BitsweepError(
                    f"the model record stores shapes for {unknown[:3]}, which {self.label} does not have"
                )
            owners: dict[str, dict[str, tuple[int, ...]]] = {}
            for key, shape in self.shapes.items():
                module_name, _, attr = key.rpartition(".")
                owners.setdefault(module_name, {})[attr] = shape
            for module_name, attrs in owners.items():
                _reshape(model.get_submodule(module_name), attrs)
        return model

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain dict (what every model file stores); None and empty fields are omitted.

        Raises:
            BitsweepError: options that are not JSON values.
        """
        try:
            json.dumps(self.options, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise BitsweepError(
                f"model options must be JSON values ({e}); pass numbers, strings, lists or dicts"
            ) from None
        d: dict[str, Any] = {
            "name": self.name,
            "factory": self.factory,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "options": dict(self.options),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
        }
        # Empty fields are left out: every byte of this dict is part of the packed file's size.
        return {k: v for k, v in d.items() if not (v is None or (k == "shapes" and not v))}

    @classmethod
    def from_dict(cls, d: Any) -> ModelRecord:
        """The record of :meth:`to_dict`'s output, with every type checked.

        Raises:
            BitsweepError: a missing field or a value of the wrong type, in one line.
        """
        try:
            if not isinstance(d, dict) or not isinstance(d.get("options", {}), dict):
                raise TypeError("not a dict")
            for key in ("name", "factory"):
                if d.get(key) is not None and not isinstance(d[key], str):
                    raise TypeError(f"{key} is not a string")
            shapes = d.get("shapes", {})
            if not isinstance(shapes, dict) or not all(
                isinstance(k, str) and isinstance(s, list) and all(_is_int(v) for v in s) for k, s in shapes.items()
            ):
                raise TypeError("shapes is not a mapping of key -> list of sizes")
            ints = [d["num_classes"], d["in_channels"], *d["image_size"]]
            floats = [*d["mean"], *d["std"]]
            if not all(_is_int(v) for v in ints) or not all(_is_number(v) for v in floats):
                raise TypeError("num_classes, in_channels, image_size, mean or std is not a number")
            return cls(
                d.get("name"),
                d["num_classes"],
                d["in_channels"],
                tuple(d["image_size"]),
                tuple(float(v) for v in d["mean"]),
                tuple(float(v) for v in d["std"]),
                dict(d.get("options", {})),
                d.get("factory"),
                {k: tuple(s) for k, s in shapes.items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BitsweepError(f"the model record is invalid ({e}); write the model file again") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _reshape(module: Any, attrs: dict[str, tuple[int, ...]]) -> None:
    """Give ``module`` tensors of the stored shapes and update the attributes that describe them."""
    conv = isinstance(module, _CONVS)
    groups_before = int(getattr(module, "groups", 1))
    per_group_out = int(getattr(module, "out_channels", 1)) // groups_before
    # A depthwise convolution (groups == in_channels) stays depthwise when channels are pruned.
    depthwise = conv and groups_before > 1 and groups_before == module.in_channels
    for attr, shape in attrs.items():
        old = getattr(module, attr)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, attr, new)
    if conv:
        out, in_per_group = module.weight.shape[:2]
        groups = out // per_group_out if depthwise else groups_before
        if out % groups:
            raise BitsweepError(
                f"a pruned convolution has {out} output channels, not a multiple of its {groups} groups"
            )
        module.out_channels, module.in_channels, module.groups = int(out), int(in_per_group * groups), int(groups)
    elif isinstance(module, _NORMS):
        ref = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = (int(v) for v in module.weight.shape)


def state_bound(state: Mapping[str, Any]) -> int:
    """A generous bound on the values a model rebuilt from ``state`` may hold (for :meth:`ModelRecord.check_size`).

    The state is already in memory, so this only stops a damaged record from allocating far more
    (a ``num_classes`` of 200,000); a state that merely does not fit is left to ``load_state_dict``,
    whose message names the mismatching layer.
    """
    return 16 * sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)) + (1 << 20)


def check_finite(state: Mapping[str, torch.Tensor], what: str = "the checkpoint") -> None:
    """Refuse a state with NaN or infinite values, naming the first damaged tensor.

    Raises:
        BitsweepError: ``layer KEY has N NaN values; ...``.
    """
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t).sum())
        inf = int((~finite).sum()) - nan
        parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
        raise BitsweepError(
            f"layer {key} has {' and '.join(p for p in parts if p)} values; {what} is damaged or "
            "training diverged; retrain or pick an earlier checkpoint"
        )
