"""Surface normals with NLL-AngMF (Bae et al., ICCV 2021), Prismer's ``normal`` expert.

Pre/post-processing follow Prismer's generator: PIL bilinear resize to 480×480, ToTensor, ImageNet
normalisation; the full-resolution prediction's unit normal is mapped to ``(n + 1) / 2``, clipped,
upsampled to the image size (bilinear, ``align_corners=True``), scaled by 255 and truncated to uint8.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from expert_zoo.base import ConfigError, Expert, ExpertSpec, Label, WeightsOptions, did_you_mean
from expert_zoo.nets.nll_angmf import SPECS, NLLAngMF, strip_module_prefix
from expert_zoo.torch_utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    inference,
    normalized_batch,
    resize_bilinear_aligned,
    resolve_device,
)

logger = logging.getLogger(__name__)

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


def load_checkpoint(model: NLLAngMF, path: str) -> None:
    """Load ``torch.load(path)["model"]`` (or a bare state dict), without DataParallel prefixes, strictly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict or {{'model': state dict}}, got {type(checkpoint).__name__}")
    state = checkpoint.get("model", checkpoint)
    model.load_state_dict(strip_module_prefix(state), strict=True)


@dataclass(frozen=True)
class NLLAngMFOptions(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS
    arch: str = "b5"  # "b5", the real network; "tiny" only exists for tests

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arch not in SPECS:
            hint = did_you_mean(self.arch, SPECS)
            raise ConfigError(f"arch: {self.arch!r} is not one of {sorted(SPECS)}{hint}")


class NLLAngMFNormal(Expert):
    """Config: ``weights`` (source, default Prismer's ScanNet checkpoint), optional ``sha256``,
    ``arch`` (``"b5"``, the real network; ``"tiny"`` only exists for tests), ``batch_size``."""

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

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(config, device)
        from expert_zoo.weights import file_sha256, loading_weights, resolve_weights

        # The defaults of these two have always been part of this expert's fingerprint: kept there.
        self.config.setdefault("weights", self.opts.weights)
        self.config.setdefault("arch", self.opts.arch)
        path = resolve_weights(self.opts.weights, expert=self.spec.name, sha256=self.opts.sha256)
        self.torch_device = resolve_device(device)
        model = NLLAngMF(SPECS[self.opts.arch])
        with loading_weights(self.spec.name, path):
            self.weights_digest = file_sha256(path)
            load_checkpoint(model, str(path))
        model.eval().to(self.torch_device)
        if self.torch_device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        logger.info("loaded %s (%s) from %s", self.spec.name, self.opts.arch, path)

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        labels: list[Label] = []
        for start in range(0, len(images), self.batch_size):
            labels.extend(self._predict_batch(images[start : start + self.batch_size]))
        return labels

    def _predict_batch(self, images: list[np.ndarray]) -> list[Label]:
        batch = preprocess(images, self.torch_device)
        if self.torch_device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with inference(self.torch_device):
            res1 = self.model(batch)[-1]
        with torch.inference_mode():
            return [
                Label(normals_to_rgb(prediction, image.shape[:2])) for prediction, image in zip(res1, images)
            ]
