"""``obj_detection:owlv2``: open-vocabulary detection with OWLv2, queried with Prismer's 722 UniDet classes.

Prismer's detector (UniDet, Cascade R-CNN over a learned 722-class label space) is replaced by OWLv2
queried with the same 722 class names, so the ``class_id`` space stays Prismer's (index into
``label_pipeline/core/labelmaps/unidet_722_names.json``; the list repeats some names, the index is
what counts).

Label: L8 instance map (255 = background, ids 0..253 by descending score) built from the boxes and the
image's depth label with Prismer's occlusion rule (``expert_zoo.instance_map``), plus JSON
``[{"instance", "class_id", "score", "box": [x0, y0, x1, y1]}]`` in image pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from expert_zoo._hf import load_pretrained
from expert_zoo.base import ConfigError, ExpertSpec, Label, WeightsOptions
from expert_zoo.instance_map import DEDUP_IOU, MAX_INSTANCES, depth_ordered_instance_map
from expert_zoo.torch_expert import TorchExpert
from expert_zoo.torch_utils import CLIP_MEAN, CLIP_STD
from label_pipeline.core.labelmaps import load_label_names

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "hf-hub:google/owlv2-base-patch16-ensemble"
NUM_CLASSES = 722
DEFAULTS: dict[str, Any] = {
    "threshold": 0.3,  # on sigmoid(max query logit); Prismer's UniDet used 0.5 on its own scores
    "nms_iou": 0.5,  # class-agnostic; OWL predicts one box per patch, so one object yields many
    "prompt": "a photo of a {}",
    "split_synonyms": True,  # "footwear, sneakers" → mean of the two prompts' embeddings
    "pad_value": 0.5,  # OWLv2 pads to a square with grey at the bottom/right
    "max_candidates": 1000,  # top boxes kept for NMS, bounds its cost at low thresholds
}
_TEXT_CHUNK = 256


def class_names() -> list[str]:
    """Prismer's 722 UniDet class names, index = ``class_id``."""
    return load_label_names("unidet_722_names.json", NUM_CLASSES)


def query_prompts(names: Sequence[str], template: str, split_synonyms: bool) -> tuple[list[str], list[int]]:
    """Prompt strings and, for each, the class index it describes (several per class with synonyms)."""
    prompts: list[str] = []
    owners: list[int] = []
    for index, name in enumerate(names):
        parts = [p.strip() for p in name.split(",")] if split_synonyms else [name]
        for part in [p for p in parts if p] or [name]:
            prompts.append(template.format(part))
            owners.append(index)
    return prompts, owners


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of C×H×W, reflect padding, radius ceil(3σ) (skimage-style anti-aliasing)."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    out = image[None]
    out = F.conv2d(
        F.pad(out, (radius, radius, 0, 0), mode="reflect"),
        kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1),
        groups=channels,
    )
    out = F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="reflect"),
        kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1),
        groups=channels,
    )
    return out[0]


def owl_input(image: np.ndarray, size: int, pad_value: float, device: torch.device) -> torch.Tensor:
    """RGB uint8 H×W×3 → 3×size×size OWLv2 input: [0,1], pad to a square (bottom/right), anti-aliased
    bilinear resize (Gaussian σ = (factor-1)/2 when shrinking, as OWLv2's preprocessing), CLIP normalise."""
    height, width = image.shape[:2]
    side = max(height, width)
    pixels = torch.from_numpy(np.array(image, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0)
    square = torch.full((3, side, side), pad_value, dtype=torch.float32, device=device)
    square[:, :height, :width] = pixels
    factor = side / size
    if factor > 1 and math.ceil(3 * (factor - 1) / 2) < side:
        square = _gaussian_blur(square, (factor - 1) / 2)
    resized = F.interpolate(square[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    return (resized - mean) / std


def boxes_to_pixels(cxcywh: np.ndarray, height: int, width: int) -> np.ndarray:
    """N×4 ``cx, cy, w, h`` normalised to the padded square → ``x0, y0, x1, y1`` image pixels, clipped."""
    side = max(height, width)
    cx, cy, w, h = (cxcywh.astype(np.float64) * side).T
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return np.clip(xyxy, 0.0, np.array([width, height, width, height], dtype=np.float64))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy class-agnostic NMS on continuous boxes; indices kept, by descending score."""
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    iou = inter / np.maximum(areas[:, None] + areas[None, :] - inter, 1e-12)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in range(len(boxes)):  # loop over boxes (≤ max_candidates), each step vectorised
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold
    return order[np.asarray(keep, dtype=np.int64)]


@dataclass(frozen=True)
class OWLv2Options(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS
    threshold: float = DEFAULTS["threshold"]
    nms_iou: float = DEFAULTS["nms_iou"]
    prompt: str = DEFAULTS["prompt"]
    split_synonyms: bool = DEFAULTS["split_synonyms"]
    pad_value: float = DEFAULTS["pad_value"]
    max_candidates: int = DEFAULTS["max_candidates"]

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{}" not in self.prompt:
            raise ConfigError(f"prompt: must contain '{{}}' where the class name goes, got {self.prompt!r}")
        if self.max_candidates < 1:
            raise ConfigError(f"max_candidates: must be >= 1, got {self.max_candidates}")


class OWLv2Detection(TorchExpert):
    """OWLv2 (Minderer et al., NeurIPS 2023), ``owlv2-base-patch16-ensemble``, with Prismer's 722 queries.

    Config (defaults in ``DEFAULTS``): ``weights`` (a transformers model dir with its CLIP tokenizer:
    ``hf-hub:org/repo`` or a local dir), ``threshold``, ``nms_iou`` (≥ 1 disables NMS), ``prompt``
    (a ``{}`` template), ``split_synonyms``, ``pad_value``, ``max_candidates``, ``batch_size``.
    The 722 text queries are embedded once, here; each batch only runs the image tower and the heads.
    """

    LICENCE = "Apache-2.0"
    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="obj_detection",
        backend="owlv2",
        version="1",
        mode="L",
        has_json=True,
        batch_size=4,
        input_size=(960, 960),
        requires=("depth",),
        uses_gpu=True,
    )
    GPU_BATCH_SIZE: ClassVar[int] = 16
    Options = OWLv2Options
    opts: OWLv2Options
    MODEL_DIRECTORY = True
    _tokenizer: Any  # read by load_model with the weights, used once by __init__ for the queries

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(config, device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.query_embeds = self._embed_queries(self._tokenizer, class_names())
        del self._tokenizer

    def load_model(self, path: Path) -> torch.nn.Module:
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        model = load_pretrained(Owlv2ForObjectDetection, path)
        # Read with the weights, so a broken tokenizer file is reported like a broken weight file.
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        return model

    def _embed_queries(self, tokenizer: Any, names: Sequence[str]) -> torch.Tensor:
        """NUM_CLASSES×D text embeddings: unit-normalised prompt embeddings averaged per class (float32)."""
        prompts, owners = query_prompts(names, self.opts.prompt, bool(self.opts.split_synonyms))
        max_length = int(self.model.config.text_config.max_position_embeddings)
        # Padding to the longest prompt, not to max_length as OWL's processor does: the text tower is
        # causal and pools at EOS, so pad tokens after it cannot change the embedding.
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        chunks: list[torch.Tensor] = []
        with torch.inference_mode():  # fp32 even on CUDA: computed once, and it sets every class score
            for start in range(0, len(prompts), _TEXT_CHUNK):
                ids = tokens["input_ids"][start : start + _TEXT_CHUNK].to(self.torch_device)
                mask = tokens["attention_mask"][start : start + _TEXT_CHUNK].to(self.torch_device)
                out = self.model.owlv2.get_text_features(input_ids=ids, attention_mask=mask)
                # transformers 5 returns a model output (pooler_output = projected); 4.x the tensor itself.
                chunks.append(getattr(out, "pooler_output", out))
            feats = F.normalize(torch.cat(chunks).float(), dim=-1)
            index = torch.tensor(owners, device=self.torch_device)
            summed = torch.zeros((len(names), feats.shape[1]), device=self.torch_device).index_add_(
                0, index, feats
            )
        # The class head L2-normalises queries itself, so the mean needs no rescaling.
        return summed / torch.bincount(index, minlength=len(names)).clamp(min=1)[:, None].float()

    def predict_batch(self, images: list[np.ndarray], deps: Mapping[str, list[Label]]) -> list[Label]:
        labels: list[Label] = []
        for image, depth, (boxes, classes, scores) in zip(images, deps["depth"], self.detect(images)):
            if depth.map is None:
                raise ValueError("depth label carries no map")
            if depth.map.shape != image.shape[:2]:
                raise ValueError(f"depth label {depth.map.shape} does not match image {image.shape[:2]}")
            instance_map, records = depth_ordered_instance_map(
                boxes, classes, scores, depth.map, dedup_iou=DEDUP_IOU, max_instances=MAX_INSTANCES
            )
            labels.append(Label(map=instance_map, data=records))
        return labels

    def detect(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (N×4 ``x0, y0, x1, y1`` pixels, N class ids, N scores) after threshold and NMS."""
        batch = torch.stack(
            [owl_input(im, self.image_size, float(self.opts.pad_value), self.torch_device) for im in images]
        )
        with self.inference():
            feature_map, _ = self.model.image_embedder(pixel_values=batch)
        # The heads are small; fp32 keeps box coordinates and scores near the threshold exact under bf16.
        with torch.inference_mode():
            feature_map = feature_map.float()
            feats = feature_map.flatten(1, 2)
            queries = self.query_embeds[None].expand(len(images), -1, -1)
            logits, _ = self.model.class_predictor(feats, queries, None)
            pred_boxes = self.model.box_predictor(feats, feature_map)
        # argmax takes the first of tied queries: a repeated class name always maps to its lowest index.
        classes = logits.argmax(-1)
        scores = logits.gather(-1, classes[..., None])[..., 0].float().sigmoid()
        return [
            self._select(pred_boxes[i].float(), classes[i], scores[i], image.shape[:2])
            for i, image in enumerate(images)
        ]

    def _select(
        self, boxes: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = torch.nonzero(scores >= float(self.opts.threshold)).flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)][: int(self.opts.max_candidates)]
        boxes_np = boxes_to_pixels(boxes[keep].cpu().numpy(), *size)
        classes_np = classes[keep].cpu().numpy().astype(np.int64)
        scores_np = scores[keep].cpu().numpy().astype(np.float64)
        if float(self.opts.nms_iou) < 1.0 and len(keep):
            kept = nms(boxes_np, scores_np, float(self.opts.nms_iou))
            boxes_np, classes_np, scores_np = boxes_np[kept], classes_np[kept], scores_np[kept]
        return boxes_np, classes_np, scores_np
