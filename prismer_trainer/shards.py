"""Label shards on disk or in a bucket: finding a dataset's shards, its size, and reading a shard's samples.

A label shard is a tar the label pipeline wrote (docs/FORMAT.md); it is read with the pipeline's own tar
reader (:func:`label_pipeline.core.tario.read_tar_samples`), keeping only the members the model uses. Reading
"names only" lists the samples without reading member data (a resuming stream replays shards this way).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec

from label_pipeline.core.tario import read_tar_samples
from prismer_trainer.samples import captions_of
from prismer_trainer.text import training_text

logger = logging.getLogger(__name__)


def labels_root(root: str | None = None) -> str:
    """Where datasets' label roots live: ``root``, else ``$LABELS_ROOT``, else ``labels``."""
    return root or os.environ.get("LABELS_ROOT") or "labels"


def dataset_shards(dataset: str, root: str | None = None) -> list[str]:
    """``{LABELS_ROOT:-labels}/<dataset>/shards/*.tar`` (any fsspec URL), sorted. ``dataset`` may also be a
    directory of shards or a glob."""
    if dataset.endswith(".tar") or "*" in dataset:
        pattern = dataset
    elif "/" in dataset and not dataset.startswith(("./", "../")) or Path(dataset).is_dir():
        pattern = f"{dataset.rstrip('/')}/shards/*.tar"
    else:
        pattern = f"{labels_root(root).rstrip('/')}/{dataset}/shards/*.tar"
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    urls = sorted(p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths)
    if not urls:
        raise FileNotFoundError(
            f"no label shards match {pattern}; run `make labels DATASET={dataset}` first (or set LABELS_ROOT)"
        )
    return urls


def dataset_size(shards: Sequence[str]) -> int | None:
    """Samples with an image per the shards' done-records (``records/<shard>.done.json``: ``ok`` plus
    ``partial`` from ``status_counts``), or None when a record is missing."""
    total = 0
    for url in shards:
        base, _, name = url.rpartition("/shards/")
        record = f"{base}/records/{name.removesuffix('.tar')}.done.json"
        try:
            with fsspec.open(record, "r") as handle:
                done = json.load(handle)
            counts = done.get("status_counts") or {"ok": done["ok"]}
            total += int(counts.get("ok", 0)) + int(counts.get("partial", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def read_shard(
    url: str,
    wants: Callable[[str, Mapping[str, Any]], bool],
    read_member: Callable[[str], bool],
    with_data: bool = True,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Usable samples of a label shard, in order: ``(key, {member: bytes})`` for the samples ``wants``
    (judged on member names), holding only the members ``read_member`` keeps (``with_data=False``: every
    name, values empty, no member data read). A damaged or missing shard ends early with a warning."""
    errors: list[str] = []
    try:
        with fsspec.open(url, "rb") as handle:
            for key, members in read_tar_samples(handle, errors, names_only=not with_data):
                if not wants(key, members):
                    continue
                if with_data:  # keep the buffered samples small: only what the model reads
                    members = {ext: data for ext, data in members.items() if read_member(ext)}
                yield key, members
    except OSError as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    if errors:
        logger.warning("shard %s is damaged (%s); reading stops there", url, errors[0])


def caption_corpus(shards: Sequence[str], prefix: str = "", max_words: int = 30) -> list[str]:
    """All cleaned training texts of the shards (to build the demo's word vocabulary)."""
    texts: list[str] = []

    def wants(key: str, members: Mapping[str, Any]) -> bool:
        return "txt" in members

    for url in shards:
        for _, members in read_shard(url, wants, lambda ext: ext in ("txt", "json")):
            texts.extend(training_text(c, prefix, max_words) for c in captions_of(members))
    return texts
