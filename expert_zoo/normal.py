"""Surface normals with NLL-AngMF (Bae et al., ICCV 2021), Prismer's ``normal`` expert.

Pre/post-processing follow Prismer's generator: PIL bilinear resize to 480×480, ToTensor, ImageNet
normalisation; the full-resolution prediction's unit normal is mapped to ``(n + 1) / 2``, clipped,
upsampled to the image size (bilinear, ``align_corners=True``), scaled by 255 and truncated to uint8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from expert_zoo.base import ConfigError, ExpertSpec, Label, WeightsOptions, did_you_mean
from expert_zoo.nets.nll_angmf import SPECS, NLLAngMF, strip_module_prefix
from expert_zoo.torch_expert import TorchExpert, load_strictly, read_state_dict
from expert_zoo.torch_utils import IMAGENET_MEAN, IMAGENET_STD, normalized_batch, resize_bilinear_aligned

DEFAULT_WEIGHTS = "hf-hub:shikunl/prismer/expert_weights/scannet.pt"
INPUT_SIZE = (480, 480)


def preprocess(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """H×W×3 uint8 RGB arrays → N×3×480×480 float32, as Prismer's normal generator builds its input."""
    return normalized_batch(images, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, device)


def normals_to_rgb(prediction: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One 4×h×w (or 3×h×w) prediction → H×W×3 uint8 map of ``(n + 1) / 2``, Prismer's label encoding."""
    rgb = ((prediction[None, :3].float() + 1) * 0.5).clip(0, 1)
    rgb = resize_bilinear_aligned(rgb, size)[0]
    # Scale then truncate (not round), as the original's ``astype(np.uint8)`` does.
    return (rgb * 255).permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def load_checkpoint(model: NLLAngMF, path: str | Path) -> NLLAngMF:
    """Load ``torch.load(path)["model"]`` (or a bare state dict), without DataParallel prefixes, strictly."""
    checkpoint = read_state_dict(path)
    return load_strictly(model, strip_module_prefix(checkpoint.get("model", checkpoint)))


@dataclass(frozen=True)
class NLLAngMFOptions(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS
    arch: str = "b5"  # "b5", the real network; "tiny" only exists for tests

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arch not in SPECS:
            hint = did_you_mean(self.arch, SPECS)
            raise ConfigError(f"arch: {self.arch!r} is not one of {sorted(SPECS)}{hint}")


class NLLAngMFNormal(TorchExpert):
    """Config: ``weights`` (source, default Prismer's ScanNet checkpoint), optional ``sha256``,
    ``arch`` (``"b5"``, the real network; ``"tiny"`` only exists for tests), ``batch_size``."""

    LICENCE = "not stated upstream (ScanNet-trained)"
    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="normal",
        backend="nll_angmf",
        version="1",
        mode="RGB",
        batch_size=8,
        input_size=INPUT_SIZE,
        uses_gpu=True,
    )
    GPU_BATCH_SIZE: ClassVar[int] = 64  # Prismer's
    Options = NLLAngMFOptions
    opts: NLLAngMFOptions
    FINGERPRINTED_DEFAULTS = ("weights", "arch")
    CHANNELS_LAST = True

    def load_model(self, path: Path) -> torch.nn.Module:
        return load_checkpoint(NLLAngMF(SPECS[self.opts.arch]), path)

    def predict_batch(self, images: list[np.ndarray], deps: Mapping[str, list[Label]]) -> list[Label]:
        batch = self.network_input(preprocess(images, self.torch_device))
        with self.inference():
            res1 = self.model(batch)[-1]
        with torch.inference_mode():
            return [
                Label(normals_to_rgb(prediction, image.shape[:2])) for prediction, image in zip(res1, images)
            ]
