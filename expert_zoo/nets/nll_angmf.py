"""NLL-AngMF surface-normal network (Bae et al., ICCV 2021), written for this project.

An EfficientNet-B5 (TF-style) encoder, a four-step upsampling decoder with BatchNorm, and a coarse-to-fine
head: a 3×3 conv predicts normals at 1/8 resolution, then three per-pixel MLPs (``Conv1d`` with kernel 1)
refine them at 1/4, 1/2 and full resolution from upsampled decoder features plus the upsampled previous
prediction. Every output has 4 channels: a unit normal (x, y, z) and a concentration ``kappa > 0`` of the
angular von Mises-Fisher distribution.

Only inference is implemented: the refinement heads run at every pixel (the original's test mode). The
training-time uncertainty-guided point sampling changes nothing at test time and is left out.

Parameter names match the original checkpoints (``encoder.original_model.*``, ``decoder.up1._net.0`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expert_zoo.nets.efficientnet_tf import EFFICIENTNET_B5, EfficientNetSpec, EfficientNetTF, StageSpec

MIN_KAPPA = 0.01
# Positions in EfficientNetTF.feature_list that feed the decoder: stages 0, 1, 2 and 4, then the
# conv_head output *before* its BatchNorm (so the encoder's bn2/act2 never affect the result).
SKIP_FEATURES = (4, 5, 6, 8)
BOTTLENECK_FEATURE = 11


@dataclass(frozen=True)
class NLLAngMFSpec:
    encoder: EfficientNetSpec
    decoder_chs: tuple[int, int, int, int]  # outputs of up1..up4
    head_chs: int  # hidden width of the per-pixel refinement MLPs


NLL_ANGMF_B5 = NLLAngMFSpec(encoder=EFFICIENTNET_B5, decoder_chs=(1024, 512, 256, 128), head_chs=128)

# A narrow, shallow variant with the same structure, for fast tests of loading and plumbing.
NLL_ANGMF_TINY = NLLAngMFSpec(
    encoder=EfficientNetSpec(
        stem_chs=8,
        stages=(
            StageSpec("ds", 2, 3, 1, 1, 8),
            StageSpec("ir", 2, 3, 2, 2, 8),
            StageSpec("ir", 1, 5, 2, 2, 16),
            StageSpec("ir", 1, 3, 2, 2, 16),
            StageSpec("ir", 2, 5, 1, 2, 24),
            StageSpec("ir", 1, 5, 2, 2, 32),
            StageSpec("ir", 1, 3, 1, 2, 32),
        ),
        head_chs=64,
    ),
    decoder_chs=(32, 16, 16, 8),
    head_chs=16,
)

SPECS = {"b5": NLL_ANGMF_B5, "tiny": NLL_ANGMF_TINY}


def norm_normalize(out: torch.Tensor) -> torch.Tensor:
    """(x, y, z, k) → (unit xyz, elu(k) + 1 + MIN_KAPPA) along dim 1, as the original computes it."""
    x, y, z, kappa = torch.split(out, 1, dim=1)
    norm = torch.sqrt(x**2.0 + y**2.0 + z**2.0) + 1e-10
    kappa = F.elu(kappa) + 1.0 + MIN_KAPPA
    return torch.cat([x / norm, y / norm, z / norm, kappa], dim=1)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class UpSampleBN(nn.Module):
    """Upsample to the skip's size, concatenate, then two (3×3 conv → BN → LeakyReLU)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(out_chs),
            nn.LeakyReLU(),
            nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(out_chs),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([up, skip], dim=1))


def refinement_mlp(in_chs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(in_chs, hidden, kernel_size=1),
        nn.ReLU(),
        nn.Conv1d(hidden, hidden, kernel_size=1),
        nn.ReLU(),
        nn.Conv1d(hidden, hidden, kernel_size=1),
        nn.ReLU(),
        nn.Conv1d(hidden, 4, kernel_size=1),
    )


class Decoder(nn.Module):
    def __init__(self, skip_chs: tuple[int, int, int, int], bottleneck_chs: int, spec: NLLAngMFSpec) -> None:
        super().__init__()
        c1, c2, c3, c4 = spec.decoder_chs
        self.conv2 = nn.Conv2d(bottleneck_chs, bottleneck_chs, kernel_size=1, stride=1, padding=0)
        self.up1 = UpSampleBN(bottleneck_chs + skip_chs[3], c1)
        self.up2 = UpSampleBN(c1 + skip_chs[2], c2)
        self.up3 = UpSampleBN(c2 + skip_chs[1], c3)
        self.up4 = UpSampleBN(c3 + skip_chs[0], c4)
        self.out_conv_res8 = nn.Conv2d(c2, 4, kernel_size=3, stride=1, padding=1)
        self.out_conv_res4 = refinement_mlp(c2 + 4, spec.head_chs)
        self.out_conv_res2 = refinement_mlp(c3 + 4, spec.head_chs)
        self.out_conv_res1 = refinement_mlp(c4 + 4, spec.head_chs)

    @staticmethod
    def refine(mlp: nn.Sequential, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Run a per-pixel MLP on 2× upsampled features + 2× upsampled coarser prediction, at every pixel."""
        feat = torch.cat([upsample2x(features), upsample2x(coarse)], dim=1)
        batch, chs, height, width = feat.shape
        # reshape, not view: on CUDA the features may be channels_last.
        out = norm_normalize(mlp(feat.reshape(batch, chs, -1)))
        return out.view(batch, 4, height, width)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        block0, block1, block2, block3 = (features[i] for i in SKIP_FEATURES)
        x_d0 = self.conv2(features[BOTTLENECK_FEATURE])  # 1/32
        x_d1 = self.up1(x_d0, block3)  # 1/16
        x_d2 = self.up2(x_d1, block2)  # 1/8
        x_d3 = self.up3(x_d2, block1)  # 1/4
        x_d4 = self.up4(x_d3, block0)  # 1/2
        out_res8 = norm_normalize(self.out_conv_res8(x_d2))
        # Each finer prediction is built from the decoder features one level *coarser* than its own
        # resolution, upsampled (e.g. res4 from x_d2 at 1/8), as in the original.
        out_res4 = self.refine(self.out_conv_res4, x_d2, out_res8)
        out_res2 = self.refine(self.out_conv_res2, x_d3, out_res4)
        out_res1 = self.refine(self.out_conv_res1, x_d4, out_res2)
        return [out_res8, out_res4, out_res2, out_res1]


class Encoder(nn.Module):
    def __init__(self, spec: EfficientNetSpec) -> None:
        super().__init__()
        if len(spec.stages) != 7:
            raise ValueError("the NLL-AngMF decoder indexes 7 EfficientNet stages")
        self.original_model = EfficientNetTF(spec)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model.feature_list(x)


class NLLAngMF(nn.Module):
    """``forward(x)`` → ``[res8, res4, res2, res1]``, each N×4×h×w (unit normal xyz, kappa)."""

    def __init__(self, spec: NLLAngMFSpec = NLL_ANGMF_B5) -> None:
        super().__init__()
        self.encoder = Encoder(spec.encoder)
        stages = spec.encoder.stages
        skip_chs = (stages[0].out_chs, stages[1].out_chs, stages[2].out_chs, stages[4].out_chs)
        self.decoder = Decoder(skip_chs, spec.encoder.head_chs, spec)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x))


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove every ``module.`` (DataParallel wrapping) from keys that start with it, like the original."""
    return {
        (key.replace("module.", "") if key.startswith("module.") else key): value
        for key, value in state_dict.items()
    }
