"""The CPU stage around the experts: decode ahead, label, encode, in threads joined by bounded queues.

A run's shards flow through one pipeline, so the experts never wait for the CPU work while it keeps
up, not even between shards:

* the reader thread reads each shard's samples in order and hands their images to a pool of
  decoders, ahead of the experts, within the byte budget (``budget.PixelBudget``);
* the labelling thread runs the one labelling loop (``Labeler.label``) over each decoded chunk and
  hands the labels to a pool of PNG encoders;
* the consumer (``shard_job``: the tar writer and the commits, on the caller's thread) receives
  each shard's chunks in order and waits for each sample's encodings as it writes it.

PIL's decoders and encoders (zlib) release the GIL, so threads run them in parallel; a process
pool would have to pickle every image and label map across (``bench/throughput.py --pools``
measures both). Only where chunks end depends on timing, and that never changes a byte written.

The stage speaks in events, per job (one pass over one shard): ``Start(job)``, the job's chunks
(lists of ``WorkItem``), then exactly one of ``End(job)`` or ``Abort(job, error)``. A job that
fails (its input cannot be read, an expert call raises outside the per-sample isolation) ends with
``Abort`` and the next job goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from label_pipeline.budget import PixelBudget
from label_pipeline.labeler import Labeler, WorkItem, chunked

logger = logging.getLogger(__name__)
# Events (decoded chunks, and the starts and ends of shards) waiting for the experts: enough for
# the reader to start on the next shard while the experts finish this one. The byte budget, which
# counts their pixels, bounds their memory.
DECODED_EVENTS = 8
# Labelled chunks waiting for the writer: enough to keep the experts busy through a shard's commit
# (fsyncs, Parquet); the byte budget, which counts their label maps, bounds their memory.
LABELLED_CHUNKS = 16
CPU_WORKERS = max(1, min(4, os.cpu_count() or 1))  # decoder threads, and as many PNG encoder threads
DECODES_AHEAD = 2 * CPU_WORKERS  # images being decoded, or decoded and not yet in a chunk
DeferredItem = Callable[[], WorkItem]  # a work item whose image is still to be decoded


class Job(Protocol):
    """One pass over one shard, as the stage sees it."""

    @property
    def tasks(self) -> list[str]:
        """The experts to run."""
        ...

    def items(self) -> Iterable[WorkItem | DeferredItem]:
        """The samples, in order (read lazily, in the reader thread)."""
        ...

    def replacement(self, error: Exception) -> Job | None:
        """The job to run instead after reading failed with ``error`` (None: the job just fails)."""
        ...


@dataclass
class Start:
    job: Any


@dataclass
class End:
    job: Any


@dataclass
class Abort:
    job: Any
    error: BaseException


Event: TypeAlias = Start | End | Abort | list[WorkItem]


class CpuStage:
    """The pools and the byte budget of one pipeline; ``events`` runs jobs through it.

    Use it as a context manager: leaving it stops every thread and pool (a consumer that stops early
    must close the ``events`` iterator first, which ``contextlib.closing`` does).
    """

    def __init__(self, labeler: Labeler, max_bytes_in_flight: int) -> None:
        self.labeler = labeler
        self.budget = PixelBudget(max_bytes_in_flight)
        self.decoders = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="decode")
        self.encoders = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="encode")

    def __enter__(self) -> CpuStage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.budget.close()  # wakes a reader waiting for room, should one still be running
        self.encoders.shutdown(wait=True, cancel_futures=True)
        self.decoders.shutdown(wait=True, cancel_futures=True)

    def events(self, jobs: Iterable[Job]) -> Generator[Event, None, None]:
        """The labelled events of ``jobs``, in order (module docstring); samples' encodings may still
        be running: ``WorkItem.to_members`` waits for them, and the consumer must then ``release``
        each item's ``pending_bytes``, or ``discard`` the items it does not write."""
        decoded = read_ahead(self._read(jobs), DECODED_EVENTS, on_stop=self.budget.close)
        return read_ahead(self._label(decoded), LABELLED_CHUNKS, self.budget.close, "labelling")

    def release(self, nbytes: int) -> None:
        self.budget.release(nbytes)

    def discard(self, items: Sequence[WorkItem]) -> None:
        """Give back the budget of labelled items that will not be written (their job failed)."""
        self.budget.release(sum(item.pending_bytes for item in items))
        for item in items:
            item.pending_bytes = 0

    # -- the reader thread ---------------------------------------------------------------------
    def _read(self, jobs: Iterable[Job]) -> Generator[Event, None, None]:
        for first in jobs:
            job: Job | None = first
            while job is not None:
                yield Start(job)
                try:
                    yield from self._chunks(job)
                except Exception as exc:  # noqa: BLE001 - this job fails (or is replaced); the next goes on
                    yield Abort(job, exc)
                    job = job.replacement(exc)
                    continue
                yield End(job)
                job = None

    def _chunks(self, job: Job) -> Generator[list[WorkItem], None, None]:
        items = decode_ahead(job.items(), self.decoders, self.budget, DECODES_AHEAD)
        with contextlib.closing(chunked(items, self.labeler.chunk_size, self.budget)) as chunks:
            yield from chunks

    # -- the labelling thread ------------------------------------------------------------------
    def _label(self, events: Generator[Event, None, None]) -> Generator[Event, None, None]:
        """Label each chunk; its label maps take the place of its pixels in the budget until they
        are encoded. A job whose labelling raises is aborted and its remaining chunks dropped."""
        job: Any = None
        failed = False
        with contextlib.closing(events):
            for event in events:
                if isinstance(event, Start):
                    job, failed = event.job, False
                elif isinstance(event, list):
                    if failed:  # dropped with its job: its images are freed
                        self.budget.release(sum(item.pixel_bytes for item in event))
                        continue
                    error = self._label_chunk(event, job.tasks)
                    if error is not None:
                        failed = True
                        yield Abort(job, error)
                        continue
                elif failed:  # the end of a job already reported as aborted
                    continue
                yield event

    def _label_chunk(self, chunk: list[WorkItem], tasks: list[str]) -> Exception | None:
        pixels = sum(item.pixel_bytes for item in chunk)
        try:
            self.labeler.label(chunk, tasks, self.encoders)
        except Exception as exc:  # noqa: BLE001 - fails this job only, as a runner expects of a shard
            return exc
        else:
            self.budget.hold(sum(item.pending_bytes for item in chunk))
            return None
        finally:
            self.budget.release(pixels)  # the chunk's images are freed (or dropped with the job)


def decode_ahead(
    items: Iterable[WorkItem | DeferredItem], pool: Executor, budget: PixelBudget, depth: int
) -> Generator[WorkItem, None, None]:
    """The items in order, each deferred one decoded in ``pool``, up to ``depth`` ahead of the caller.

    An image starts decoding only while ``budget`` has room for it besides the images already
    pending (``PixelBudget.has_room``); the one the caller waits for always starts, since the caller
    (``chunked``) has waited for room before asking. The caller takes each item's bytes on receipt.
    """
    stream = iter(items)
    pending: deque[Future[WorkItem]] = deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < depth and (not pending or budget.has_room(len(pending))):
                item = next(stream, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, WorkItem):
                    pending.append(_finished(item))
                else:
                    pending.append(pool.submit(item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:  # the consumer stopped (or failed): drop decodes not yet started
            future.cancel()
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _finished(item: WorkItem) -> Future[WorkItem]:
    future: Future[WorkItem] = Future()
    future.set_result(item)
    return future


def read_ahead(
    iterator: Iterator[Any], depth: int, on_stop: Callable[[], None] | None = None, name: str = "read-ahead"
) -> Generator[Any, None, None]:
    """Run ``iterator`` in a background thread, ``depth`` items ahead; errors re-raise in the caller.

    ``on_stop`` runs when the consumer stops (done, failed or closed early), before the producer is
    waited for: it must wake a producer blocked on anything other than this queue (a byte budget).
    The producer closes ``iterator`` when it stops, so stages chained this way stop one after another.
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
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
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
