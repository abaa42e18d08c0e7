"""Checks shared by every architecture's constructor."""

from __future__ import annotations

from torch import nn


def check_size_options(model: str, width: float, dropout: float) -> None:
    """Validate the two options every registered model takes.

    ``create_model`` turns the ValueError into a user-facing error naming the model.

    >>> check_size_options("vgg16", 0.0, 0.5)
    Traceback (most recent call last):
    ...
    ValueError: vgg16 width must be in (0, 4], got 0.0
    """
    if not 0.0 < width <= 4.0:
        raise ValueError(f"{model} width must be in (0, 4], got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model} dropout must be in [0, 1), got {dropout}")


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit BatchNorm, small-normal classifiers.

    The initialisation of the reference MobileNet-v2 and VGG implementations,
    shared so every registered model starts from the same conventions.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
