"""``edge:dexined``: Prismer's edge expert, DexiNed, with Prismer's pre- and post-processing.

Label: L8, the inverted min-max-normalised edge probability of the fused map (255 = no edge, 0 = the
image's strongest edge), computed at 480×480 and resized to the image with PIL bilinear, as Prismer's
``generate_edge.py`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from expert_zoo.base import ExpertSpec, Label, WeightsOptions
from expert_zoo.nets.dexined import DexiNed, width_from_state_dict
from expert_zoo.torch_expert import TorchExpert, load_strictly, read_state_dict
from expert_zoo.torch_utils import IMAGENET_MEAN, normalized_batch

DEFAULT_WEIGHTS = "hf-hub:shikunl/prismer/expert_weights/10_model.pth"
INPUT_SIZE = (480, 480)
# DexiNed was trained on BGR images on a 0-255 scale, mean-subtracted but not divided by a std.
_UNIT_STD = (1.0, 1.0, 1.0)


def preprocess(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """RGB uint8 images → N×3×480×480 float32 network input, in Prismer's op order.

    Resize (PIL bilinear), ToTensor (/255), subtract the ImageNet mean with std 1, flip RGB→BGR, ×255.
    The order matters for the last bits: the values are not exactly ``pixel - 255*mean``.
    """
    batch = normalized_batch(images, INPUT_SIZE, IMAGENET_MEAN, _UNIT_STD, device)
    return batch.flip(1).mul_(255.0)


def edge_maps(fused_logits: torch.Tensor) -> torch.Tensor:
    """N×1×H×W fused logits → N×H×W uint8 inverted edge maps (Prismer's ``fuse_edge``, batched).

    sigmoid, per-image ``(x - min) * 255 / ((max - min) + 1e-12)`` in float32, truncation to uint8,
    then ``255 - v``. Done on the logits' device so only uint8 maps travel back to the host.
    """
    prob = torch.sigmoid(fused_logits.float()).flatten(1)
    low = prob.amin(dim=1, keepdim=True)
    high = prob.amax(dim=1, keepdim=True)
    scaled = (prob - low) * 255.0 / ((high - low) + 1e-12)
    # Values lie in [0, 255]; the float → uint8 cast truncates, as np.uint8 does in the original.
    edges = 255 - scaled.to(torch.uint8)
    return edges.view(fused_logits.shape[0], *fused_logits.shape[-2:])


def resize_to_image(edge_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H×W uint8 map to (height, width) with PIL bilinear, as Prismer writes its labels."""
    height, width = size
    image = Image.fromarray(edge_map).convert("L")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class DexiNedOptions(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS


def load_dexined(state_dict: Mapping[str, torch.Tensor]) -> DexiNed:
    """Build a DexiNed of the checkpoint's width and load it strictly (Prismer's checkpoint: width 1)."""
    return load_strictly(DexiNed(width=width_from_state_dict(dict(state_dict))), state_dict)


class DexiNedEdge(TorchExpert):
    """Prismer's edge expert: DexiNed (Soria et al., WACV 2020), BIPED-trained weights ``10_model.pth``.

    Config: ``weights`` (source for ``resolve_weights``, default Prismer's file on the hub), optional
    ``sha256`` to verify it, and ``batch_size`` (images per forward; default ``spec.batch_size`` on CPU,
    ``GPU_BATCH_SIZE`` on CUDA).
    """

    LICENCE = "MIT code, BIPED-trained weights"
    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="edge",
        backend="dexined",
        version="1",
        mode="L",
        batch_size=8,
        input_size=INPUT_SIZE,
        uses_gpu=True,
    )
    GPU_BATCH_SIZE: ClassVar[int] = 64
    Options = DexiNedOptions
    CHANNELS_LAST = True

    def load_model(self, path: Path) -> torch.nn.Module:
        return load_dexined(read_state_dict(path))

    def predict_batch(self, images: list[np.ndarray], deps: Mapping[str, list[Label]]) -> list[Label]:
        maps = self._edge_maps(images)
        return [Label(map=resize_to_image(m, image.shape[:2])) for m, image in zip(maps, images)]

    def _edge_maps(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N×480×480 uint8 inverted edge maps for a batch of RGB images."""
        batch = self.network_input(preprocess(images, self.torch_device))
        with self.inference():
            fused = self.model(batch)[-1]
        return edge_maps(fused).cpu().numpy()
