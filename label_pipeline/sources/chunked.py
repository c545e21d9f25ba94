"""Cutting a non-sharded dataset (COCO, VG, a folder) into fixed-size input shards, deterministically."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from label_pipeline.core.format import IMAGE_EXTENSIONS, unique_keys
from label_pipeline.sources.base import InputShard, Sample, ShardReadReport


@dataclass(frozen=True)
class Entry:
    """One image of a non-sharded dataset: where its bytes are and what describes it."""

    raw_key: str
    image_url: str
    caption: bytes | str | None
    source: dict[str, Any]


class ChunkedSource:
    """Base for sources that list every image up front, in a sorted order, then slice it.

    The listing is the same on every run (entries are sorted by a stable id), so shard ids and keys
    are identical across runs and machines.
    """

    def __init__(self, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = shard_size
        self._entries: list[Entry] | None = None
        self._keys: list[str] | None = None

    def list_entries(self) -> list[Entry]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _listing(self) -> tuple[Sequence[Entry], Sequence[str]]:
        if self._entries is None:
            self._entries = self.list_entries()
            self._keys = unique_keys([e.raw_key for e in self._entries])
        assert self._keys is not None
        return self._entries, self._keys

    def shards(self) -> list[InputShard]:
        entries, _ = self._listing()
        count = (len(entries) + self.shard_size - 1) // self.shard_size
        return [InputShard(shard_id=f"{i:05d}", location=str(i), index=i) for i in range(count)]

    def read(self, shard: InputShard, report: ShardReadReport) -> Iterator[Sample]:
        entries, keys = self._listing()
        start = int(shard.location) * self.shard_size
        for entry, key in zip(
            entries[start : start + self.shard_size], keys[start : start + self.shard_size]
        ):
            yield self._read_entry(entry, key)

    def _read_entry(self, entry: Entry, key: str) -> Sample:
        ext = entry.image_url.rsplit(".", 1)[-1].lower()
        source = entry.source
        try:
            with fsspec.open(entry.image_url, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return Sample(key, None, None, entry.caption, source, error="no_image")
        return Sample(key, data, ext if ext in IMAGE_EXTENSIONS else "jpg", entry.caption, source)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the configuration, not a listing of millions of entries; a worker re-lists once.
        state = dict(self.__dict__)
        state["_entries"] = None
        state["_keys"] = None
        return state
