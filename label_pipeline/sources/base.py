"""What every source yields: input shards, each an ordered list of samples with stable keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Sample:
    """One input sample as read, before decoding.

    ``key`` is already a valid webdataset key (see ``format.unique_keys``); ``source`` holds the ids
    that tie it back to the dataset and goes verbatim into the output json. ``error`` is set when the
    sample could not be read at all (e.g. ``no_image``); such a sample is still written, without labels.
    ``error_message`` then explains it (a default per status is used when it is None).
    """

    key: str
    image: bytes | None
    image_ext: str | None
    caption: bytes | str | None
    source: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class InputShard:
    """A unit of work. ``shard_id`` names the output tar; ``location`` is what the source reads."""

    shard_id: str
    location: str
    index: int = 0  # position in the source's deterministic shard order


@dataclass
class ShardReadReport:
    """Problems with a shard as a whole (not with one sample), filled in while reading."""

    input_error: str | None = None


class Source(Protocol):
    """A dataset: a deterministic list of shards, each readable on its own (possibly elsewhere)."""

    def shards(self) -> list[InputShard]: ...

    def read(self, shard: InputShard, report: ShardReadReport) -> Iterator[Sample]: ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able identity of the source; a changed description means a different dataset."""
        ...
