"""Shared torch helpers for neural experts: device, precision, Prismer-style pre/post-processing.

Imported only by experts that use torch, so the pipeline core and the offline experts never import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / STD), which OWLv2 was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch as is."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def inference(device: torch.device, dtype: str = "auto") -> Iterator[None]:
    """``inference_mode`` plus autocast: bf16 on CUDA by default, fp32 on CPU (see docs/EXPERTS.md)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    with torch.inference_mode():
        if dtype == "float32":
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)):
                yield


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H×W×3 uint8 array to (H, W) with PIL bilinear, as torchvision's Resize on a PIL image."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def normalized_batch(
    images: Sequence[np.ndarray],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """Resize each image (PIL bilinear), ToTensor, Normalize: N×3×H×W float32 on ``device``."""
    batch = np.stack([pil_resize(image, size) for image in images])
    tensor = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t


def resize_bilinear_aligned(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N×C×h×w → N×C×H×W, bilinear with ``align_corners=True`` (Prismer's label upsampling)."""
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=True)
