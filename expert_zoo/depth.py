"""Depth expert: MiDaS v3 DPT-Hybrid (Ranftl et al., ICCV 2021) through transformers, as Prismer uses it.

Prismer (``experts/generate_depth.py``) squashes every image to 480×480 (PIL bilinear, aspect not kept),
normalises to [-1, 1], predicts relative inverse depth (bright = near), min-max normalises it per image,
upsamples it to the original size (bilinear, ``align_corners=True``) and stores ``255*d`` cast by PIL to L8
(clip to [0, 255], then truncation). This expert writes the same L8 map.

Weights (``config["weights"]``, resolved by :func:`label_pipeline.core.weights.resolve_weights`):

* a directory, e.g. the default ``hf-hub:Intel/dpt-hybrid-midas`` snapshot: a transformers
  ``DPTForDepthEstimation`` saved with ``save_pretrained``;
* a file (path, URL or ``hf-hub:`` file, e.g. MiDaS' ``dpt_hybrid-midas-501f0c75.pt``): the original
  checkpoint, mapped by :mod:`expert_zoo.convert_dpt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from expert_zoo.base import ExpertSpec, Label, WeightsOptions
from expert_zoo.torch_expert import TorchExpert, read_state_dict
from expert_zoo.torch_utils import normalized_batch, resize_bilinear_aligned

DEFAULT_WEIGHTS = "hf-hub:Intel/dpt-hybrid-midas"
INPUT_SIZE = (480, 480)
MEAN = STD = (0.5, 0.5, 0.5)  # Normalize(0.5, 0.5): RGB in [-1, 1]


@dataclass(frozen=True)
class DPTHybridOptions(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class DPTHybridDepth(TorchExpert):
    """``depth:dpt_hybrid``: L8 map of per-image min-max inverse depth (bright = near), Prismer-compatible.

    Options: ``weights`` (see module doc), ``sha256`` (checked for single-file weights), ``dtype``
    (``auto`` = bf16 autocast on CUDA, fp32 on CPU; or ``float32`` / ``bfloat16`` / ``float16``),
    ``batch_size`` (images per forward, default ``spec.batch_size``).
    """

    LICENCE = "MIT"
    spec = ExpertSpec(
        task="depth",
        backend="dpt_hybrid",
        version="1",
        mode="L",
        batch_size=16,
        input_size=INPUT_SIZE,
        uses_gpu=True,
    )
    GPU_BATCH_SIZE: ClassVar[int] = 64  # Prismer's
    Options = DPTHybridOptions
    # No channels_last: the BiT stem is GroupNorm + weight-standardised convs, not measured to gain.

    def load_model(self, path: Path) -> torch.nn.Module:
        from expert_zoo.convert_dpt import allow_input_size

        model = _load_transformers_dir(path) if path.is_dir() else _load_original_checkpoint(path)
        allow_input_size(model, INPUT_SIZE)
        return model

    # -- stages, public so tests and the detection expert can reuse them -----------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """H×W×3 uint8 RGB arrays → N×3×480×480 float32 in [-1, 1] on the expert's device."""
        return normalized_batch(images, INPUT_SIZE, MEAN, STD, self.torch_device)

    def inverse_depth(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """N×3×480×480 normalised input → N×480×480 float32 relative inverse depth (≥ 0, bright = near)."""
        pixel_values = pixel_values.to(self.torch_device)
        with self.inference():
            depth = self.model(pixel_values=pixel_values).predicted_depth
        return depth.float()

    def predict_batch(self, images: list[np.ndarray], deps: Mapping[str, list[Label]]) -> list[Label]:
        depth = self.inverse_depth(self.preprocess(images))
        return [Label(map=depth_to_label(d, image.shape[:2])) for d, image in zip(depth, images)]


def depth_to_label(depth: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One h×w inverse-depth map → H×W uint8, exactly as Prismer writes it.

    ``(d-min)/(max-min)`` at network resolution, bilinear (``align_corners=True``) to ``size``, ``255*d``,
    then PIL's float→L conversion, which clips to [0, 255] and truncates. A constant map (max == min) gives
    NaN in the original, which PIL turns into 0; it is written as all zeros here.
    """
    depth = depth.float()
    low, high = depth.min(), depth.max()
    span = high - low
    if not bool(torch.isfinite(span)) or float(span) <= 0.0:
        return np.zeros(size, dtype=np.uint8)
    normalised = (depth - low) / span
    upsampled = resize_bilinear_aligned(normalised[None, None], (size[0], size[1]))[0, 0]
    return (255 * upsampled).clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _load_transformers_dir(path: Path) -> torch.nn.Module:
    from transformers import DPTForDepthEstimation

    from expert_zoo._hf import load_pretrained

    model = load_pretrained(DPTForDepthEstimation, path)
    if not model.config.is_hybrid:
        raise ValueError(f"{path} holds a non-hybrid DPT; depth:dpt_hybrid needs a DPT-Hybrid model")
    return model


def _load_original_checkpoint(path: Path) -> torch.nn.Module:
    from expert_zoo.convert_dpt import build_model

    return build_model(read_state_dict(path))


__all__ = ["DEFAULT_WEIGHTS", "DPTHybridDepth", "depth_to_label"]
