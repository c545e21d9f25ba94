"""Decode once: bytes → one RGB uint8 array per sample, shared by every expert.

EXIF orientation is applied (labels align with what EXIF-aware viewers show), every PIL mode is
brought to RGB, and a pixel-count guard refuses decompression bombs before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000×8000; larger images are refused, not decoded


class DecodeError(Exception):
    """A sample whose image cannot be used; ``status`` is the per-sample status in docs/FORMAT.md."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class DecodedImage:
    array: np.ndarray  # H×W×3 uint8, EXIF-oriented
    orig_size: tuple[int, int]  # (H, W) as stored in the file
    mode: str  # the file's PIL mode before conversion
    exif_transposed: bool

    @property
    def size(self) -> tuple[int, int]:
        return self.array.shape[0], self.array.shape[1]


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> DecodedImage:
    """Decode image bytes, or raise ``DecodeError`` with the sample status to record."""
    if data is None:
        raise DecodeError("no_image", "sample has no image member")
    if len(data) == 0:
        raise DecodeError("empty_image", "image member has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        # Pillow's own text embeds the stream's repr (a memory address): not reproducible.
        message = "UnidentifiedImageError: not an image format Pillow can read"
        raise DecodeError("undecodable", message) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError("too_large", f"{width}x{height} exceeds the {max_pixels}-pixel guard")
        if min(width, height) < min_side:
            raise DecodeError("too_small", f"{width}x{height} is below the minimum side {min_side}")
        try:
            image.load()
            mode = image.mode
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation tag
            oriented = ImageOps.exif_transpose(image) if orientation not in (1, None) else image
            array = to_rgb_array(oriented)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    return DecodedImage(array, (height, width), mode, orientation not in (1, None))


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode → H×W×3 uint8. 16/32-bit greyscale is scaled to 8 bits instead of clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        scale = 257 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1
        grey = np.clip(values // scale, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
