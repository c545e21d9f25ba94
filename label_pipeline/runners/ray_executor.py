"""What runs in a Ray shard task: the core's ``run_shard``, with a ``Labeler`` whose executor is the
expert actors.

``RayExecutor`` is an ``ExpertExecutor``: each chunk is put into the object store once and every
batch of every expert refers to it (no copy per expert); batches go to the replicas in proportion to
their speed, in parallel across experts. Before each chunk it asks the run's monitor whether to stop
and whether the replicas changed (the plan added or replaced some, a node left or joined): a shard
task always labels its next chunk with the replicas in service. Its own job is fault handling: a batch whose
actor died is resubmitted (Ray restarts the actor); the restarted actor's crash ledger tells whether
that batch killed it, and a batch that killed it ``quarantine_after`` times fails with
``ExpertCrashed``, which the labeler isolates down to the one sample (recorded in its json).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from expert_zoo.base import Expert, ExpertSpec, Label
from label_pipeline.config import DecodeConfig
from label_pipeline.labeler import Labeler, is_out_of_memory
from label_pipeline.output import OutputStore
from label_pipeline.shard_job import ShardPlan, ShardResult, run_shard
from label_pipeline.sources.base import Source

logger = logging.getLogger(__name__)
MAX_INNOCENT_RESUBMITS = 20  # a batch that keeps dying behind other killers gives up the shard


class ExpertCrashed(RuntimeError):
    """The expert's process died repeatedly while labelling this batch."""


class ShardInterrupted(BaseException):
    """The cluster, not the samples, failed (actors gone) or the run was stopped: abandon the shard
    instead of recording per-sample errors. A BaseException so the labeler lets it through."""


class ShardAbandoned(RuntimeError):
    """What a shard task raises for ``ShardInterrupted``: the driver runs the shard again without
    counting it as a failed attempt (its samples did nothing wrong)."""


@dataclass
class RemoteExpert:
    """One expert as a shard task sees it: what the labeler needs, and its replicas' actor handles."""

    cls: type[Expert]  # for its ``encode``
    spec: ExpertSpec
    fingerprint: str
    batch_size: int
    actors: list[Any]
    replica_ids: list[int] = field(default_factory=list)  # the run's ids of ``actors`` (for the monitor)
    speeds: list[float] = field(default_factory=list)  # relative speed of each (its share of a card)

    def __post_init__(self) -> None:
        self.replica_ids = self.replica_ids or list(range(len(self.actors)))
        self.speeds = self.speeds or [1.0] * len(self.actors)


@dataclass
class ShardContext:
    """What a shard task needs besides its plan and the source; replaced when replicas change (a
    running task gets the new replicas from the monitor, ``RunMonitor.poll``)."""

    output: str
    decode: DecodeConfig
    experts: dict[str, RemoteExpert]
    monitor: Any
    quarantine_after: int = 2
    actor_start_timeout_s: float = 600.0
    generation: int = 0  # of the replica sets in ``experts``


ReplicaSets = dict[str, tuple[list[Any], list[int], list[float]]]  # task → actors, ids, speeds


def replica_sets(experts: dict[str, RemoteExpert]) -> ReplicaSets:
    """What the monitor publishes to running shard tasks when the replicas change."""
    return {task: (e.actors, e.replica_ids, e.speeds) for task, e in experts.items()}


def label_shard(plan: ShardPlan, source: Source, context: ShardContext) -> ShardResult:
    """The CPU task: one shard through the core's ``run_shard`` (commit included)."""
    executor = RayExecutor(context, plan.shard.shard_id)
    try:
        return run_shard(plan, source, OutputStore(context.output), Labeler(executor), context.decode)
    except ShardInterrupted as exc:
        raise ShardAbandoned(f"shard {plan.shard.shard_id} abandoned: {exc}") from None
    finally:
        executor.close()


class ChunkContext:
    """The chunk being labelled in this shard task: one object-store reference for all experts."""

    def __init__(self) -> None:
        self.ref: ray.ObjectRef | None = None
        self.index: dict[int, int] = {}

    def share(self, arrays: Sequence[np.ndarray]) -> None:
        self.ref = ray.put(list(arrays)) if arrays else None
        self.index = {id(array): position for position, array in enumerate(arrays)}

    def clear(self) -> None:
        self.ref, self.index = None, {}

    def locate(self, images: Sequence[np.ndarray]) -> tuple[ray.ObjectRef, list[int]]:
        """(reference, positions) for images of the current chunk; anything else is put on its own."""
        positions = [self.index.get(id(image)) for image in images]
        if self.ref is not None and None not in positions:
            return self.ref, positions  # type: ignore[return-value]
        return ray.put(list(images)), list(range(len(images)))


@dataclass
class _Replicas:
    """This task's view of one expert's replicas (by replica id): handles, speeds, batches
    outstanding from this task, and those found gone."""

    actors: dict[int, Any]
    speeds: dict[int, float]
    outstanding: dict[int, int]
    dead: set[int] = field(default_factory=set)
    queued: dict[int, int] = field(default_factory=dict)  # every task's batches, as of this chunk
    rates: dict[int, float] = field(default_factory=dict)  # images/s each replica gives now

    def load(self, queues: dict[int, int], measured: dict[int, float]) -> None:
        """Queues and recent images/s from the monitor. A replica not measured yet is expected to
        match the measured ones per share of a card (or, with none measured, its share)."""
        self.queued = {r: queues.get(r, 0) for r in self.actors}
        known = [measured[r] / self.speeds[r] for r in self.actors if measured.get(r)]
        per_share = sorted(known)[len(known) // 2] if known else 1.0
        self.rates = {r: measured.get(r) or self.speeds[r] * per_share for r in self.actors}


class RayExecutor:
    """The labeler's executor in a shard task: expert calls go to the experts' actors."""

    def __init__(self, context: ShardContext, shard_id: str = "") -> None:
        self.context, self.monitor, self.shard_id = context, context.monitor, shard_id
        self.specs = {task: e.spec for task, e in context.experts.items()}
        self.fingerprints = {task: e.fingerprint for task, e in context.experts.items()}
        self.batch_sizes = {task: e.batch_size for task, e in context.experts.items()}
        # Expert.encode reads only self.spec: a stand-in with the spec lets it run here, on the CPU.
        self.encoders = {
            task: (e.cls.encode, cast(Expert, SimpleNamespace(spec=e.spec)))
            for task, e in context.experts.items()
        }
        self.replicas: dict[str, _Replicas] = {}
        self.generation = -1
        self._use(replica_sets(context.experts), context.generation)
        self.random = random.Random()
        self.shared = ChunkContext()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="expert-call")
        self.cpu_mark = time.process_time()

    def _use(self, sets: ReplicaSets, generation: int) -> None:
        """Label from now on with these replicas (between chunks: no batch is outstanding)."""
        for task, (actors, ids, speeds) in sets.items():
            old = self.replicas.get(task)
            self.replicas[task] = _Replicas(
                dict(zip(ids, actors)),
                dict(zip(ids, speeds)),
                dict.fromkeys(ids, 0),
                {i for i in ids if old is not None and i in old.dead},
            )
        self.generation = generation

    @contextlib.contextmanager
    def chunk(self, images: Sequence[np.ndarray]) -> Iterator[None]:
        poll = self.monitor.poll.remote(self.shard_id, self.generation)
        stopping, generation, sets, loads = ray.get(poll)
        if stopping:
            raise ShardInterrupted("the run was stopped")
        if sets is not None:
            self._use(sets, generation)
        with self.lock:
            for task, state in self.replicas.items():
                state.load(*loads.get(task, ({}, {})))
        self.shared.share(images)
        try:
            yield
        finally:
            self.shared.clear()
        # This process's CPU time for the chunk (all threads: read-ahead decode, encoding, tar
        # writing): the planner's measure of the CPU stage.
        now = time.process_time()
        self.monitor.add.remote(None, images=len(images), seconds=now - self.cpu_mark)
        self.cpu_mark = now

    def submit(
        self, task: str, images: list[np.ndarray], deps: dict[str, list[Label]]
    ) -> Future[list[Label]]:
        ref, positions = self.shared.locate(images)
        return self.pool.submit(self._call, task, ref, positions, deps)

    def encode(self, task: str, label: Label) -> dict[str, bytes]:
        encode, owner = self.encoders[task]
        return encode(owner, label)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # one batch on one replica, with crash attribution ------------------------------------------
    def _call(self, task: str, ref: Any, positions: list[int], deps: dict[str, list[Label]]) -> list[Label]:
        batch_id, size = uuid.uuid4().hex, len(positions)
        for _ in range(MAX_INNOCENT_RESUBMITS + 1):
            replica = self._pick(task)
            actor = self.replicas[task].actors[replica]
            self.monitor.sent.remote(task, replica)
            started = time.perf_counter()
            try:
                labels, compute_s = ray.get(actor.predict.remote(ref, positions, deps, batch_id))
            except RayTaskError as exc:  # the expert raised: hand its own exception to the labeler
                self._done(task, replica, size, started, None)
                cause = exc.cause if isinstance(exc.cause, Exception) else RuntimeError(str(exc))
                if size > 1 and is_out_of_memory(cause):
                    self.monitor.add.remote(task, oom_splits=1)  # the labeler splits the batch
                raise cause from None
            except RayActorError:
                self._done(task, replica, size, started, None)
                kills = self._kills(task, replica, batch_id)
                if kills is None or kills < self.context.quarantine_after:
                    self.monitor.add.remote(task, resubmitted=1)
                    continue  # it died running someone else's batch (or the node died): run ours again
                self.monitor.add.remote(task, crashes=1, quarantined=int(size == 1))
                what = "sample; quarantined" if size == 1 else "batch"
                raise ExpertCrashed(
                    f"the {task} expert's process died {kills} times while labelling this {what}"
                ) from None
            except RayError as exc:  # e.g. the chunk's object was lost: not the samples' fault
                self._done(task, replica, size, started, None)
                raise ShardInterrupted(f"{task}: {type(exc).__name__}: {exc}") from None
            self._done(task, replica, size, started, compute_s)
            return labels
        raise ShardInterrupted(f"{task}: a batch was resubmitted {MAX_INNOCENT_RESUBMITS} times")

    def _pick(self, task: str) -> int:
        """A live replica (its id): of two drawn in proportion to their speed, the one whose queue
        would empty first. Speeds are the images/s replicas give now (a replica alone on its card
        runs faster than its share says, one beside busy ones slower); queues are every shard task's
        batches as of this chunk (from the monitor) plus this task's own since: a little stale, which
        is why two random candidates are compared rather than every task picking the same one."""
        state = self.replicas[task]
        with self.lock:
            live = [r for r in state.actors if r not in state.dead]
            if not live:
                raise ShardInterrupted(f"every replica of the {task} expert is gone")
            rates = {r: state.rates.get(r) or state.speeds[r] for r in live}
            candidates = set(self.random.choices(live, [rates[r] for r in live], k=2))
            replica = min(
                candidates, key=lambda r: (state.queued.get(r, 0) + state.outstanding[r] + 1) / rates[r]
            )
            state.outstanding[replica] += 1
            return replica

    def _done(self, task: str, replica: int, images: int, started: float, compute_s: float | None) -> None:
        with self.lock:
            outstanding = self.replicas[task].outstanding
            outstanding[replica] = outstanding.get(replica, 1) - 1
        roundtrip = time.perf_counter() - started
        self.monitor.finished.remote(task, replica, images, roundtrip, compute_s)

    def _kills(self, task: str, replica: int, batch_id: str) -> int | None:
        """Ask the (restarted) replica how often ``batch_id`` killed it; None if it stays gone."""
        actor = self.replicas[task].actors[replica]
        try:
            return ray.get(actor.kills.remote(batch_id), timeout=self.context.actor_start_timeout_s)
        except (RayActorError, GetTimeoutError):
            logger.warning("%s replica %d is gone", task, replica)
            with self.lock:
                self.replicas[task].dead.add(replica)
            return None
