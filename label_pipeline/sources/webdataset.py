"""WebDataset tars (incl. img2dataset output): one input tar is one work unit."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
from braceexpand import braceexpand

from label_pipeline.core.format import IMAGE_EXTENSIONS, KeyDeduper
from label_pipeline.core.tario import TarSample, read_tar_entries
from label_pipeline.sources.base import InputShard, Sample, ShardReadReport

logger = logging.getLogger(__name__)
_DROPPED_META = ("exif",)  # img2dataset stores raw EXIF here: large and not an id


def expand_shard_urls(pattern: str) -> list[str]:
    """Brace-expand ``…/{00000..01242}.tar`` (several patterns may be joined with ``::``)."""
    return list(_expanded(pattern))


@functools.lru_cache(maxsize=8)
def _expanded(pattern: str) -> tuple[str, ...]:
    # Planning expands the same pattern several times (listing, overlap check, status): once is enough.
    return tuple(url for part in pattern.split("::") for url in _expand_part(part))


# One ascending numeric range and no other brace syntax: the shape of every sharded dataset.
_SIMPLE_RANGE = re.compile(r"([^{}\\,]*)\{(\d+)\.\.(\d+)\}([^{}\\,]*)")


def _expand_part(pattern: str) -> Iterable[str]:
    """``braceexpand``, with a fast path for ``prefix{00000..99999}suffix`` (100k URLs in ~30 ms,
    against ~1 s through the general parser); the output is the same as braceexpand's."""
    simple = _SIMPLE_RANGE.fullmatch(pattern)
    if simple is None or int(simple[2]) > int(simple[3]):
        return braceexpand(pattern)
    prefix, start, end, suffix = simple.groups()
    # braceexpand's rule: a bound written with a leading zero pads every number to the wider bound
    padded = any(bound.startswith("0") and bound != "0" for bound in (start, end))
    width = max(len(start), len(end)) if padded else 0
    return [f"{prefix}{number:0{width}d}{suffix}" for number in range(int(start), int(end) + 1)]


def shard_id_of(url: str) -> str:
    return url.rstrip("/").rpartition("/")[2].removesuffix(".tar")


class WebDatasetSource:
    def __init__(self, path: str, skip_missing: bool = False) -> None:
        self.path = path
        self.skip_missing = skip_missing

    def describe(self) -> dict[str, Any]:
        return {"format": "webdataset", "path": self.path}

    def shards(self) -> list[InputShard]:
        urls = expand_shard_urls(self.path)
        if self.skip_missing:
            urls = complete_urls(urls)
        ids = [shard_id_of(u) for u in urls]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"input shards of {self.path!r} have clashing names; each needs a distinct basename"
            )
        return [InputShard(sid, url, i) for i, (sid, url) in enumerate(zip(ids, urls))]

    def read(self, shard: InputShard, report: ShardReadReport) -> Iterator[Sample]:
        """Every sample of the tar, in order (docs/FORMAT.md: how tar members become samples)."""
        dedupe = KeyDeduper()
        for entry in self._entries(shard.location, report):
            key = dedupe(entry.key)
            if entry.unsupported is not None:
                yield _unsupported_sample(key, entry, shard.location)
            else:
                members = {ext.lower(): data for ext, data in entry.members.items()}
                yield _sample_from_members(key, entry.key, members, shard.location)

    def _entries(self, url: str, report: ShardReadReport) -> Iterator[TarSample]:
        """Samples of one tar; a truncated or damaged tar ends the shard after the last whole member."""
        errors: list[str] = []
        # A shard that cannot be opened at all raises: the shard fails and is retried on the next run.
        with fsspec.open(url, "rb") as handle:
            yield from read_tar_entries(handle, errors)
        if errors:
            report.input_error = errors[0]
            logger.warning("input shard %s is damaged, keeping the samples read before: %s", url, errors[0])


def _unsupported_sample(key: str, entry: TarSample, url: str) -> Sample:
    """A tar member that is not a regular file: kept as a failed sample so that nothing vanishes."""
    source = {"shard": shard_id_of(url), "key": entry.key}
    message = f"{entry.unsupported}: only regular files are read as sample members"
    return Sample(key, None, None, None, source, error="unsupported_member", error_message=message)


def _sample_from_members(key: str, raw_key: str, members: dict[str, bytes], url: str) -> Sample:
    source: dict[str, Any] = {"shard": shard_id_of(url), "key": raw_key}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if isinstance(meta, dict):
                source["meta"] = {k: v for k, v in meta.items() if k not in _DROPPED_META}
        except (ValueError, UnicodeDecodeError):
            source["meta_error"] = "input json member is not valid JSON"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    caption = members.get("txt")
    if image_ext is None:
        return Sample(key, None, None, caption, source, error="no_image")
    return Sample(key, members[image_ext], image_ext, caption, source)


def complete_urls(urls: Iterable[str]) -> list[str]:
    """The URLs whose tar exists and, in an img2dataset download folder, whose download has finished.

    img2dataset writes ``{shard}_stats.json`` after the shard's tar; a tar without it is still being
    downloaded (or the download was interrupted) and must not be labelled as it stands. One listing per
    folder decides for all its URLs: on an object store a request per URL would cost minutes.
    """
    from label_pipeline.inputs import list_names  # inputs imports the sources package

    urls = list(urls)
    by_folder: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_folder[url.rpartition("/")[0]].append(url)
    complete = set()
    for folder, members in by_folder.items():
        fs, path = fsspec.core.url_to_fs(folder or ".")
        names = list_names(fs, path)
        downloading = "_download" in names
        for url in members:
            name = url.rpartition("/")[2]
            stem = name[: -len(".tar")] if name.endswith(".tar") else name
            if name in names and (not downloading or f"{stem}_stats.json" in names):
                complete.add(url)
    return [url for url in urls if url in complete]
