"""``seg_coco:mask2former``: Prismer's COCO segmentation expert, Mask2Former used in semantic mode.

Label: L8, the COCO-panoptic class id 0..132 (80 things then 53 stuff, detectron2's contiguous order;
names in ``label_pipeline/core/labelmaps/coco_panoptic_133_names.json``) of every pixel; no void value.

As Prismer's ``generate_segmentation.py`` (detectron2 Mask2Former with panoptic and instance inference
off): resize with torchvision's ``Resize(479, max_size=480)`` rule (aspect kept, long side 480), pad the
normalised image to a multiple of 32, run, upsample the mask logits to the padded size, combine them into
per-class scores ``sum_q softmax(class_q)[:-1] * sigmoid(mask_q)``, crop the padding, resize the scores
bilinearly to the image and take the argmax there.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from expert_zoo._hf import load_pretrained
from expert_zoo.base import ExpertSpec, Label, WeightsOptions
from expert_zoo.torch_expert import TorchExpert
from expert_zoo.torch_utils import IMAGENET_MEAN, IMAGENET_STD, pil_resize
from label_pipeline.core.labelmaps import load_label_names

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "hf-hub:facebook/mask2former-swin-large-coco-panoptic"
NUM_CLASSES = 133
NUM_THING_CLASSES = 80
RESIZE_SHORT, RESIZE_MAX = 479, 480  # torchvision Resize(479, max_size=480), as Prismer
SIZE_DIVISIBILITY = 32  # detectron2 pads each batch to a multiple of 32
_SCORE_CHUNK_ELEMENTS = 1 << 24  # bounds the memory of the boundary-pixel score blend (64 MiB fp32)


def class_names() -> list[str]:
    """Prismer's 133 COCO-panoptic class names, index = label value (Prismer's rewording)."""
    return load_label_names("coco_panoptic_133_names.json", NUM_CLASSES)


def prismer_resize_shape(
    height: int, width: int, size: int = RESIZE_SHORT, max_size: int = RESIZE_MAX
) -> tuple[int, int]:
    """(H, W) after torchvision ``Resize(size, max_size=max_size)``: short side → size unless long > max."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_short = max(new_short, 1)  # torchvision would fail on such slivers; keep one pixel instead
    return (new_long, new_short) if width <= height else (new_short, new_long)


def padded_shape(shape: tuple[int, int], divisor: int = SIZE_DIVISIBILITY) -> tuple[int, int]:
    return (math.ceil(shape[0] / divisor) * divisor, math.ceil(shape[1] / divisor) * divisor)


def preprocess(image: np.ndarray, bgr: bool = False) -> torch.Tensor:
    """RGB uint8 image → 3×h×w float32 normalised tensor at Prismer's ≤480 scale (not padded).

    ``bgr`` feeds the channels swapped, as Prismer did by accident (its detectron2 model expects RGB).
    """
    resized = pil_resize(image, prismer_resize_shape(*image.shape[:2]))
    tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float()
    if bgr:
        tensor = tensor.flip(0)
    # detectron2 normalises raw 0-255 pixels with mean/std = 255 × ImageNet's, channel for channel.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
    return (tensor - mean) / std


def semantic_scores(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int]
) -> torch.Tensor:
    """Q×(C+1) class logits, Q×h×w mask logits → h'×w'×C class scores (Mask2Former semantic inference).

    The mask logits are upsampled to the ``padded`` input size and cropped to the ``valid`` (unpadded)
    part; scores are ``sum_q softmax(class_q)[c] * sigmoid(mask_q)``, the last class ("no object") dropped.
    Pixel-major output, so per-pixel argmax and gathers read contiguous C-vectors.
    """
    masks = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : valid[0], : valid[1]].sigmoid()
    probs = class_logits.float().softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->hwc", probs, masks)


def _linear_taps(
    out_size: int, in_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weight of 1-D linear interpolation, ``align_corners=False`` (PyTorch's rule)."""
    src = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    src = src.clamp_(min=0.0)
    lo = src.floor().long().clamp_(max=in_size - 1)
    hi = (lo + 1).clamp_(max=in_size - 1)
    return lo, hi, (src - lo).float()


def resize_argmax(
    scores: torch.Tensor, size: tuple[int, int], max_elements: int = _SCORE_CHUNK_ELEMENTS
) -> torch.Tensor:
    """argmax over C of the h×w×C ``scores`` resized bilinearly (align_corners=False) to ``size``: H×W
    (uint8 when C ≤ 256, else long).

    Same result as ``F.interpolate`` of the C×h×w scores to ``size`` then argmax, without building
    the C×H×W upsampled scores. Each output pixel blends four source pixels; where those four share their
    argmax class, every convex blend of them has it too, so only pixels on class boundaries need the C
    scores interpolated (in chunks of ``max_elements`` values).
    """
    in_h, in_w, num_classes = scores.shape
    y_lo, y_hi, y_w = _linear_taps(size[0], in_h, scores.device)
    x_lo, x_hi, x_w = _linear_taps(size[1], in_w, scores.device)
    pixels = scores.reshape(in_h * in_w, num_classes)
    coarse = pixels.argmax(1).view(in_h, in_w)
    if num_classes <= 256:  # a quarter of the memory traffic of int64 for the full-size gathers
        coarse = coarse.to(torch.uint8)
    rows_lo, rows_hi = coarse.index_select(0, y_lo), coarse.index_select(0, y_hi)
    labels = rows_lo.index_select(1, x_lo)
    boundary = rows_lo.index_select(1, x_hi) != labels
    boundary |= rows_hi.index_select(1, x_lo) != labels
    boundary |= rows_hi.index_select(1, x_hi) != labels
    ys, xs = torch.nonzero(boundary, as_tuple=True)
    step = max(1, max_elements // num_classes)
    for start in range(0, len(ys), step):
        r, c = ys[start : start + step], xs[start : start + step]
        wy, wx = y_w[r, None], x_w[c, None]
        row_lo, row_hi, col_lo, col_hi = y_lo[r] * in_w, y_hi[r] * in_w, x_lo[c], x_hi[c]
        # PyTorch's order: blend along x in the two source rows, then along y.
        upper = pixels[row_lo + col_lo] * (1 - wx) + pixels[row_lo + col_hi] * wx
        lower = pixels[row_hi + col_lo] * (1 - wx) + pixels[row_hi + col_hi] * wx
        labels[r, c] = (upper * (1 - wy) + lower * wy).argmax(1).to(labels.dtype)
    return labels


def check_label_space(id2label: Mapping[int, str] | None, num_labels: int) -> None:
    """Fail unless the model predicts the 133 COCO-panoptic classes in Prismer's (detectron2's) order.

    Thing names (0..79) are compared with Prismer's; generic ``LABEL_i`` names (e.g. a test model) are not.
    Stuff names differ in wording by design (``wall-other-merged`` is Prismer's ``other type of wall``).
    """
    if num_labels != NUM_CLASSES:
        raise ValueError(
            f"seg_coco:mask2former needs a COCO-panoptic model with {NUM_CLASSES} classes; these weights "
            f"have {num_labels}. Use e.g. {DEFAULT_WEIGHTS}"
        )
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    if not names or all(v == f"LABEL_{k}" for k, v in names.items()):
        return
    expected = class_names()[:NUM_THING_CLASSES]
    wrong = [(i, names.get(i), expected[i]) for i in range(NUM_THING_CLASSES) if names.get(i) != expected[i]]
    if len(wrong) > NUM_THING_CLASSES // 8:
        raise ValueError(
            f"these weights' classes are not in COCO-panoptic order: (id, model, expected) {wrong[:5]}…"
        )
    if wrong:
        logger.warning("Mask2Former thing-class names differ from Prismer's at %s", wrong)


@dataclass(frozen=True)
class Mask2FormerOptions(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS
    bgr: bool = False  # feed BGR as Prismer did; the weights expect RGB


class Mask2FormerCOCO(TorchExpert):
    """Mask2Former (Cheng et al., CVPR 2022), Swin-L COCO-panoptic weights, semantic inference.

    Config: ``weights`` (a transformers model dir: ``hf-hub:org/repo`` or a local dir; default
    ``hf-hub:facebook/mask2former-swin-large-coco-panoptic``, the conversion of the detectron2 checkpoint
    Prismer used), ``bgr`` (feed BGR as Prismer did; default false = RGB, what the weights expect),
    ``batch_size``.
    """

    LICENCE = "CC-BY-NC-4.0 weights, MIT code"
    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="seg_coco",
        backend="mask2former",
        version="1",
        mode="L",
        batch_size=4,
        input_size=None,  # aspect kept, long side 480
        uses_gpu=True,
    )
    GPU_BATCH_SIZE: ClassVar[int] = 16
    Options = Mask2FormerOptions
    opts: Mask2FormerOptions
    MODEL_DIRECTORY = True

    def load_model(self, path: Path) -> torch.nn.Module:
        from transformers import Mask2FormerForUniversalSegmentation

        model = load_pretrained(Mask2FormerForUniversalSegmentation, path)
        check_label_space(model.config.id2label, model.config.num_labels)
        return model

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        inputs = [preprocess(image, self.opts.bgr) for image in images]
        # Batch only images of one padded shape, so a label never depends on its batch-mates' padding.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, tensor in enumerate(inputs):
            groups[padded_shape((tensor.shape[1], tensor.shape[2]))].append(index)
        maps: list[np.ndarray | None] = [None] * len(images)
        for shape, indices in groups.items():
            for part in self.forward_slices(len(indices)):
                chunk = indices[part]
                results = self._segment(
                    [inputs[i] for i in chunk], shape, [images[i].shape[:2] for i in chunk]
                )
                for index, result in zip(chunk, results):
                    maps[index] = result
        return [Label(map=m) for m in maps]

    def _segment(
        self, inputs: list[torch.Tensor], shape: tuple[int, int], sizes: list[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Normalised tensors of one padded ``shape`` → uint8 class maps at the original ``sizes``."""
        batch = torch.zeros((len(inputs), 3, *shape), dtype=torch.float32)
        for i, tensor in enumerate(inputs):
            batch[i, :, : tensor.shape[1], : tensor.shape[2]] = (
                tensor  # zero = the mean colour, as detectron2
            )
        batch = batch.to(self.torch_device, non_blocking=True)
        with self.inference():
            out = self.model(pixel_values=batch)
        maps = []
        with torch.inference_mode():
            for i, (tensor, size) in enumerate(zip(inputs, sizes)):
                scores = semantic_scores(
                    out.class_queries_logits[i],
                    out.masks_queries_logits[i],
                    shape,
                    (tensor.shape[1], tensor.shape[2]),
                )
                maps.append(resize_argmax(scores, size).to(torch.uint8).cpu().numpy())
        return maps
