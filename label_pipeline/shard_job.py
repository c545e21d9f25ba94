"""One shard, start to commit: the unit of work every runner schedules.

``plan_shards`` decides, from the done-records, which shards are finished, which need a fresh pass
from the input and which only need some experts added or replaced (incremental relabelling). A
done-record counts only while the tar and records it vouches for are unchanged on disk and its input
shard is the one it was made from. ``run_shard`` does one shard and commits it (tar, records,
done-record last); ``run_shards`` does a sequence of shards the same way, one after another, through
one CPU pipeline (``cpu_stage``): the next shards are read, decoded and labelled while the caller's
thread writes and commits the current one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from label_pipeline.config import DecodeConfig
from label_pipeline.core.tario import HashingReader, Member, read_tar_samples
from label_pipeline.cpu_stage import (
    Abort,
    CpuStage,
    DeferredItem,
    End,
    Event,
    Start,
    read_ahead,  # noqa: F401 - re-exported: callers import it from here
)
from label_pipeline.done_index import DoneEntry, entry_of
from label_pipeline.labeler import Labeler, WorkItem, item_from_output, item_from_sample
from label_pipeline.output import FORMAT_VERSION, Listing, OutputStore
from label_pipeline.sources.base import InputShard, ShardReadReport, Source

logger = logging.getLogger(__name__)


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
    """A committed shard as the run keeps it: its done-record (per-shard counters), never its rows,
    which are in the shard's Parquet records (a run's memory stays flat in its samples)."""

    shard_id: str
    record: dict[str, Any]

    @property
    def has_failures(self) -> bool:
        return bool(self.record.get("failed")) or bool(self.record.get("input_error"))


def plan_shards(
    shards: Iterable[InputShard],
    store: OutputStore,
    fingerprints: Mapping[str, str],
    identities: Mapping[str, dict[str, Any] | None] | None = None,
    listing: Listing | None = None,
) -> tuple[list[ShardPlan], dict[str, DoneEntry]]:
    """(work to do, what the done-record says of each shard already done for every requested expert).

    ``identities`` maps a shard id to its input's identity now (``inputs.input_identities``); a
    done-record made from another input is relabelled from scratch. Costs what
    ``OutputStore.committed_entries`` costs (``listing``: the one ``OutputStore.prepare`` returned),
    plus one read per incrementally relabelled shard.
    """
    shards = list(shards)
    identities = identities or {}
    ids = (shard.shard_id for shard in shards)
    committed, damaged = store.committed_entries(ids, save_index=True, listing=listing)
    stale_tasks = _stale_tasks(fingerprints)
    plans: list[ShardPlan] = []
    done: dict[str, DoneEntry] = {}
    for shard in shards:
        identity = identities.get(shard.shard_id)
        entry = committed.get(shard.shard_id)
        reason = _fresh_reason(entry, identity, damaged.get(shard.shard_id))
        if reason is None and entry is not None:
            stale = stale_tasks(entry.fingerprints)
            if not stale:
                done[shard.shard_id] = entry
                continue
            previous = store.read_json(store.done_path(shard.shard_id))  # extended: read it whole
            if entry_of(shard.shard_id, previous) == entry:
                plans.append(ShardPlan(shard, "incremental", stale, previous, identity, "experts changed"))
                continue
            reason = "its done-record changed while planning"
        plans.append(ShardPlan(shard, "fresh", list(fingerprints), None, identity, reason or "new"))
    for plan in plans:
        if plan.reason not in ("new", "experts changed"):
            logger.warning("shard %s is labelled again: %s", plan.shard.shard_id, plan.reason)
    return plans, done


def _stale_tasks(fingerprints: Mapping[str, str]) -> Callable[[dict[str, Any]], list[str]]:
    """The requested tasks whose fingerprint differs from a done-record's, computed once per distinct
    fingerprint map (done-records of one run share one map in the index)."""
    known: dict[int, list[str]] = {}  # id of a map → its stale tasks; the maps outlive the planning

    def stale(have: dict[str, Any]) -> list[str]:
        tasks = known.get(id(have))
        if tasks is None:
            tasks = known[id(have)] = [task for task, fp in fingerprints.items() if have.get(task) != fp]
        return list(tasks) if tasks else tasks

    return stale


def _fresh_reason(entry: DoneEntry | None, identity: dict[str, Any] | None, damage: str | None) -> str | None:
    """Why a shard needs a pass from its input (None: its done-record stands)."""
    if damage is not None:
        return f"the committed output is damaged ({damage})"
    if entry is None:
        return "new"
    recorded = entry.input_stat
    if identity is not None and recorded is not None and recorded != identity:
        return f"its input changed since it was labelled ({recorded} → {identity})"
    return None


def run_shard(
    plan: ShardPlan, source: Source, store: OutputStore, labeler: Labeler, decode: DecodeConfig
) -> ShardResult:
    """Label one shard and commit it; nothing is visible as done unless every step succeeded."""
    for _, outcome in run_shards([plan], source, store, labeler, decode):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    raise AssertionError("run_shards yields one outcome per plan")


def run_shards(
    plans: Sequence[ShardPlan], source: Source, store: OutputStore, labeler: Labeler, decode: DecodeConfig
) -> Generator[tuple[ShardPlan, ShardResult | Exception], None, None]:
    """Label and commit ``plans`` in order; yields each plan with its result, or the error that
    failed it (the shards after it still run).

    The tar is written and committed on the caller's thread (tar, records, done-record last), so an
    interrupt there abandons the shard being written and removes its temp tar; the CPU stage runs
    ahead in its own threads (``cpu_stage``), stopped when this generator is closed.
    """
    _warm_up_records()
    # Made as the reader reaches them, so a committed shard's job (and its rows) is freed at once.
    jobs = (_ShardJob(plan, plan, source, store, decode, list(labeler.fingerprints)) for plan in plans)
    with CpuStage(labeler, decode.max_bytes_in_flight) as stage:
        with contextlib.closing(stage.events(jobs)) as events:
            for event in events:
                if not isinstance(event, Start):
                    raise AssertionError(f"a shard's events begin with Start, got {event!r}")
                job: _ShardJob = event.job
                try:
                    result = _write_and_commit(job, events, stage, store, labeler)
                except CarryOverMismatch as exc:  # the reader labels the shard again from its input
                    logger.warning("shard %s: %s; labelling it again from its input", job.shard_id, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - this shard fails; the caller records it
                    _skip_job(job, events, stage)
                    yield job.original, exc
                    continue
                yield job.original, result


def _warm_up_records() -> None:
    """pyarrow imports pandas on its first conversion of Python values (0.5-3 s on a busy machine):
    pay that before the pipeline starts, not inside the first commit, where it would stall the
    writer while the labeller runs ahead (as one thread, the old loop paid it in line)."""
    pa.array([""], pa.string())


@dataclass
class _ShardJob:
    """One pass over a shard (``cpu_stage.Job``): where its samples come from, what they became."""

    plan: ShardPlan
    original: ShardPlan  # the plan the caller gave (this pass may replace a failed incremental one)
    source: Source
    store: OutputStore
    decode: DecodeConfig
    all_tasks: list[str]  # every expert of the run: a fresh pass computes them all
    report: ShardReadReport = field(default_factory=ShardReadReport)
    rows: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: bool = False  # its End or Abort event has been received

    @property
    def shard_id(self) -> str:
        return self.plan.shard.shard_id

    @property
    def tasks(self) -> list[str]:
        return self.plan.tasks

    def items(self) -> Iterable[WorkItem | DeferredItem]:
        self.started = time.monotonic()
        return _work_items(self.plan, self.source, self.store, self.decode, self.report)

    def replacement(self, error: Exception) -> _ShardJob | None:
        """A committed tar that is not what its done-record says: label the shard from its input."""
        if not isinstance(error, CarryOverMismatch):
            return None
        plan = self.plan
        fresh = ShardPlan(plan.shard, "fresh", list(self.all_tasks), None, plan.input_identity, str(error))
        return _ShardJob(fresh, self.original, self.source, self.store, self.decode, self.all_tasks)


def _write_and_commit(
    job: _ShardJob, events: Iterator[Event], stage: CpuStage, store: OutputStore, labeler: Labeler
) -> ShardResult:
    """The shard's tar from its events, then its records, then its done-record (the commit order)."""
    tar = store.write_shard(job.shard_id, _members(job, events, stage))
    records = store.write_records(job.shard_id, job.rows)
    record = _done_record(job.plan, job.rows, job.report, labeler, time.monotonic() - job.started)
    record.update(sha256=tar.sha256, bytes=tar.size, tar_stat=tar.stat or {}, records=records.as_record())
    store.write_done(job.shard_id, record)
    return ShardResult(job.shard_id, record)


def _members(job: _ShardJob, events: Iterator[Event], stage: CpuStage) -> Iterator[list[Member]]:
    """Each sample's members, in order, until the job's end; an aborted job raises its error."""
    for event in events:
        if isinstance(event, list):
            yield from _chunk_members(event, stage, job.rows)
            continue
        job.ended = True
        if isinstance(event, Abort):
            raise event.error
        if isinstance(event, End):
            return
        raise AssertionError(f"shard {job.shard_id}: {event!r} before the end of the shard")
    raise AssertionError(f"shard {job.shard_id}: the CPU stage ended mid-shard")


def _chunk_members(
    chunk: list[WorkItem], stage: CpuStage, rows: list[dict[str, Any]]
) -> Iterator[list[Member]]:
    """Each sample's members once its labels are encoded; its record goes to ``rows``."""
    written = 0
    try:
        for item in chunk:
            encoded = item.pending_bytes
            members = item.to_members()
            stage.release(encoded)  # its label maps are encoded: the reader may decode more
            written += 1
            rows.append(item.record())
            yield members
    finally:
        stage.discard(chunk[written:])  # the shard failed or stopped: these will not be written


def _skip_job(job: _ShardJob, events: Iterator[Event], stage: CpuStage) -> None:
    """Drop the rest of a failed job's events (what was labelled is not written)."""
    while not job.ended:
        event = next(events)
        if isinstance(event, list):
            stage.discard(event)
        else:
            job.ended = True


def _work_items(
    plan: ShardPlan, source: Source, store: OutputStore, decode: DecodeConfig, report: ShardReadReport
) -> Iterator[DeferredItem]:
    """The shard's samples, in order, each a decode still to run (``cpu_stage.decode_ahead`` runs it)."""
    if plan.mode == "fresh":
        samples = source.read(plan.shard, report)
        return (functools.partial(item_from_sample, sample, decode) for sample in samples)
    return _items_from_output(store, plan.shard.shard_id, decode, plan.previous or {})


def _items_from_output(
    store: OutputStore, shard_id: str, decode: DecodeConfig, expected: Mapping[str, Any]
) -> Iterator[DeferredItem]:
    """The samples of a committed tar; its sha256 is checked while streaming, before anything commits."""
    with store.fs.open(store.shard_path(shard_id), "rb") as handle:
        reader = HashingReader(handle)
        try:
            for key, members in read_tar_samples(reader):
                yield functools.partial(item_from_output, key, members, decode)
        except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as exc:  # damaged tar or json
            raise CarryOverMismatch(f"the committed tar is unreadable ({type(exc).__name__}: {exc})") from exc
    if reader.sha256.hexdigest() != expected.get("sha256") or reader.size != expected.get("bytes"):
        raise CarryOverMismatch("the committed tar's sha256 differs from its done-record")


@dataclass
class _ItemsJob:
    """A job over given items (``_labelled_members``)."""

    given: Iterable[WorkItem | DeferredItem]
    tasks: list[str]

    def items(self) -> Iterable[WorkItem | DeferredItem]:
        return self.given

    def replacement(self, error: Exception) -> None:
        return None


def _labelled_members(
    items: Iterable[WorkItem | DeferredItem],
    labeler: Labeler,
    tasks: list[str],
    rows: list[dict[str, Any]],
    max_bytes_in_flight: int,
) -> Iterator[list[Member]]:
    """The members of ``items`` labelled through the CPU stage, in order, with ``rows`` getting each
    sample's record as it is yielded: one shard's pipeline without a tar or a commit."""
    with CpuStage(labeler, max_bytes_in_flight) as stage:
        with contextlib.closing(stage.events([_ItemsJob(items, tasks)])) as events:
            for event in events:
                if isinstance(event, Abort):
                    raise event.error
                if isinstance(event, list):
                    yield from _chunk_members(event, stage, rows)


def _done_record(
    plan: ShardPlan, rows: list[dict[str, Any]], report: ShardReadReport, labeler: Labeler, duration: float
) -> dict[str, Any]:
    """Counts per status and per expert; the caller adds what the tar and records are."""
    statuses = Counter(row["status"] for row in rows)
    experts = dict((plan.previous or {}).get("experts", {}))
    expert_statuses = [json.loads(row["expert_status"]) for row in rows]  # parsed once, not per task
    for task in plan.tasks:
        outcomes = Counter(status.get(task, "skipped") for status in expert_statuses)
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
    record["format_version"] = FORMAT_VERSION  # of this pass (members carried over keep their bytes)
    input_error = report.input_error or (plan.previous or {}).get("input_error")
    if input_error:
        record["input_error"] = input_error
    return record
