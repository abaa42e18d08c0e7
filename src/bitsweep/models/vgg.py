"""VGG-16 with BatchNorm for small images, the CIFAR-10 reference baseline.

The 13 convolutions follow Simonyan and Zisserman (2015), configuration D,
with BatchNorm after each convolution as in the common CIFAR variants. The
five max-pools use ``ceil_mode=True``, so a map that is already 1x1 stays
1x1: the same network therefore runs on 32x32 (CIFAR), 28x28
(Fashion-MNIST) and 8x8 (digits) images without special cases. The
classifier is the CIFAR-sized one (512 -> 512 -> classes, with dropout)
rather than the ImageNet 4096-wide head, which would be 90 % of the weights
for no accuracy gain on 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsweep.models.common import check_size_options, init_weights

# Output channels per convolution; "M" is a 2x2 max-pool (configuration D).
_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def _channels(base: int, width: float) -> int:
    """Scale a channel count by ``width``, keeping at least 8 channels."""
    return max(8, int(round(base * width)))


class ConvBNReLU(nn.Sequential):
    """3x3 convolution -> BatchNorm -> ReLU, the unit BN folding works on."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=False),
        )


class VGG16(nn.Module):
    """VGG-16-BN: 13 conv3x3-BN-ReLU layers, five max-pools, a two-layer classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_size_options("vgg16", width, dropout)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _LAYOUT:
            if item == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so 8x8 inputs survive five pools.
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = _channels(int(item), width)
                layers.append(ConvBNReLU(channels, out))
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _channels(512, width)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C, H, W) -> (N, 512w, ceil(H/32), ceil(W/32))
        x = self.pool(x).flatten(1)  # (N, 512w, 1, 1) -> (N, 512w)
        logits: torch.Tensor = self.classifier(x)
        return logits
