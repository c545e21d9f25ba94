"""Encoding of label members and sample keys (docs/FORMAT.md is the contract)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from typing import Any

import numpy as np
from PIL import Image

# Fixed, so the same map always encodes to the same bytes (docs/FORMAT.md, "PNG settings"). zlib's
# run-length strategy gave smaller and faster PNGs than every level 1-6 of the default strategy on
# every kind of label map measured (bench/throughput.py --png); under it the level changes nothing
# but the zlib header's level hint.
PNG_COMPRESS_LEVEL = 3
PNG_STRATEGY = zlib.Z_RLE
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# Array members whose row i belongs to entry i of another task's json list (docs/FORMAT.md).
ARRAY_ROWS_FOLLOW = {"ocr_features": "ocr_detection"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def encode_png(array: np.ndarray, mode: str) -> bytes:
    """uint8 H×W (``L``) or H×W×3 (``RGB``) → PNG bytes, reproducibly."""
    expected_ndim = 2 if mode == "L" else 3
    if array.dtype != np.uint8 or array.ndim != expected_ndim:
        raise ValueError(f"cannot encode {array.dtype} {array.shape} as {mode} PNG")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_STRATEGY
    )
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 array (H×W for L, H×W×3 for RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"label PNG has mode {image.mode}, expected L or RGB")
        return np.asarray(image)


def encode_json(data: Any) -> bytes:
    """Canonical JSON (sorted keys, compact), so equal data is equal bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_npy(array: np.ndarray) -> bytes:
    """An array member in ``numpy.save`` format, without pickle (reproducible: the header is fixed)."""
    if array is None or array.dtype.hasobject:
        raise ValueError("an .npy label member must be a numeric array")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """``.npy`` member bytes → array; pickled object arrays are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_label_members(label_map: np.ndarray, data: Any, mode: str) -> dict[str, bytes]:
    """An expert label → ``{"png": …}`` plus ``{"json": …}`` when it has side data."""
    members = {"png": encode_png(label_map, mode)}
    if data is not None:
        members["json"] = encode_json(data)
    return members


def sanitize_key(raw: str) -> str:
    """Make a webdataset-safe key: only ``[A-Za-z0-9_-]`` (no dots, which split members)."""
    key = _KEY_BAD_CHARS.sub("_", raw.strip())
    return key or "_"


class KeyDeduper:
    """Sanitise keys one at a time, breaking collisions deterministically with a hash of the raw key."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, raw: str) -> str:
        key = sanitize_key(raw)
        if key in self._seen:
            key = f"{key}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
        while key in self._seen:  # pathological: identical raw keys
            key = f"{key}-{len(self._seen)}"
        self._seen.add(key)
        return key


def unique_keys(raw_keys: list[str]) -> list[str]:
    """Sanitise a list of keys (see ``KeyDeduper``)."""
    dedupe = KeyDeduper()
    return [dedupe(raw) for raw in raw_keys]
