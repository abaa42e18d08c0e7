"""Model registry: architectures by name, so configs and checkpoints can name them."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.models.mobilenetv2 import MobileNetV2
from bitsweep.models.resnet import ResNet20
from bitsweep.models.vgg import VGG16

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its factory and a one-line description."""

    name: str
    factory: ModelFactory
    description: str


def _entries() -> dict[str, ModelEntry]:
    # Built on each call, so there is no mutable module-level registry to patch or leak between tests.
    entries = [
        ModelEntry("mobilenetv2", MobileNetV2, "MobileNet-v2, stride-1 stem for 32x32 images"),
        ModelEntry("vgg16", VGG16, "VGG-16 with BatchNorm, the CIFAR-10 reference baseline"),
        ModelEntry("resnet20", ResNet20, "ResNet-20 (He et al., 2016) for 32x32 images"),
    ]
    return {e.name: e for e in entries}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_entries())


def create_model(name: str, num_classes: int, in_channels: int = 3, **options: object) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier output.
        in_channels: image channels (3 for CIFAR, 1 for Fashion-MNIST and digits).
        **options: architecture options such as ``width`` and ``dropout``.

    Raises:
        BitsweepError: for an unknown name or option, with the valid choices.
    """
    entries = _entries()
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise BitsweepError(f"unknown model '{name}'{hint}; available: {', '.join(sorted(entries))}")
    if num_classes < 1 or in_channels < 1:
        raise BitsweepError(f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}")
    factory = entries[name].factory
    accepted = set(inspect.signature(factory).parameters) - {"num_classes", "in_channels"}
    unknown = set(options) - accepted
    if unknown:
        raise BitsweepError(
            f"model '{name}' has no option(s) {', '.join(sorted(unknown))}; it accepts: {', '.join(sorted(accepted))}"
        )
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **options)
    except ValueError as e:
        raise BitsweepError(str(e)) from None
