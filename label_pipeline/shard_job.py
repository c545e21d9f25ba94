"""One shard, start to commit: the unit of work every runner schedules.

``plan_shards`` decides, from the done-records, which shards are finished, which need a fresh pass
from the input and which only need some experts added or replaced (incremental relabelling). A
done-record counts only while the tar and records it vouches for are unchanged on disk and its input
shard is the one it was made from. ``run_shard`` does one shard and commits it (tar, records,
done-record last).
"""

from __future__ import annotations

import json
import logging
import queue
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.budget import PixelBudget
from label_pipeline.config import DecodeConfig
from label_pipeline.core.tario import HashingReader, Member, read_tar_samples
from label_pipeline.labeler import Labeler, WorkItem, chunked, item_from_output, item_from_sample
from label_pipeline.output import OutputStore
from label_pipeline.sources.base import InputShard, ShardReadReport, Source

logger = logging.getLogger(__name__)
PREFETCH_CHUNKS = 2  # decoded chunks read ahead while experts run


class CarryOverMismatch(RuntimeError):
    """An output tar read for incremental relabelling is not the one its done-record vouches for."""


@dataclass
class ShardPlan:
    shard: InputShard
    mode: str  # "fresh" | "incremental"
    tasks: list[str]  # experts to compute for this shard
    previous: dict[str, Any] | None = None  # done-record being extended (incremental)
    input_identity: dict[str, Any] | None = None  # the input shard's size and mtime/etag (or digest)
    reason: str = "new"  # why the shard is labelled, for the log: new, damaged, input changed, …


@dataclass
class ShardResult:
    shard_id: str
    record: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_failures(self) -> bool:
        return bool(self.record.get("failed")) or bool(self.record.get("input_error"))


def plan_shards(
    shards: Iterable[InputShard],
    store: OutputStore,
    fingerprints: Mapping[str, str],
    identities: Mapping[str, dict[str, Any] | None] | None = None,
) -> tuple[list[ShardPlan], dict[str, dict[str, Any]]]:
    """(work to do, done-records of shards already done for every requested expert).

    ``identities`` maps a shard id to its input's identity now (``inputs.input_identities``); a
    done-record made from another input is relabelled from scratch.
    """
    shards = list(shards)
    identities = identities or {}
    committed, damaged = store.committed((shard.shard_id for shard in shards), save_index=True)
    plans: list[ShardPlan] = []
    done: dict[str, dict[str, Any]] = {}
    for shard in shards:
        identity = identities.get(shard.shard_id)
        record = committed.get(shard.shard_id)
        reason = _fresh_reason(record, identity, damaged.get(shard.shard_id))
        if reason is not None:
            plans.append(ShardPlan(shard, "fresh", list(fingerprints), None, identity, reason))
            continue
        assert record is not None
        have = {task: info.get("fingerprint") for task, info in record.get("experts", {}).items()}
        stale = [task for task, fp in fingerprints.items() if have.get(task) != fp]
        if stale:
            plans.append(ShardPlan(shard, "incremental", stale, record, identity, "experts changed"))
        else:
            done[shard.shard_id] = record
    for plan in plans:
        if plan.reason not in ("new", "experts changed"):
            logger.warning("shard %s is labelled again: %s", plan.shard.shard_id, plan.reason)
    return plans, done


def _fresh_reason(
    record: dict[str, Any] | None, identity: dict[str, Any] | None, damage: str | None
) -> str | None:
    """Why a shard needs a pass from its input (None: its done-record stands)."""
    if damage is not None:
        return f"the committed output is damaged ({damage})"
    if record is None:
        return "new"
    recorded = record.get("input_stat")
    if identity is not None and recorded is not None and recorded != identity:
        return f"its input changed since it was labelled ({recorded} → {identity})"
    return None


def run_shard(
    plan: ShardPlan, source: Source, store: OutputStore, labeler: Labeler, decode: DecodeConfig
) -> ShardResult:
    """Label one shard and commit it; nothing is visible as done unless every step succeeded."""
    started = time.monotonic()
    report = ShardReadReport()
    rows: list[dict[str, Any]] = []
    items = _work_items(plan, source, store, decode, report)
    try:
        members = _labelled_members(items, labeler, plan.tasks, rows, decode.max_bytes_in_flight)
        tar = store.write_shard(plan.shard.shard_id, members)
    except CarryOverMismatch as exc:
        logger.warning("shard %s: %s; labelling it again from its input", plan.shard.shard_id, exc)
        fresh = ShardPlan(
            plan.shard, "fresh", list(labeler.fingerprints), None, plan.input_identity, str(exc)
        )
        return run_shard(fresh, source, store, labeler, decode)
    records = store.write_records(plan.shard.shard_id, rows)
    record = _done_record(plan, rows, report, labeler, time.monotonic() - started)
    record.update(sha256=tar.sha256, bytes=tar.size, tar_stat=tar.stat or {}, records=records.as_record())
    store.write_done(plan.shard.shard_id, record)
    return ShardResult(plan.shard.shard_id, record, rows)


def _work_items(
    plan: ShardPlan, source: Source, store: OutputStore, decode: DecodeConfig, report: ShardReadReport
) -> Iterator[WorkItem]:
    if plan.mode == "fresh":
        return (item_from_sample(sample, decode) for sample in source.read(plan.shard, report))
    return _items_from_output(store, plan.shard.shard_id, decode, plan.previous or {})


def _items_from_output(
    store: OutputStore, shard_id: str, decode: DecodeConfig, expected: Mapping[str, Any]
) -> Iterator[WorkItem]:
    """The samples of a committed tar; its sha256 is checked while streaming, before anything commits."""
    with store.fs.open(store.shard_path(shard_id), "rb") as handle:
        reader = HashingReader(handle)
        try:
            for key, members in read_tar_samples(reader):
                yield item_from_output(key, members, decode)
        except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as exc:  # damaged tar or json
            raise CarryOverMismatch(f"the committed tar is unreadable ({type(exc).__name__}: {exc})") from exc
    if reader.sha256.hexdigest() != expected.get("sha256") or reader.size != expected.get("bytes"):
        raise CarryOverMismatch("the committed tar's sha256 differs from its done-record")


def _labelled_members(
    items: Iterator[WorkItem],
    labeler: Labeler,
    tasks: list[str],
    rows: list[dict[str, Any]],
    max_bytes_in_flight: int,
) -> Iterator[list[Member]]:
    """Label chunk by chunk (the next chunk is read and decoded in the background meanwhile).

    The decoded images in flight, read ahead or being labelled, are bounded in bytes by
    ``max_bytes_in_flight`` (``decode.max_bytes_in_flight``; see ``budget.PixelBudget``).
    """
    budget = PixelBudget(max_bytes_in_flight)
    chunks = chunked(items, labeler.chunk_size, budget)
    for chunk in read_ahead(chunks, PREFETCH_CHUNKS, on_stop=budget.close):
        held = sum(item.pixel_bytes for item in chunk)
        labeler.label(chunk, tasks)
        budget.release(held)  # labelling freed the chunk's arrays: the reader may decode more
        for item in chunk:
            members = item.to_members()
            rows.append(item.record())
            yield members


def _done_record(
    plan: ShardPlan, rows: list[dict[str, Any]], report: ShardReadReport, labeler: Labeler, duration: float
) -> dict[str, Any]:
    """Counts per status and per expert; the caller adds what the tar and records are."""
    statuses = Counter(row["status"] for row in rows)
    experts = dict((plan.previous or {}).get("experts", {}))
    for task in plan.tasks:
        outcomes: Counter[str] = Counter()
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
        "duration_s": round(duration, 3),
    }
    if plan.input_identity is not None:
        record["input_stat"] = plan.input_identity
    input_error = report.input_error or (plan.previous or {}).get("input_error")
    if input_error:
        record["input_error"] = input_error
    return record


def _expert_outcome(row: dict[str, Any], task: str) -> str:
    return json.loads(row["expert_status"]).get(task, "skipped")


def read_ahead(
    iterator: Iterator[Any], depth: int, on_stop: Callable[[], None] | None = None
) -> Iterator[Any]:
    """Run ``iterator`` in a background thread, ``depth`` items ahead; errors re-raise in the caller.

    ``on_stop`` runs when the consumer stops (done, failed or closed early), before the producer is
    waited for: it must wake a producer blocked on anything other than this queue (a byte budget).
    """
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
        if on_stop is not None:
            on_stop()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
