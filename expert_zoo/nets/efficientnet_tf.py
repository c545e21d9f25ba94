"""EfficientNet with TensorFlow-compatible layers (the ``tf_efficientnet_*`` family), our own port.

The TF-ported checkpoints need three things a plain PyTorch EfficientNet does not do:

* "same" padding computed from the input size for strided convolutions (TF pads more on the right/bottom);
  stride-1 convolutions with odd kernels pad symmetrically, so they are ordinary ``nn.Conv2d``;
* BatchNorm with ``eps=1e-3``;
* Swish (SiLU) activations, sigmoid-gated squeeze-and-excitation sized from the block's *input* channels.

Module and parameter names follow the layout of the original ``gen-efficientnet`` models
(``conv_stem``, ``bn1``, ``blocks.<stage>.<block>.conv_dw`` ...), so their state dicts load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS_TF = 1e-3
BN_MOMENTUM_TF = 0.01


@dataclass(frozen=True)
class StageSpec:
    """One stage of blocks: ``kind`` is ``"ds"`` (depthwise-separable) or ``"ir"`` (inverted residual)."""

    kind: str
    repeats: int
    kernel: int
    stride: int
    expansion: int
    out_chs: int


@dataclass(frozen=True)
class EfficientNetSpec:
    stem_chs: int
    stages: tuple[StageSpec, ...]
    head_chs: int
    se_ratio: float = 0.25


# tf_efficientnet_b5 (width 1.6, depth 2.2), channels and repeats already scaled and rounded.
EFFICIENTNET_B5 = EfficientNetSpec(
    stem_chs=48,
    stages=(
        StageSpec("ds", 3, 3, 1, 1, 24),
        StageSpec("ir", 5, 3, 2, 6, 40),
        StageSpec("ir", 5, 5, 2, 6, 64),
        StageSpec("ir", 7, 3, 2, 6, 128),
        StageSpec("ir", 7, 5, 1, 6, 176),
        StageSpec("ir", 9, 5, 2, 6, 304),
        StageSpec("ir", 3, 3, 1, 6, 512),
    ),
    head_chs=2048,
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding along one axis: (before, after), the extra pixel going after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A convolution that pads like TF "SAME" for whatever input size it gets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def tf_conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv with TF "same" padding: static when it does not depend on the input size."""
    if stride == 1 and kernel % 2 == 1:
        return nn.Conv2d(in_chs, out_chs, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return Conv2dSame(in_chs, out_chs, kernel, stride, padding=0, groups=groups, bias=False)


def tf_bn(chs: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(chs, eps=BN_EPS_TF, momentum=BN_MOMENTUM_TF)


class SqueezeExcite(nn.Module):
    def __init__(self, chs: int, reduced_chs: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, reduced_chs, 1, bias=True)
        self.act1 = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced_chs, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class DepthwiseSeparableConv(nn.Module):
    """dw conv → BN → Swish → SE → pw conv → BN (no activation), residual when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, se_ratio: float) -> None:
        super().__init__()
        self.has_residual = stride == 1 and in_chs == out_chs
        self.conv_dw = tf_conv(in_chs, in_chs, kernel, stride, groups=in_chs)
        self.bn1 = tf_bn(in_chs)
        self.act1 = nn.SiLU()
        self.se = SqueezeExcite(in_chs, se_channels(in_chs, se_ratio))
        self.conv_pw = tf_conv(in_chs, out_chs, 1)
        self.bn2 = tf_bn(out_chs)
        self.act2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_dw(x)))
        out = self.act2(self.bn2(self.conv_pw(self.se(out))))
        return out + x if self.has_residual else out


class InvertedResidual(nn.Module):
    """pw expand → BN → Swish → dw conv → BN → Swish → SE → pw project → BN, residual when shapes allow."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int, se_ratio: float
    ) -> None:
        super().__init__()
        mid_chs = in_chs * expansion
        self.has_residual = stride == 1 and in_chs == out_chs
        self.conv_pw = tf_conv(in_chs, mid_chs, 1)
        self.bn1 = tf_bn(mid_chs)
        self.act1 = nn.SiLU()
        self.conv_dw = tf_conv(mid_chs, mid_chs, kernel, stride, groups=mid_chs)
        self.bn2 = tf_bn(mid_chs)
        self.act2 = nn.SiLU()
        # SE width follows the block's input channels, not the expanded ones.
        self.se = SqueezeExcite(mid_chs, se_channels(in_chs, se_ratio))
        self.conv_pwl = tf_conv(mid_chs, out_chs, 1)
        self.bn3 = tf_bn(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return out + x if self.has_residual else out


def se_channels(in_chs: int, se_ratio: float) -> int:
    return max(1, int(in_chs * se_ratio + 0.5))


def build_stage(stage: StageSpec, in_chs: int, se_ratio: float) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for index in range(stage.repeats):
        stride = stage.stride if index == 0 else 1
        block_in = in_chs if index == 0 else stage.out_chs
        if stage.kind == "ds":
            blocks.append(DepthwiseSeparableConv(block_in, stage.out_chs, stage.kernel, stride, se_ratio))
        elif stage.kind == "ir":
            blocks.append(
                InvertedResidual(block_in, stage.out_chs, stage.kernel, stride, stage.expansion, se_ratio)
            )
        else:
            raise ValueError(f"unknown block kind {stage.kind!r}")
    return nn.Sequential(*blocks)


class EfficientNetTF(nn.Module):
    """The EfficientNet trunk without pooling/classifier (they are identities in the models that use it)."""

    def __init__(self, spec: EfficientNetSpec = EFFICIENTNET_B5) -> None:
        super().__init__()
        self.conv_stem = tf_conv(3, spec.stem_chs, 3, stride=2)
        self.bn1 = tf_bn(spec.stem_chs)
        self.act1 = nn.SiLU()
        stages = []
        in_chs = spec.stem_chs
        for stage in spec.stages:
            stages.append(build_stage(stage, in_chs, spec.se_ratio))
            in_chs = stage.out_chs
        self.blocks = nn.Sequential(*stages)
        self.conv_head = tf_conv(in_chs, spec.head_chs, 1)
        self.bn2 = tf_bn(spec.head_chs)
        self.act2 = nn.SiLU()

    def feature_list(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every top-level module's output in order, each stage counted once, the input first.

        Index: 0 input, 1 conv_stem, 2 bn1, 3 act1, 4..(3+S) the S stages, then conv_head, bn2, act2.
        Downstream decoders index into this list, so its layout must not change.
        """
        features = [x]
        for module in (
            self.conv_stem,
            self.bn1,
            self.act1,
            *self.blocks,
            self.conv_head,
            self.bn2,
            self.act2,
        ):
            features.append(module(features[-1]))
        return features
