"""Visual Genome: an images folder plus ``image_data.json``, captions optional.

Captions come from a BLIP-style list (``[{image, caption}]``) or from ``region_descriptions.json``
(the phrases of an image's regions; ``txt`` is the first, the json keeps up to ``MAX_PHRASES``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import fsspec

from label_pipeline.sources.chunked import ChunkedSource, Entry
from label_pipeline.sources.coco import _join, _load_json

MAX_PHRASES = 20


class VisualGenomeSource(ChunkedSource):
    def __init__(
        self, images: str, image_data: str, captions: str | None = None, shard_size: int = 1000
    ) -> None:
        super().__init__(shard_size)
        self.images = images
        self.image_data = image_data
        self.captions = captions

    def describe(self) -> dict[str, Any]:
        return {
            "format": "vg",
            "images": self.images,
            "image_data": self.image_data,
            "captions": self.captions,
            "shard_size": self.shard_size,
        }

    def list_entries(self) -> list[Entry]:
        phrases = self._captions()
        entries = []
        for item in sorted(_load_json(self.image_data), key=lambda i: i["image_id"]):
            image_id = item["image_id"]
            texts = phrases.get(image_id, [])
            entries.append(
                Entry(
                    raw_key=str(image_id),
                    image_url=(url := self._image_url(item)),
                    caption=texts[0] if texts else None,
                    source={
                        "dataset": "vg",
                        "id": image_id,
                        "coco_id": item.get("coco_id"),
                        "file": url[len(self.images) :].lstrip("/"),
                        "captions": texts[:MAX_PHRASES],
                    },
                )
            )
        return entries

    def _image_url(self, item: dict[str, Any]) -> str:
        """VG images live in VG_100K/ and VG_100K_2/; the url names which, else try the root."""
        image_id = item["image_id"]
        url = item.get("url") or ""
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2].startswith("VG_100K"):
            candidate = _join(self.images, f"{parts[-2]}/{parts[-1]}")
            fs, path = fsspec.core.url_to_fs(candidate)
            if fs.exists(path):
                return candidate
        return _join(self.images, f"{image_id}.jpg")

    def _captions(self) -> dict[int, list[str]]:
        if not self.captions:
            return {}
        data = _load_json(self.captions)
        phrases: dict[int, list[str]] = defaultdict(list)
        for item in data:
            if "regions" in item:  # region_descriptions.json
                image_id = item.get("id", item.get("image_id"))
                phrases[image_id].extend(r["phrase"].strip() for r in item["regions"])
            else:  # BLIP-style {image: ".../123.jpg", caption: ...}
                image_id = int(item["image"].rsplit("/", 1)[-1].split(".")[0])
                value = item["caption"]
                phrases[image_id].extend([value] if isinstance(value, str) else value)
        return phrases
