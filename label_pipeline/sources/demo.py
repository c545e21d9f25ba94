"""The embedded demo: a small WebDataset built at run time from photos that ship with scikit-image.

Nothing binary lives in git: the tars are rendered on first use into the manifest's ``path`` and then
read like any other WebDataset. The set mixes colour and greyscale photos, an RGBA logo and a few
rendered-text images, so every expert (OCR included) has something to find.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from label_pipeline.core.tario import write_tar
from label_pipeline.sources.base import InputShard, Sample, ShardReadReport
from label_pipeline.sources.webdataset import WebDatasetSource

logger = logging.getLogger(__name__)
SAMPLES_PER_SHARD = 6
DEMO_VERSION = 1

# (key, skimage loader name, caption); a loader name "text:..." renders that text instead.
DEMO_IMAGES: list[tuple[str, str, str]] = [
    ("astronaut", "astronaut", "an astronaut in a white suit in front of an american flag"),
    ("coffee", "coffee", "a cup of coffee on a saucer with a spoon"),
    ("chelsea", "chelsea", "a tabby cat looking to the side"),
    ("rocket", "rocket", "a rocket standing on its launch pad"),
    ("page", "page", "a scanned page of printed text"),
    ("text", "text", "hand-painted text on a road sign"),
    ("camera", "camera", "a man with a camera on a tripod, black and white"),
    ("coins", "coins", "old coins laid out on a table"),
    ("logo", "logo", "the scikit-image logo on a transparent background"),
    ("colorwheel", "colorwheel", "a colour wheel"),
    ("sign_open", "text:OPEN 24 HOURS", "a shop sign that says open 24 hours"),
    ("sign_street", "text:MAIN STREET|EXIT 42", "a green street sign for main street, exit 42"),
]


def _render_text(text: str) -> np.ndarray:
    """A sign-like image: dark text lines on a light panel over a coloured background."""
    image = Image.new("RGB", (640, 360), (40, 110, 70))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 60, 600, 300), fill=(235, 235, 225))
    font = ImageFont.load_default(size=56)
    for row, line in enumerate(text.split("|")):
        draw.text((70, 90 + row * 90), line, fill=(20, 20, 20), font=font)
    return np.asarray(image)


def _load_picture(name: str) -> np.ndarray:
    if name.startswith("text:"):
        return _render_text(name[len("text:") :])
    import skimage.data  # heavy import, only when the demo is built

    loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
    return loader()


def _encode_picture(array: np.ndarray) -> tuple[str, bytes]:
    """Colour photos as JPEG, greyscale and RGBA as PNG (so decoding sees several modes)."""
    buffer = io.BytesIO()
    if array.ndim == 3 and array.shape[2] == 3:
        Image.fromarray(array).save(buffer, format="JPEG", quality=92)
        return "jpg", buffer.getvalue()
    Image.fromarray(array).save(buffer, format="PNG")
    return "png", buffer.getvalue()


def demo_samples() -> Iterator[list[tuple[str, bytes]]]:
    """The demo samples as tar members (``key.ext`` → bytes)."""
    for index, (key, picture, caption) in enumerate(DEMO_IMAGES):
        ext, data = _encode_picture(_load_picture(picture))
        meta = {"demo_id": index, "picture": picture, "caption": caption}
        yield [
            (f"{key}.{ext}", data),
            (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
            (f"{key}.txt", caption.encode()),
        ]


def build_demo_dataset(root: str) -> list[str]:
    """Write the demo tars under ``root`` unless a complete build is already there."""
    fs, path = fsspec.core.url_to_fs(root)
    marker = f"{path}/_demo_complete.json"
    shard_count = -(-len(DEMO_IMAGES) // SAMPLES_PER_SHARD)
    names = [f"{path}/{i:05d}.tar" for i in range(shard_count)]
    if fs.exists(marker) and json.loads(fs.cat(marker)).get("version") == DEMO_VERSION:
        return names
    samples = list(demo_samples())
    fs.makedirs(path, exist_ok=True)
    for index, name in enumerate(names):
        _write_atomically(fs, name, samples[index * SAMPLES_PER_SHARD : (index + 1) * SAMPLES_PER_SHARD])
    fs.pipe(marker, json.dumps({"version": DEMO_VERSION, "shards": len(names)}).encode())
    logger.info("built the demo dataset: %d images in %d shards under %s", len(samples), len(names), root)
    return names


def _write_atomically(fs: Any, name: str, shard: list[list[tuple[str, bytes]]]) -> None:
    with tempfile.NamedTemporaryFile(delete=False, suffix=".tar") as tmp:
        write_tar(tmp, shard)
    try:
        fs.put_file(tmp.name, name)
    finally:
        os.unlink(tmp.name)


class DemoSource:
    """The demo dataset; built lazily so listing shards works on any worker."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")

    def describe(self) -> dict[str, Any]:
        return {"format": "demo", "path": self.path, "version": DEMO_VERSION}

    def _webdataset(self) -> WebDatasetSource:
        names = build_demo_dataset(self.path)
        return WebDatasetSource(f"{self.path}/{{00000..{len(names) - 1:05d}}}.tar")

    def shards(self) -> list[InputShard]:
        return self._webdataset().shards()

    def read(self, shard: InputShard, report: ShardReadReport) -> Iterator[Sample]:
        return WebDatasetSource(self.path).read(shard, report)
