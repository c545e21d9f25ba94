"""CharNet, the "Convolutional Character Network" text spotter (Xing et al., ICCV 2019).

Our own implementation of the network Prismer uses as its ``ocr_detection`` expert (the Hourglass-88
backbone, ICDAR 2015 model). Module names and registration order reproduce the original ``state_dict``
keys exactly (594 entries), so Prismer's ``icdar2015_hourglass88.pth`` loads with ``strict=True``.

Shape of the network, for an N×3×H×W input (H and W multiples of 32 keep every level aligned):

* backbone: a stride-2 7×7 stem conv and a stride-2 residual block (so features are at stride 4), then
  two stacked hourglasses. Each hourglass keeps a residual branch at its own scale and recurses on a
  max-pooled copy (three levels, the deepest widened to 512 channels), adding the bilinearly upsampled
  (``align_corners=True``) inner result to the skip branch. There is no separate decoder.
* three heads on the stride-4 features, each conv3×3-BN-ReLU stacks then 1×1 convolutions:
  a word detector (2-way foreground, 4 distances top/bottom/left/right, 1 orientation angle),
  a character detector (foreground and distances) and a character recogniser (68 classes).

``forward`` returns a dict of N×C×H/4×W/4 maps: the pre-softmax ``*_logits`` and the softmaxes
``word_fg``, ``char_fg``, ``char_cls``; ``word_tblr`` / ``char_tblr`` are ``relu(conv) * 10`` (distances
in stride-4 cells); ``word_orient`` is the raw angle in radians.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUM_CHAR_CLASSES = 68
_BN_EPS = 1e-5
_TBLR_SCALE = 10.0  # the heads predict distances in tenths of a stride-4 cell


def _conv_bn(in_channels: int, out_channels: int, relu: bool, stride: int = 1) -> nn.Sequential:
    """conv3×3 (no bias) → BN (→ ReLU), as an index-named Sequential (keys ``0.weight``, ``1.*``)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels, eps=_BN_EPS),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """Two 3×3 conv-BN stages plus a skip (a strided 3×3 conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_1 = _conv_bn(in_channels, out_channels, relu=True, stride=stride)
        self.conv_2 = _conv_bn(out_channels, out_channels, relu=False)
        # The original registers a projection only when needed; an identity skip has no keys.
        self.skip = (
            _conv_bn(in_channels, out_channels, relu=False, stride=stride)
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        return self.out_relu(self.conv_2(self.conv_1(x)) + shortcut)


def _residual_stack(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    """Change the width in the first block (the way into a deeper level)."""
    blocks = [Residual(in_channels, out_channels)]
    blocks += [Residual(out_channels, out_channels) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def _residual_stack_reversed(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    """Change the width in the last block (the way back out of a deeper level)."""
    blocks = [Residual(in_channels, in_channels) for _ in range(num_blocks - 1)]
    blocks.append(Residual(in_channels, out_channels))
    return nn.Sequential(*blocks)


class HourglassBlock(nn.Module):
    """One hourglass level: ``up_1`` at this scale + upsample(``low_3(low_2(low_1(pool(x))))``).

    ``low_2`` is the next level down, or a plain residual stack at the bottom (``depth == 1``).
    """

    def __init__(self, depth: int, channels: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        self.up_1 = _residual_stack(channels[0], channels[0], blocks[0])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.low_1 = _residual_stack(channels[0], channels[1], blocks[0])
        if depth <= 1:
            self.low_2: nn.Module = _residual_stack(channels[1], channels[1], blocks[1])
        else:
            self.low_2 = HourglassBlock(depth - 1, channels[1:], blocks[1:])
        self.low_3 = _residual_stack_reversed(channels[1], channels[0], blocks[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.up_1(x)
        low = self.low_3(self.low_2(self.low_1(self.pool(x))))
        # The original upsamples by a factor of 2; giving the skip's size instead is the same for the
        # even sizes it supports and keeps odd sizes aligned.
        low = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return low + skip


class HourglassNet(nn.Module):
    """Stem (7×7 stride-2 conv-BN-ReLU, stride-2 residual) and two stacked hourglasses: stride 4."""

    def __init__(
        self, depth: int, channels: Sequence[int], blocks: Sequence[int], stem_channels: int = 128
    ) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_channels, eps=_BN_EPS),
            nn.ReLU(),
            Residual(stem_channels, channels[0], stride=2),
        )
        self.hourglass_blocks = nn.Sequential(*(HourglassBlock(depth, channels, blocks) for _ in range(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hourglass_blocks(self.pre(x))


def _conv3x3_bn_relu(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """conv3×3 (no bias) → BN → ReLU, with named members (keys ``conv.weight``, ``bn.*``)."""
    return nn.Sequential(
        OrderedDict(
            [
                (
                    "conv",
                    nn.Conv2d(
                        in_channels,
                        out_channels,
                        kernel_size=3,
                        padding=dilation,
                        dilation=dilation,
                        bias=False,
                    ),
                ),
                ("bn", nn.BatchNorm2d(out_channels, eps=_BN_EPS)),
                ("relu", nn.ReLU()),
            ]
        )
    )


class WordDetector(nn.Module):
    """Word foreground logits, word box distances (t, b, l, r) and the word's orientation angle."""

    def __init__(self, in_channels: int, bottleneck_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.word_det_conv_final = _conv3x3_bn_relu(in_channels, bottleneck_channels, dilation)
        self.word_fg_feat = _conv3x3_bn_relu(bottleneck_channels, bottleneck_channels, dilation)
        self.word_regression_feat = _conv3x3_bn_relu(bottleneck_channels, bottleneck_channels, dilation)
        self.word_fg_pred = nn.Conv2d(bottleneck_channels, 2, kernel_size=1)
        self.word_tblr_pred = nn.Conv2d(bottleneck_channels, 4, kernel_size=1)
        self.orient_pred = nn.Conv2d(bottleneck_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = self.word_det_conv_final(x)
        fg_logits = self.word_fg_pred(self.word_fg_feat(feat))
        regression = self.word_regression_feat(feat)
        tblr = F.relu(self.word_tblr_pred(regression)) * _TBLR_SCALE
        return fg_logits, tblr, self.orient_pred(regression)


class CharDetector(nn.Module):
    """Character foreground logits and axis-aligned character box distances (t, b, l, r)."""

    def __init__(self, in_channels: int, bottleneck_channels: int) -> None:
        super().__init__()
        self.character_det_conv_final = _conv3x3_bn_relu(in_channels, bottleneck_channels)
        self.char_fg_feat = _conv3x3_bn_relu(bottleneck_channels, bottleneck_channels)
        self.char_regression_feat = _conv3x3_bn_relu(bottleneck_channels, bottleneck_channels)
        self.char_fg_pred = nn.Conv2d(bottleneck_channels, 2, kernel_size=1)
        self.char_tblr_pred = nn.Conv2d(bottleneck_channels, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.character_det_conv_final(x)
        fg_logits = self.char_fg_pred(self.char_fg_feat(feat))
        tblr = F.relu(self.char_tblr_pred(self.char_regression_feat(feat))) * _TBLR_SCALE
        return fg_logits, tblr


class CharRecognizer(nn.Module):
    """Three conv3×3-BN-ReLU layers and a 1×1 classifier over the character classes."""

    def __init__(self, in_channels: int, bottleneck_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3_bn_relu(in_channels, bottleneck_channels),
            _conv3x3_bn_relu(bottleneck_channels, bottleneck_channels),
            _conv3x3_bn_relu(bottleneck_channels, bottleneck_channels),
        )
        self.classifier = nn.Conv2d(bottleneck_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class CharNet(nn.Module):
    """Hourglass backbone + word detector + character detector + character recogniser.

    The defaults are Prismer's Hourglass-88 model; the other arguments only exist to build reduced
    networks for tests (the full one has 89 M parameters).
    """

    def __init__(
        self,
        channels: Sequence[int] = (256, 256, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        depth: int = 3,
        stem_channels: int = 128,
        bottleneck_channels: int = 128,
        num_classes: int = NUM_CHAR_CLASSES,
    ) -> None:
        super().__init__()
        self.backbone = HourglassNet(depth, list(channels), list(blocks), stem_channels)
        features = channels[0]
        self.word_detector = WordDetector(features, bottleneck_channels)
        self.char_detector = CharDetector(features, bottleneck_channels)
        self.char_recognizer = CharRecognizer(features, bottleneck_channels, num_classes)
        self.stride = 4
        self.size_multiple = 4 * 2**depth  # stem stride × one pooling per hourglass level

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        word_fg_logits, word_tblr, word_orient = self.word_detector(features)
        char_fg_logits, char_tblr = self.char_detector(features)
        char_cls_logits = self.char_recognizer(features)
        return {
            "word_fg_logits": word_fg_logits,
            "word_fg": F.softmax(word_fg_logits, dim=1),
            "word_tblr": word_tblr,
            "word_orient": word_orient,
            "char_fg_logits": char_fg_logits,
            "char_fg": F.softmax(char_fg_logits, dim=1),
            "char_tblr": char_tblr,
            "char_cls_logits": char_cls_logits,
            "char_cls": F.softmax(char_cls_logits, dim=1),
        }
