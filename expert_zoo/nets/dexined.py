"""DexiNed, the "Dense Extreme Inception Network" edge detector (Soria, Riba & Sappa, WACV 2020).

Our own implementation of the network Prismer uses as its ``edge`` expert. Module names and the order
in which modules are registered reproduce the original ``state_dict`` keys exactly (319 entries), so
Prismer's ``10_model.pth`` loads with ``strict=True``.

Shape of the network, for an input of H×W (H and W multiples of 16):

* six blocks at strides 2, 2, 4, 8, 16, 16. Blocks 1–2 are plain double convolutions; blocks 3–6 are
  "dense" blocks whose layers average their output with a skip input (``0.5 * (new + skip)``);
* 1×1 "side" convolutions carry each block's output down to the next scale, and "pre-dense" 1×1
  convolutions feed each dense block its skip input;
* six up-sampling heads (1×1 conv, ReLU, transposed conv, repeated) bring every block back to H×W
  as a one-channel logit map; a 1×1 conv over the six maps gives the fused map.

``forward`` returns the seven pre-sigmoid maps ``[side_1, ..., side_6, fused]``, each N×1×H×W.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# Channel widths of the original network; ``width`` scales all of them (reduced nets for tests).
_STAGE_CHANNELS = (32, 64, 128, 256, 512)
_UP_CHANNELS = 16
_STRIDE = 16  # total down-sampling; inputs must be a multiple of it for the six maps to align


class SingleConvBlock(nn.Module):
    """1×1 convolution (optionally strided), then batch norm unless ``use_bn`` is off.

    With ``use_bn=False`` the ``bn`` module still exists: the original registers it, so its entries are
    part of the checkpoint, but it is never applied.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, use_bn: bool = True) -> None:
        super().__init__()
        self.use_bn = use_bn
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.use_bn else x


class DoubleConvBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN (→ ReLU when ``final_relu``); the first conv may be strided."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1, final_relu: bool = True
    ) -> None:
        super().__init__()
        self.final_relu = final_relu
        self.conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x) if self.final_relu else x


class DenseLayer(nn.Module):
    """ReLU → conv3×3 (pad 2) → BN → ReLU → conv3×3 (pad 0) → BN, averaged with the block's skip input.

    The padding 2 / padding 0 pair keeps the spatial size, as in the original.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=2)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=0)
        self.norm2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Not in place: ``x`` can be a tensor the caller still holds.
        y = self.relu1(self.norm1(self.conv1(F.relu(x))))
        y = self.norm2(self.conv2(y))
        return 0.5 * (y + skip)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers in a chain (``denselayer1``, ...); every layer sees the same skip input."""

    def __init__(self, num_layers: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        for index in range(num_layers):
            self.add_module(f"denselayer{index + 1}", DenseLayer(in_channels, out_channels))
            in_channels = out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x, skip)
        return x


class UpConvBlock(nn.Module):
    """Bring a map at stride ``2**num_stages`` back to full size as one channel of logits.

    Each stage is conv1×1 → ReLU → transposed conv (stride 2, kernel ``2**num_stages``); the
    intermediate stages have ``mid_channels`` channels and the last one a single channel. The flat
    ``features`` sequence keeps the original key indices (``features.0``, ``features.2``, ...).
    """

    # Transposed-conv padding per number of stages: it makes every stage exactly double the size.
    _PADDING: ClassVar[dict[int, int]] = {1: 0, 2: 1, 3: 3, 4: 7}

    def __init__(self, in_channels: int, num_stages: int, mid_channels: int = _UP_CHANNELS) -> None:
        super().__init__()
        kernel = 2**num_stages
        padding = self._PADDING[num_stages]
        layers: list[nn.Module] = []
        for stage in range(num_stages):
            out_channels = 1 if stage == num_stages - 1 else mid_channels
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(out_channels, out_channels, kernel, stride=2, padding=padding),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class DexiNed(nn.Module):
    """The DexiNed network; ``width`` scales every channel count (1.0 is the original, 35.2 M parameters)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.width = width
        c32, c64, c128, c256, c512 = (_scaled(c, width) for c in _STAGE_CHANNELS)
        up = _scaled(_UP_CHANNELS, width)

        # Registration order = state-dict order of the original checkpoint.
        self.block_1 = DoubleConvBlock(3, c32, c64, stride=2)
        self.block_2 = DoubleConvBlock(c64, c128, c128, final_relu=False)
        self.dblock_3 = DenseBlock(2, c128, c256)
        self.dblock_4 = DenseBlock(3, c256, c512)
        self.dblock_5 = DenseBlock(3, c512, c512)
        self.dblock_6 = DenseBlock(3, c512, c256)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.side_1 = SingleConvBlock(c64, c128, stride=2)
        self.side_2 = SingleConvBlock(c128, c256, stride=2)
        self.side_3 = SingleConvBlock(c256, c512, stride=2)
        self.side_4 = SingleConvBlock(c512, c512)
        self.side_5 = SingleConvBlock(c512, c256)  # in the checkpoint, unused by the forward pass

        self.pre_dense_2 = SingleConvBlock(c128, c256, stride=2)
        self.pre_dense_3 = SingleConvBlock(c128, c256)
        self.pre_dense_4 = SingleConvBlock(c256, c512)
        self.pre_dense_5 = SingleConvBlock(c512, c512)
        self.pre_dense_6 = SingleConvBlock(c512, c256)

        self.up_block_1 = UpConvBlock(c64, 1, up)
        self.up_block_2 = UpConvBlock(c128, 1, up)
        self.up_block_3 = UpConvBlock(c256, 2, up)
        self.up_block_4 = UpConvBlock(c512, 3, up)
        self.up_block_5 = UpConvBlock(c512, 4, up)
        self.up_block_6 = UpConvBlock(c256, 4, up)
        self.block_cat = SingleConvBlock(6, 1, use_bn=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[-2] % _STRIDE or x.shape[-1] % _STRIDE:
            raise ValueError(
                f"DexiNed needs an N×3×H×W input with H, W multiples of {_STRIDE}, got {tuple(x.shape)}"
            )
        # Stride 2: two plain conv blocks.
        block_1 = self.block_1(x)
        block_2 = self.block_2(block_1)

        # Stride 4: first dense block; its skip input comes from block 2, its chain input adds block 1's side.
        block_2_down = self.maxpool(block_2)
        block_2_add = block_2_down + self.side_1(block_1)
        block_3 = self.dblock_3(block_2_add, self.pre_dense_3(block_2_down))

        # Stride 8.
        block_3_down = self.maxpool(block_3)
        block_3_add = block_3_down + self.side_2(block_2_add)
        block_4_skip = self.pre_dense_4(block_3_down + self.pre_dense_2(block_2_down))
        block_4 = self.dblock_4(block_3_add, block_4_skip)

        # Stride 16: blocks 5 and 6 stay at this scale.
        block_4_down = self.maxpool(block_4)
        block_4_add = block_4_down + self.side_3(block_3_add)
        block_5 = self.dblock_5(block_4_add, self.pre_dense_5(block_4_down))
        block_5_add = block_5 + self.side_4(block_4_add)
        block_6 = self.dblock_6(block_5_add, self.pre_dense_6(block_5))

        sides = [
            self.up_block_1(block_1),
            self.up_block_2(block_2),
            self.up_block_3(block_3),
            self.up_block_4(block_4),
            self.up_block_5(block_5),
            self.up_block_6(block_6),
        ]
        fused = self.block_cat(torch.cat(sides, dim=1))
        return [*sides, fused]


def width_from_state_dict(state_dict: dict[str, torch.Tensor]) -> float:
    """The ``width`` a DexiNed checkpoint was built with, read from its first convolution."""
    try:
        first = state_dict["block_1.conv1.weight"]
    except KeyError as exc:
        raise ValueError("not a DexiNed state dict: it has no 'block_1.conv1.weight'") from exc
    return first.shape[0] / _STAGE_CHANNELS[0]
