"""COCO: an images folder plus caption annotations in any of the three common layouts.

* official ``captions_{train,val}{2014,2017}.json`` (``images`` + ``annotations``)
* Karpathy ``dataset_coco.json`` (``images`` with ``filepath``/``filename``/``sentences``)
* BLIP-style ``coco_karpathy_{train,val,test}.json`` (a list of ``{image, caption}``)

Images with several captions become one sample: ``txt`` is the first caption, the json keeps all.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import fsspec

from label_pipeline.sources.chunked import ChunkedSource, Entry


def _load_json(url: str) -> Any:
    with fsspec.open(url, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative.lstrip('/')}"


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


class CocoSource(ChunkedSource):
    def __init__(self, images: str, annotations: list[str], shard_size: int = 1000) -> None:
        super().__init__(shard_size)
        if not annotations:
            raise ValueError("coco source needs at least one annotation file")
        self.images = images
        self.annotations = list(annotations)

    def describe(self) -> dict[str, Any]:
        return {
            "format": "coco",
            "images": self.images,
            "annotations": self.annotations,
            "shard_size": self.shard_size,
        }

    def list_entries(self) -> list[Entry]:
        captions: dict[str, list[str]] = defaultdict(list)
        ids: dict[str, Any] = {}
        for url in self.annotations:
            _collect(_load_json(url), captions, ids, url)
        return [
            Entry(
                raw_key=_stem(relative),
                image_url=_join(self.images, relative),
                caption=captions[relative][0] if captions[relative] else None,
                source={
                    "dataset": "coco",
                    "id": ids[relative],
                    "file": relative,
                    "captions": captions[relative],
                },
            )
            for relative in sorted(ids)
        ]


def _collect(data: Any, captions: dict[str, list[str]], ids: dict[str, Any], url: str) -> None:
    """Merge one annotation file into ``relative image path → captions / id``."""
    if isinstance(data, dict) and "annotations" in data:  # official COCO captions
        files = {img["id"]: _official_path(img, url) for img in data["images"]}
        for image_id, relative in files.items():
            ids.setdefault(relative, image_id)
        for ann in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            captions[files[ann["image_id"]]].append(ann["caption"].strip())
    elif isinstance(data, dict) and "images" in data:  # Karpathy dataset_coco.json
        for img in data["images"]:
            relative = f"{img['filepath']}/{img['filename']}"
            ids.setdefault(relative, img.get("cocoid", img.get("imgid")))
            captions[relative].extend(s["raw"].strip() for s in img.get("sentences", []))
    elif isinstance(data, list):  # BLIP-style list
        for item in data:
            relative = item["image"]
            ids.setdefault(relative, item.get("image_id", _stem(relative)))
            value = item.get("caption", [])
            captions[relative].extend([value] if isinstance(value, str) else value)
    else:
        raise ValueError(f"{url}: not a COCO caption file (official, Karpathy or BLIP-style list)")


def _official_path(image: dict[str, Any], url: str) -> str:
    """Official files name images bare; their folder is the split in the annotation file's name."""
    name = url.rsplit("/", 1)[-1]
    for split in ("train2014", "val2014", "train2017", "val2017", "test2014", "test2015", "test2017"):
        if split in name:
            return f"{split}/{image['file_name']}"
    return image["file_name"]
