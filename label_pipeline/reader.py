"""Reading label shards elsewhere: ``label_pipeline.read_labels(urls, experts=…)``.

A small layer over ``webdataset``: every sample's json is read first, failed samples are skipped
before any pixel is decoded (their image member holds the original bytes, which may not be an image
at all), and only the experts that succeeded on a sample are yielded. Images are decoded as the
pipeline decoded them (EXIF orientation applied), so every label is pixel-aligned with its image.
docs/FORMAT.md ("Reading the output") shows the plain-webdataset equivalent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import fsspec
import webdataset as wds

from label_pipeline.core.decode import decode_image
from label_pipeline.core.format import IMAGE_EXTENSIONS, decode_npy, decode_png

logger = logging.getLogger(__name__)
USABLE = ("ok", "partial")  # sample statuses that have an image and labels (docs/FORMAT.md)
NO_PIXEL_GUARD = 2**62  # the pipeline already refused oversized images: whatever it labelled decodes


def read_labels(
    urls: str | Sequence[str],
    experts: Iterable[str] | None = None,
    decode: bool = True,
    **options: Any,
) -> wds.WebDataset:
    """Every usable sample of label shards, in shard order, as a dict::

        {"key": str, "url": shard, "image": H×W×3 uint8, "labels": {task: array},
         "annotations": {task: list}, "caption": str | None, "json": the sample's metadata}

    ``urls``: an output root (its committed shards), a shard path or brace pattern
    (``OUT/shards/{00000..00099}.tar``), or a list of them. ``experts``: the tasks to return (default:
    all). Samples whose status is not ``ok``/``partial`` are skipped; a ``partial`` sample carries only
    the experts that succeeded on it, so check ``labels.keys()``. ``labels`` holds each map (H×W
    uint8, ``normal`` H×W×3) and ``ocr_features`` as a float16 (N, 64) array; ``annotations`` the
    detection / OCR lists of ``{task}.json``. With ``decode=False`` nothing is decoded: ``image`` is
    the original bytes and each label its member's bytes. ``options`` go to ``webdataset.WebDataset``
    (e.g. ``nodesplitter``; ``shardshuffle`` defaults to False). The result is an
    ``IterableDataset``: iterate it, or hand it to a ``torch.utils.data.DataLoader``.
    """
    wanted = None if experts is None else frozenset(experts)
    options.setdefault("shardshuffle", False)
    dataset = wds.WebDataset(shard_urls(urls), **options)
    return dataset.compose(partial(_usable_samples, experts=wanted, decode=decode))


def shard_urls(urls: str | Sequence[str]) -> str | list[str]:
    """An output root becomes its committed shards (those with a done-record), in shard order."""
    if not isinstance(urls, str):
        return [str(url) for url in urls]
    fs, path = fsspec.core.url_to_fs(urls)
    if not fs.isdir(path):
        return urls  # a shard, or a brace pattern webdataset expands
    done = sorted(fs.glob(f"{path.rstrip('/')}/records/*.done.json"))
    if not done:
        if not fs.isdir(f"{path.rstrip('/')}/records"):
            raise ValueError(f"{urls}: not a label output root (no records/)")
        raise ValueError(f"{urls}: no committed shard yet (no records/*.done.json)")
    root = urls.rstrip("/")
    return [f"{root}/shards/{name.rsplit('/', 1)[-1][: -len('.done.json')]}.tar" for name in done]


def _usable_samples(
    samples: Iterator[dict[str, Any]], experts: frozenset[str] | None, decode: bool
) -> Iterator[dict[str, Any]]:
    for sample in samples:
        meta = _metadata(sample)
        if meta is None or meta.get("status") not in USABLE:
            continue
        yield _labelled_sample(sample, meta, experts, decode)


def _metadata(sample: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = sample.get("json")
    if raw is None:
        logger.warning("%s in %s has no json member; skipped", sample.get("__key__"), sample.get("__url__"))
        return None
    meta = json.loads(raw)
    return meta if isinstance(meta, dict) else None


def _labelled_sample(
    sample: Mapping[str, Any], meta: dict[str, Any], experts: frozenset[str] | None, decode: bool
) -> dict[str, Any]:
    key = sample["__key__"]
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    labels: dict[str, Any] = {}
    annotations: dict[str, Any] = {}
    for task, info in sorted((meta.get("experts") or {}).items()):
        if (experts is not None and task not in experts) or info.get("status") != "ok":
            continue
        member = _label_member(sample, task)
        if member is None:  # marked ok but absent: a damaged shard (`label-pipeline verify` says more)
            logger.warning("%s: %s is marked ok but has no member; left out", key, task)
            continue
        suffix, data = member
        labels[task] = data if not decode else decode_png(data) if suffix == "png" else decode_npy(data)
        if f"{task}.json" in sample:
            annotations[task] = json.loads(sample[f"{task}.json"])
    caption = sample.get("txt")
    return {
        "key": key,
        "url": sample.get("__url__"),
        "image": decode_image(image, max_pixels=NO_PIXEL_GUARD).array if decode else image,
        "labels": labels,
        "annotations": annotations,
        "caption": caption.decode("utf-8") if isinstance(caption, bytes) else caption,
        "json": meta,
    }


def _label_member(sample: Mapping[str, Any], task: str) -> tuple[str, bytes] | None:
    for suffix in ("png", "npy"):  # a map, or an array member (``ocr_features``)
        if f"{task}.{suffix}" in sample:
            return suffix, sample[f"{task}.{suffix}"]
    return None
