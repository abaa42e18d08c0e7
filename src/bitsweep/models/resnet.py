"""ResNet-20 for 32x32 images (He et al., 2016, section 4.2).

Three stages of three basic blocks with 16, 32 and 64 channels (times
``width``). Where a block changes shape, the shortcut is a 1x1 convolution
with BatchNorm (option B) instead of option A's zero padding: every layer is
then an ordinary Conv2d/BatchNorm2d pair that BN folding, fake quantization
and the integer reference executor already understand, at a cost of 1 %
more parameters (272,474 instead of 269,722 for 10 classes). Residual sums go through the
:class:`~bitsweep.models.mobilenetv2.Add` module so quantizers can observe both
inputs and the result.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsweep.models.common import check_size_options, init_weights
from bitsweep.models.mobilenetv2 import Add

_STAGE_CHANNELS = (16, 32, 64)
_BLOCKS_PER_STAGE = 3  # 6n + 2 = 20 layers with n = 3


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Convolution -> BatchNorm without activation (the activation follows the residual sum)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU -> conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(in_channels, out_channels, 3, stride), nn.ReLU(inplace=False))
        self.conv2 = _conv_bn(out_channels, out_channels, 3, 1)
        self.shortcut: nn.Module = (
            _conv_bn(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.add = Add()
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        summed: torch.Tensor = self.relu(self.add(self.shortcut(x), out))
        return summed


class ResNet20(nn.Module):
    """ResNet-20 with option-B shortcuts; stride-2 stages halve 32x32 to 8x8."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_size_options("resnet20", width, dropout)
        widths = [max(4, int(round(c * width))) for c in _STAGE_CHANNELS]
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], 3, 1), nn.ReLU(inplace=False))
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, out in enumerate(widths):
            for i in range(_BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out, stride))
                channels = out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)
        for m in self.modules():
            # Zero-init the last BN of each residual branch: blocks start as identities,
            # which makes the first epochs of short runs noticeably more stable.
            if isinstance(m, BasicBlock):
                bn = m.conv2[1]  # conv2 = Sequential(conv, bn): see _conv_bn
                assert isinstance(bn, nn.BatchNorm2d)
                nn.init.zeros_(bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))  # (N, C, H, W) -> (N, 64w, H/4, W/4)
        x = self.pool(x).flatten(1)  # (N, 64w, 1, 1) -> (N, 64w)
        logits: torch.Tensor = self.classifier(x)
        return logits
