"""Run statistics, one schema for every runner: ``OUT/stats/{runner}-{utc}-{id}.json``.

docs/FORMAT.md ("Run statistics") is the contract. Statistics describe how a run went (timings,
throughput); they never decide what is done. The local runner fills them from ``ExpertTimes`` (a
timing wrapper around its executor) and the Ray runner from its ``RunMonitor``; both hand the
numbers to :func:`stats_document`, which computes the derived rates the same way.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.core.format import encode_json
from label_pipeline.output import OutputStore

logger = logging.getLogger(__name__)
STATS_FORMAT = 1
MAX_THROUGHPUT_POINTS = 512  # a month-long run still makes a small file: older points are thinned


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def utc_created() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def stats_file_name(runner: str, created: str, run_id: str) -> str:
    """``{runner}-{YYYYMMDDTHHMMSSZ}-{id}.json``: the time after the runner sorts runs of any runner."""
    stamp = created.replace("-", "").replace(":", "").replace("+0000", "Z")
    return f"{runner}-{stamp}-{run_id}.json"


def stats_sort_key(name: str) -> str:
    """Order of stats files by start time, whichever runner wrote them (``local-…`` vs ``ray-…``)."""
    base = name.rsplit("/", 1)[-1]
    return base.split("-", 1)[1] if "-" in base else base


class Throughput:
    """Samples committed over time as ``[seconds since start, cumulative samples]`` points.

    The first point is ``[0, 0]``. Once ``limit`` points are held every other one is dropped, so a
    long run keeps an even, bounded sketch of its whole history.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, limit: int = MAX_THROUGHPUT_POINTS
    ) -> None:
        self.clock, self.limit = clock, max(limit, 4)
        self.started = clock()
        self.samples = 0
        self.points: list[list[float]] = [[0.0, 0]]

    def add(self, samples: int) -> None:
        self.samples += samples
        self.points.append([round(self.clock() - self.started, 3), self.samples])
        if len(self.points) > self.limit:
            last = self.points[-1]
            self.points = self.points[::2]
            if self.points[-1] is not last:  # the newest point always stays
                self.points.append(last)


@dataclass
class ExpertCounters:
    images: int = 0
    batches: int = 0
    busy_s: float = 0.0
    failed_batches: int = 0


@dataclass
class ExpertTimes:
    """Per-expert forward time measured around each batch (the local runner's executor calls ``batch``)."""

    experts: dict[str, ExpertCounters] = field(default_factory=dict)

    def batch(self, task: str, images: int, seconds: float, ok: bool) -> None:
        counters = self.experts.setdefault(task, ExpertCounters())
        counters.busy_s += seconds
        if ok:
            counters.images += images
            counters.batches += 1
        else:
            counters.failed_batches += 1  # its images are counted when their retry succeeds

    def speeds(self, elapsed_s: float) -> dict[str, tuple[float, float]]:
        """Each expert's (images per second of its own busy time, busy share of ``elapsed_s``)."""
        return {
            task: (c.images / c.busy_s, min(c.busy_s / elapsed_s, 1.0) if elapsed_s > 0 else 0.0)
            for task, c in self.experts.items()
            if c.busy_s > 0
        }

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {
            task: {
                "images": c.images,
                "batches": c.batches,
                "busy_s": round(c.busy_s, 3),
                "failed_batches": c.failed_batches,
            }
            for task, c in sorted(self.experts.items())
        }


def stats_document(
    *,
    runner: str,
    run_id: str,
    created: str,
    status: str,
    elapsed_s: float,
    samples: int,
    shards: Mapping[str, Any],
    experts: Mapping[str, Mapping[str, Any]],
    throughput: list[list[float]],
    **extra: Any,
) -> dict[str, Any]:
    """The keys every runner writes; ``extra`` holds runner-specific ones (the Ray cluster, its plan).

    Per expert, ``images_per_s`` is its throughput over the run's wall time and ``busy_fraction``
    the share of that time its replicas were computing (``busy_s / (elapsed_s × replicas)``).
    """
    rate = round(samples / elapsed_s, 3) if elapsed_s > 0 else None
    return {
        "format": STATS_FORMAT,
        "runner": runner,
        "run_id": run_id,
        "created": created,
        "status": status,
        "elapsed_s": round(elapsed_s, 3),
        "samples": samples,
        "images_per_s": rate,
        "shards": dict(shards),
        "experts": {task: _expert_entry(entry, elapsed_s) for task, entry in sorted(experts.items())},
        "throughput": throughput,
        **extra,
    }


def _expert_entry(entry: Mapping[str, Any], elapsed_s: float) -> dict[str, Any]:
    replicas = max(len(entry.get("replicas", ())), 1)
    busy = float(entry.get("busy_s", 0.0))
    return {
        **entry,
        "images_per_s": round(entry.get("images", 0) / elapsed_s, 3) if elapsed_s > 0 else None,
        "busy_fraction": round(busy / (elapsed_s * replicas), 4) if elapsed_s > 0 else None,
    }


def write_stats(store: OutputStore, document: Mapping[str, Any]) -> str | None:
    """Write ``document`` atomically under ``OUT/stats/``; a failure only warns (stats decide nothing)."""
    name = stats_file_name(document["runner"], document["created"], document["run_id"])
    path = f"{store.root}/stats/{name}"
    try:
        store.write_bytes_atomic(path, encode_json(dict(document)))
    except Exception:  # noqa: BLE001 - statistics never decide anything: failing to write them warns
        logger.warning("could not write run statistics to %s", path, exc_info=True)
        return None
    return path


def latest_stats(store: OutputStore) -> dict[str, Any] | None:
    """The newest readable run statistics file of ``store``, whichever runner wrote it."""
    names = store.fs.glob(f"{store.root}/stats/*.json")
    for path in sorted(names, key=stats_sort_key, reverse=True):
        stats = store.read_json(path)
        if isinstance(stats, dict):
            return stats
    return None
