"""Small builders for test inputs: images in every mode, WebDataset tars, manifests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from label_pipeline.cli import main
from label_pipeline.core.tario import write_tar


def gradient(height: int, width: int) -> np.ndarray:
    """A deterministic RGB picture with edges (a gradient and a square)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1)
    image = image.astype(np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = 255
    return image


def image_bytes(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_wds(path: Path, samples: list[dict[str, bytes]], keys: list[str] | None = None) -> Path:
    """A WebDataset tar; each sample is ``{extension: bytes}``."""
    keys = keys or [f"{i:06d}" for i in range(len(samples))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        write_tar(handle, [[(f"{k}.{ext}", data) for ext, data in s.items()] for k, s in zip(keys, samples)])
    return path


def photo_samples(count: int, size: tuple[int, int] = (48, 64), start: int = 0) -> list[dict[str, bytes]]:
    samples = []
    for i in range(start, start + count):
        array = np.roll(gradient(*size), i * 3, axis=1)
        samples.append(
            {
                "jpg": image_bytes(array),
                "txt": f"picture number {i}".encode(),
                "json": f'{{"url": "http://example.invalid/{i}.jpg"}}'.encode(),
            }
        )
    return samples


def write_manifest(
    path: Path, source: dict[str, Any], output: Path, experts: list[Any], **extra: Any
) -> Path:
    data = {"name": "test", "source": source, "output": str(output), "experts": experts, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def label_toy_shard(root: Path, samples: list[dict[str, bytes]]) -> Path:
    """``samples`` as one input shard, labelled by the real pipeline (edge:canny) into
    ``root/labels/toy``; returns ``root/labels``, the label root the trainer reads."""
    write_wds(root / "in" / "00000.tar", samples)
    source = {"format": "webdataset", "path": str(root / "in" / "00000.tar")}
    manifest = write_manifest(root / "m.yaml", source, root / "labels" / "toy", ["edge:canny"])
    assert main(["run", str(manifest), "--no-progress"]) == 0
    return root / "labels"
