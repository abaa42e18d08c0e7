"""Checks and memory-format setup shared by every architecture."""

from __future__ import annotations

import torch
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


# oneDNN 3.12 (torch 2.13.0+cpu) corrupts the heap in the AVX2 kernel for the weight gradient of a
# 1x1 convolution with stride > 1 when its input is channels-last (nhwc) with fewer than 8 channels
# (one AVX2 register of float32): "jit_1x1:avx2,backward_weights" reads/writes past its buffers.
# Measured with ONEDNN_MAX_CPU_ISA=AVX2: in_channels 1..7 abort within 200 steps, 8, 9, 10, 12, 16, 32
# run clean; 3x3 kernels, stride 1, NCHW inputs (which oneDNN pads to 8 channels) and AVX-512 kernels
# run clean. Forward passes are not affected.
ONEDNN_NHWC_MIN_CHANNELS = 8


def channels_last_hazard(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution whose channels-last backward hits the oneDNN AVX2 bug.

    >>> channels_last_hazard(nn.Conv2d(4, 8, kernel_size=1, stride=2))
    True
    >>> channels_last_hazard(nn.Conv2d(16, 32, kernel_size=1, stride=2))
    False
    """
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride != (1, 1)
        and module.in_channels < ONEDNN_NHWC_MIN_CHANNELS
    )


def _nchw_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0].contiguous(),) + tuple(args[1:])


def _channels_last_output(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output.contiguous(memory_format=torch.channels_last)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put ``model`` in channels-last memory format, except CPU convolutions that would crash there.

    Channels-last is 1.2-2x faster for training on CPU, so every layer keeps it
    except a :func:`channels_last_hazard` convolution on the CPU: that one gets
    an NCHW weight and hooks that hand it an NCHW input and give its output back
    in channels-last, so oneDNN takes its padded NCHW kernel. The module stays a
    plain ``nn.Conv2d`` with the same state dict (quantization, export and
    checkpoints see no difference); ResNet-20 below width 0.5 is the only
    registered model that has such a layer (its first stride-2 shortcut).
    Call it once at model setup, after moving the model to its device; calling
    it again adds nothing. With ``in_channels == 1`` NCHW and NHWC are the same
    memory and the hooks cannot help; no registered model has such a layer.

    Returns:
        The same module, converted in place (like ``nn.Module.to``).
    """
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs
    for m in model.modules():
        if not (channels_last_hazard(m) and m.weight.device.type == "cpu"):
            continue
        # A 1x1 weight's strides are ambiguous: .contiguous() keeps channels-last ones, clone does not.
        m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
        if _nchw_input not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_nchw_input)
            m.register_forward_hook(_channels_last_output)
    return model
