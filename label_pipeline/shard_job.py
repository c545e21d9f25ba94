"""One shard, start to commit: the unit of work every runner schedules.

``plan_shards`` decides, from the done-records, which shards are finished, which need a fresh pass
from the input and which only need some experts added or replaced (incremental relabelling).
``run_shard`` does one shard and commits it (tar, records, done-record last).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.config import DecodeConfig
from label_pipeline.labeler import Labeler, WorkItem, chunked, item_from_output, item_from_sample
from label_pipeline.output import OutputStore
from label_pipeline.sources.base import InputShard, ShardReadReport, Source
from label_pipeline.tario import Member, read_tar_samples

logger = logging.getLogger(__name__)
PREFETCH_CHUNKS = 2  # decoded chunks read ahead while experts run


@dataclass
class ShardPlan:
    shard: InputShard
    mode: str  # "fresh" | "incremental"
    tasks: list[str]  # experts to compute for this shard
    previous: dict[str, Any] | None = None  # done-record being extended (incremental)


@dataclass
class ShardResult:
    shard_id: str
    record: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_failures(self) -> bool:
        return bool(self.record.get("failed")) or bool(self.record.get("input_error"))


def plan_shards(
    shards: Iterable[InputShard], store: OutputStore, fingerprints: Mapping[str, str]
) -> tuple[list[ShardPlan], list[str]]:
    """(work to do, ids of shards already done for every requested expert)."""
    plans: list[ShardPlan] = []
    done: list[str] = []
    for shard in shards:
        record = store.done_record(shard.shard_id)
        if record is None:
            plans.append(ShardPlan(shard, "fresh", list(fingerprints)))
            continue
        have = {task: info.get("fingerprint") for task, info in record.get("experts", {}).items()}
        stale = [task for task, fp in fingerprints.items() if have.get(task) != fp]
        if stale:
            plans.append(ShardPlan(shard, "incremental", stale, previous=record))
        else:
            done.append(shard.shard_id)
    return plans, done


def run_shard(
    plan: ShardPlan, source: Source, store: OutputStore, labeler: Labeler, decode: DecodeConfig
) -> ShardResult:
    """Label one shard and commit it; nothing is visible as done unless every step succeeded."""
    started = time.monotonic()
    report = ShardReadReport()
    rows: list[dict[str, Any]] = []
    items = _work_items(plan, source, store, decode, report)
    write = store.write_shard(plan.shard.shard_id, _labelled_members(items, labeler, plan.tasks, rows))
    store.write_records(plan.shard.shard_id, rows)
    record = _done_record(plan, rows, write.sha256, write.size, report, labeler, time.monotonic() - started)
    store.write_done(plan.shard.shard_id, record)
    return ShardResult(plan.shard.shard_id, record, rows)


def _work_items(
    plan: ShardPlan, source: Source, store: OutputStore, decode: DecodeConfig, report: ShardReadReport
) -> Iterator[WorkItem]:
    if plan.mode == "fresh":
        return (item_from_sample(sample, decode) for sample in source.read(plan.shard, report))
    return _items_from_output(store, plan.shard.shard_id, decode)


def _items_from_output(store: OutputStore, shard_id: str, decode: DecodeConfig) -> Iterator[WorkItem]:
    with store.fs.open(store.shard_path(shard_id), "rb") as handle:
        for key, members in read_tar_samples(handle):
            yield item_from_output(key, members, decode)


def _labelled_members(
    items: Iterator[WorkItem], labeler: Labeler, tasks: list[str], rows: list[dict[str, Any]]
) -> Iterator[list[Member]]:
    """Label chunk by chunk (the next chunk is read and decoded in the background meanwhile)."""
    for chunk in read_ahead(chunked(items, labeler.chunk_size), PREFETCH_CHUNKS):
        labeler.label(chunk, tasks)
        for item in chunk:
            members = item.to_members()
            rows.append(item.record())
            yield members


def _done_record(
    plan: ShardPlan,
    rows: list[dict[str, Any]],
    sha256: str,
    size: int,
    report: ShardReadReport,
    labeler: Labeler,
    duration: float,
) -> dict[str, Any]:
    statuses = Counter(row["status"] for row in rows)
    experts = dict((plan.previous or {}).get("experts", {}))
    for task in plan.tasks:
        outcomes = Counter()
        for row in rows:
            outcomes.update([_expert_outcome(row, task)])
        experts[task] = {
            "fingerprint": labeler.fingerprints[task],
            "ok": outcomes["ok"],
            "failed": outcomes["error"],
        }
    record = {
        "shard": plan.shard.shard_id,
        "input": plan.shard.location,
        "samples": len(rows),
        "ok": statuses["ok"],
        "failed": len(rows) - statuses["ok"],
        "status_counts": dict(sorted(statuses.items())),
        "experts": dict(sorted(experts.items())),
        "sha256": sha256,
        "bytes": size,
        "duration_s": round(duration, 3),
    }
    input_error = report.input_error or (plan.previous or {}).get("input_error")
    if input_error:
        record["input_error"] = input_error
    return record


def _expert_outcome(row: dict[str, Any], task: str) -> str:
    return json.loads(row["expert_status"]).get(task, "skipped")


def read_ahead(iterator: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``iterator`` in a background thread, ``depth`` items ahead; errors re-raise in the caller."""
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for value in iterator:
                if stop.is_set():
                    return
                buffer.put(("item", value))
            buffer.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            buffer.put(("error", exc))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
