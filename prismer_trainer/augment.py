"""Joint label-aware augmentation: one geometry for the RGB image and every expert label.

Prismer's random resized crop, then RGB → train resolution (bicubic) and every label → 224 (nearest),
a joint horizontal flip that also negates the normal's x component, and RandAugment(2, 5) whose
geometric ops are defined in normalised coordinates, so a translation moves each tensor by the same
fraction of its own size (Prismer moved labels by RGB pixels, off their image at 480 px).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from prismer_trainer.model_config import CATEGORICAL_EXPERTS

LABEL_RESOLUTION = 224  # Prismer resizes every expert label to 224², whatever the RGB resolution
BACKGROUND = 255  # the id of "no class / no instance" in every categorical map
# Fill values for pixels that a geometric augmentation brings in from outside the image (Prismer's).
RGB_FILL = 0
DENSE_FILL = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation (Prismer: crop scale 0.5–1.5 pre-train, 0.5–1.0 fine-tune)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_n: int = 2
    randaug_m: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ValueError(f"crop_scale must be 0 < lo <= hi, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 <= self.hflip <= 1 or self.randaug_n < 0 or not 0 <= self.randaug_m <= 10:
            raise ValueError("hflip must be a probability, randaug_n >= 0, randaug_m in [0, 10]")


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's ``RandomResizedCrop.get_params``: 10 tries of a random area
    (``scale`` × image area) and log-uniform aspect ratio that fits, else the whole image clipped to
    ``ratio``. (With Prismer's pre-train scale up to 1.5, areas above 1 never fit.)"""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize_nearest(array: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` and resize to ``size``² with nearest neighbour, sampling source pixel centres (PIL's
    NEAREST convention), in one gather."""
    top, left, h, w = box
    rows = top + np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = left + np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return array[rows[:, None], cols[None, :]]


def crop_resize_bicubic(rgb: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    top, left, h, w = box
    box_lrtb = (left, top, left + w, top + h)
    image = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC, box=box_lrtb)
    return np.asarray(image)


@dataclass(frozen=True)
class GeometricOp:
    """An affine map in normalised image coordinates ``u, v ∈ [0, 1]`` (output → input)."""

    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]

    def pixel_matrix(self, height: int, width: int) -> np.ndarray:
        """The same map in this tensor's own pixels (pixel centres at ``i + 0.5``)."""
        to_unit = np.array([[1 / width, 0, 0.5 / width], [0, 1 / height, 0.5 / height], [0, 0, 1]])
        to_pixel = np.array([[width, 0, -0.5], [0, height, -0.5], [0, 0, 1]])
        affine = np.vstack([np.array(self.matrix, dtype=np.float64), [0, 0, 1]])
        return (to_pixel @ affine @ to_unit)[:2]

    def apply(self, array: np.ndarray, nearest: bool, fill: int) -> np.ndarray:
        height, width = array.shape[:2]
        flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
        channels = 1 if array.ndim == 2 else array.shape[2]
        out = cv2.warpAffine(
            array,
            self.pixel_matrix(height, width),
            (width, height),
            flags=flags,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(fill,) * channels if channels > 1 else fill,
        )
        return out.reshape(array.shape)


# Prismer's RandAugment list: (name, max magnitude at m=10). Brightness and Sharpness are kept (they are
# drawn) although at m=5 their factor is exactly 1.0, i.e. a no-op, as in the original.
RANDAUG_OPS: tuple[tuple[str, float], ...] = (
    ("identity", 0.0),
    ("shear_x", 0.3),
    ("shear_y", 0.3),
    ("translate_x", 0.33),
    ("translate_y", 0.33),
    ("rotate", 30.0),
    ("autocontrast", 0.0),
    ("equalize", 0.0),
    ("brightness", 0.0),
    ("sharpness", 0.0),
)


def randaugment_ops(n: int, m: int, rng: np.random.Generator) -> list[tuple[str, GeometricOp | None]]:
    """Draw ``n`` ops with replacement; geometric ones with a random sign and magnitude ``m/10 · max``."""
    ops = []
    for index in rng.integers(0, len(RANDAUG_OPS), size=n):
        name, top = RANDAUG_OPS[int(index)]
        value = top * m / 10 * (1 if rng.random() < 0.5 else -1)
        ops.append((name, _geometric(name, value)))
    return ops


def _geometric(name: str, value: float) -> GeometricOp | None:
    if name == "shear_x":
        return GeometricOp(((1, value, 0), (0, 1, 0)))
    if name == "shear_y":
        return GeometricOp(((1, 0, 0), (value, 1, 0)))
    if name == "translate_x":  # value is a fraction of the width, so labels move with the image
        return GeometricOp(((1, 0, value), (0, 1, 0)))
    if name == "translate_y":
        return GeometricOp(((1, 0, 0), (0, 1, value)))
    if name == "rotate":  # about the centre
        c, s = math.cos(math.radians(value)), math.sin(math.radians(value))
        return GeometricOp(((c, -s, 0.5 - 0.5 * c + 0.5 * s), (s, c, 0.5 - 0.5 * s - 0.5 * c)))
    return None


def label_fill(expert: str) -> int:
    """What an augmentation fills in outside the image: background for ids, 0 for dense labels."""
    return BACKGROUND if expert in CATEGORICAL_EXPERTS else DENSE_FILL


def joint_transform(
    rgb: np.ndarray,
    labels: Mapping[str, np.ndarray],
    resolution: int,
    rng: np.random.Generator | None,
    augment: AugmentConfig | None,
    label_resolution: int = LABEL_RESOLUTION,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """RGB (H×W×3 uint8) and its pixel-aligned labels (H×W or H×W×3) → RGB ``resolution``² and labels
    ``label_resolution``², all through the same crop, flip and augmentation. ``augment=None``: resize only."""
    height, width = rgb.shape[:2]
    box = (0, 0, height, width)
    if augment is not None:
        if rng is None:
            raise ValueError("joint_transform: augmentation needs an rng")
        box = random_resized_crop_box(height, width, augment.crop_scale, augment.crop_ratio, rng)
    rgb = crop_resize_bicubic(rgb, box, resolution)
    out = {name: crop_resize_nearest(label, box, label_resolution) for name, label in labels.items()}
    if augment is None or rng is None:
        return rgb, out
    if rng.random() < augment.hflip:
        rgb, out = _hflip(rgb, out)
    rgb, out = _randaugment(rgb, out, augment, rng)
    return np.ascontiguousarray(rgb), {k: np.ascontiguousarray(v) for k, v in out.items()}


def _hflip(rgb: np.ndarray, labels: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    out = {name: label[:, ::-1] for name, label in labels.items()}
    if "normal" in out:  # mirrored surfaces face the other way: x -> -x, i.e. 255 - byte
        normal = out["normal"].copy()
        normal[..., 0] = 255 - normal[..., 0]
        out["normal"] = normal
    return rgb[:, ::-1], out


def _randaugment(
    rgb: np.ndarray, labels: dict[str, np.ndarray], augment: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Geometric ops move RGB and labels alike (labels: nearest, their own fill); colour ops touch RGB."""
    for name, op in randaugment_ops(augment.randaug_n, augment.randaug_m, rng):
        if op is not None:
            rgb = op.apply(np.ascontiguousarray(rgb), nearest=False, fill=RGB_FILL)
            labels = {k: op.apply(np.ascontiguousarray(v), True, label_fill(k)) for k, v in labels.items()}
        elif name == "autocontrast":
            rgb = np.asarray(ImageOps.autocontrast(Image.fromarray(np.ascontiguousarray(rgb))))
        elif name == "equalize":
            rgb = np.asarray(ImageOps.equalize(Image.fromarray(np.ascontiguousarray(rgb))))
    return rgb, labels
