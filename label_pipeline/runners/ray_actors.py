"""What runs inside Ray: expert actors, the run monitor, and the shard task with its expert proxies.

* ``ExpertActor`` holds one frozen expert (one replica). It only runs ``expert(images, deps)``:
  decoding, label encoding and tar writing stay in the CPU shard task.
* ``label_shard`` is the CPU task: it runs the core's ``run_shard`` with a ``RayLabeler``, whose
  expert handles are ``ExpertProxy`` objects calling the actors. Each decoded chunk is put into the
  object store once and the same reference goes to every expert (no re-decode, no copy per expert).
* ``RunMonitor`` aggregates per-batch events (throughput, busy time, latency, queue depth, faults)
  for the live progress view and the stats file.

Faults: a batch whose actor died is resubmitted by Ray (``max_task_retries``) to the restarted
actor. The actor keeps a small crash ledger on its node's disk (the batch it is running); when it
restarts it learns which batch it died in, so a batch that failed only because it was queued behind
a killer is resubmitted, while a sample that killed the actor ``quarantine_after`` times is recorded
as an expert error in its json (the labeler's per-sample error path). CUDA OOM halves the batch.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from expert_zoo.base import Expert, ExpertSpec, Label
from label_pipeline.config import DecodeConfig
from label_pipeline.labeler import Labeler, WorkItem, drop_task
from label_pipeline.output import OutputStore
from label_pipeline.shard_job import ShardPlan, ShardResult, run_shard
from label_pipeline.sources.base import Source

logger = logging.getLogger(__name__)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
CONCURRENCY_GROUPS = {"control": 1}
MAX_INNOCENT_RESUBMITS = 20  # a batch that keeps dying behind other killers gives up the shard


class ExpertOOM(RuntimeError):
    """The expert ran out of accelerator memory on a batch (raised by the actor)."""


class ExpertCrashed(RuntimeError):
    """The expert's process died repeatedly while labelling this batch."""


class ShardInterrupted(BaseException):
    """The cluster, not the samples, failed (actors gone): abandon the shard instead of recording
    per-sample errors. A BaseException so the labeler's per-sample isolation lets it through."""


# -- the expert actor ------------------------------------------------------------------------------
class CrashLedger:
    """On-disk note of the batch an actor is running, read back by its next incarnation.

    Ray restarts a dead actor in a new process, normally on the same node; the new process finds the
    note of the batch its predecessor died in and counts it. On another node the note is absent:
    then it was the node that died, and no batch is blamed.
    """

    def __init__(self, actor_id: str) -> None:
        directory = os.path.join(tempfile.gettempdir(), "label-pipeline-actors")
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, actor_id)
        self.current_path, self.kills_path = f"{base}.current", f"{base}.kills.json"
        self.kills: dict[str, int] = self._load()
        if os.path.exists(self.current_path):
            with open(self.current_path) as handle:
                batch_id = handle.read().strip()
            if batch_id:
                self.kills[batch_id] = self.kills.get(batch_id, 0) + 1
                with open(self.kills_path, "w") as handle:
                    json.dump(self.kills, handle)
            os.remove(self.current_path)

    def _load(self) -> dict[str, int]:
        try:
            with open(self.kills_path) as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return {}

    def start(self, batch_id: str) -> None:
        with open(self.current_path, "w") as handle:
            handle.write(batch_id)

    def finish(self) -> None:
        os.remove(self.current_path)

    def remove(self) -> None:
        for path in (self.current_path, self.kills_path):
            if os.path.exists(path):
                os.remove(path)


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


class ExpertActor:
    """One replica of one expert. Built with ``ray.remote(...)`` options chosen by the planner.

    ``predict`` calls run one at a time, in order; the small ``control`` methods run beside them
    (see ``CONCURRENCY_GROUPS``) so the driver and proxies can ask questions of a busy actor.
    """

    def __init__(self, expert_cls: type[Expert], options: Mapping[str, Any], task: str) -> None:
        self.task = task
        self.ledger = CrashLedger(ray.get_runtime_context().get_actor_id())
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        # With a GPU assigned the expert picks CUDA when this process can see it, else falls back to
        # CPU; without one it must not grab a card Ray gave to another actor.
        device = "auto" if self.gpu_ids else "cpu"
        if not self.gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # nor may a library it uses (torch, onnxruntime)
        self.error: Exception | None = None
        try:
            self.expert: Expert | None = expert_cls(dict(options), device=device)
        except Exception as exc:  # noqa: BLE001 - reported to the driver by info()
            self.expert, self.error = None, exc

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        expert = self.expert
        return {
            "task": self.task,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(getattr(expert, "torch_device", None) or "cpu"),
            "spec": expert.spec,
            "fingerprint": expert.fingerprint(),
            "weights": expert.weights_digest,
        }

    @ray.method(concurrency_group="control")
    def kills(self, batch_id: str) -> int:
        """How many times this actor died while running ``batch_id``."""
        return self.ledger.kills.get(batch_id, 0)

    def predict(
        self,
        chunk: Sequence[np.ndarray],
        indices: Sequence[int],
        deps: Mapping[str, list[Label]],
        batch_id: str,
    ) -> tuple[list[Label], float]:
        # Arrays from the object store are read-only views; experts get private, writable copies.
        images = [np.array(chunk[i]) for i in indices]
        self.ledger.start(batch_id)
        started = time.perf_counter()
        try:
            labels = self.expert(images, deps)
        except Exception as exc:
            if _is_oom(exc):
                _free_accelerator_memory()
                raise ExpertOOM(f"{type(exc).__name__}: {exc}") from None
            raise
        finally:
            self.ledger.finish()
        return labels, time.perf_counter() - started

    def time_batches(self, sizes: Sequence[int], repeats: int = 2) -> dict[int, float | None]:
        """Seconds per image at each batch size on synthetic images (None: out of memory).

        One untimed warm-up batch first (lazy initialisation, autotuning); sizes run smallest first,
        and once one runs out of memory the bigger ones are not tried.
        """
        height, width = self.expert.spec.input_size or (480, 480)
        rng = np.random.default_rng(0)  # the same images on every replica and every run
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(max(sizes))]
        timings: dict[int, float | None] = {}
        for position, size in enumerate(sorted(sizes)):
            try:
                if position == 0:
                    self.expert(images[:size], {})
                started = time.perf_counter()
                for _ in range(repeats):
                    self.expert(images[:size], {})
                timings[size] = (time.perf_counter() - started) / (repeats * size)
            except Exception as exc:
                if not (_is_oom(exc) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))):
                    raise
                _free_accelerator_memory()
                timings.update({bigger: None for bigger in sizes if bigger >= size})
                break
        return timings

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        self.ledger.remove()


def _free_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the run monitor -------------------------------------------------------------------------------
@dataclass
class ExpertCounters:
    batches: int = 0
    images: int = 0
    busy_s: float = 0.0
    warm_batches: int = 0  # what calibration uses: every batch but each replica's first (warm-up)
    warm_images: int = 0
    warm_busy_s: float = 0.0
    warmed: set[int] = field(default_factory=set)
    failed_batches: int = 0
    oom_splits: int = 0
    crashes: int = 0
    quarantined: int = 0
    resubmitted: int = 0
    queued: dict[int, int] = field(default_factory=dict)  # replica → batches submitted, not finished
    busy_by_replica: dict[int, float] = field(default_factory=dict)
    compute_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    roundtrip_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))


class RunMonitor:
    """Collects fire-and-forget events from the proxies; the driver reads ``snapshot()``."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.reset(tasks)

    def reset(self, tasks: Sequence[str]) -> None:
        self.started = time.time()
        self.experts = {task: ExpertCounters() for task in tasks}
        self.cpu_images, self.cpu_s = 0, 0.0
        self.stop_requested = False

    def stop(self) -> None:
        """Ask every shard task to give up at its next chunk (Ctrl-C): they remove their temp files."""
        self.stop_requested = True

    def stopping(self) -> bool:
        return self.stop_requested

    def cpu(self, images: int, seconds: float) -> None:
        """CPU time the shard tasks spent on ``images`` (read, decode, encode, write)."""
        self.cpu_images += images
        self.cpu_s += seconds

    def submitted(self, task: str, replica: int) -> None:
        queued = self.experts[task].queued
        queued[replica] = queued.get(replica, 0) + 1

    def finished(
        self, task: str, replica: int, images: int, roundtrip_s: float, compute_s: float | None
    ) -> None:
        counters = self.experts[task]
        counters.queued[replica] = max(counters.queued.get(replica, 0) - 1, 0)
        if compute_s is None:
            counters.failed_batches += 1
            return
        counters.batches += 1
        counters.images += images
        counters.busy_s += compute_s
        if replica in counters.warmed:
            counters.warm_batches += 1
            counters.warm_images += images
            counters.warm_busy_s += compute_s
        counters.warmed.add(replica)
        counters.busy_by_replica[replica] = counters.busy_by_replica.get(replica, 0.0) + compute_s
        counters.compute_hist[bisect.bisect_left(LATENCY_BUCKETS_S, compute_s)] += 1
        counters.roundtrip_hist[bisect.bisect_left(LATENCY_BUCKETS_S, roundtrip_s)] += 1

    def event(self, task: str, kind: str) -> None:
        counters = self.experts[task]
        setattr(counters, kind, getattr(counters, kind) + 1)

    def snapshot(self) -> dict[str, Any]:
        experts = {}
        for task, c in self.experts.items():
            experts[task] = {
                "batches": c.batches,
                "images": c.images,
                "busy_s": round(c.busy_s, 3),
                "warm_batches": c.warm_batches,
                "warm_images": c.warm_images,
                "warm_busy_s": round(c.warm_busy_s, 6),
                "busy_by_replica": {str(r): round(s, 3) for r, s in sorted(c.busy_by_replica.items())},
                "queued": sum(c.queued.values()),
                "failed_batches": c.failed_batches,
                "oom_splits": c.oom_splits,
                "crashes": c.crashes,
                "quarantined": c.quarantined,
                "resubmitted": c.resubmitted,
                "latency_buckets_s": list(LATENCY_BUCKETS_S),
                "compute_latency_hist": list(c.compute_hist),
                "roundtrip_latency_hist": list(c.roundtrip_hist),
            }
        return {
            "elapsed_s": round(time.time() - self.started, 3),
            "experts": experts,
            "cpu": {"images": self.cpu_images, "seconds": round(self.cpu_s, 6)},
        }


# -- the proxy the labeler calls -------------------------------------------------------------------
class ChunkContext:
    """The chunk being labelled in this shard task: one object-store reference for all experts."""

    def __init__(self) -> None:
        self.ref: ray.ObjectRef | None = None
        self.index: dict[int, int] = {}

    def share(self, arrays: list[np.ndarray]) -> None:
        self.ref = ray.put(arrays) if arrays else None
        self.index = {id(array): position for position, array in enumerate(arrays)}

    def clear(self) -> None:
        self.ref, self.index = None, {}

    def locate(self, images: Sequence[np.ndarray]) -> tuple[ray.ObjectRef, list[int]]:
        """(reference, positions) for images of the current chunk; anything else is put on its own."""
        positions = [self.index.get(id(image)) for image in images]
        if self.ref is not None and None not in positions:
            return self.ref, positions
        return ray.put(list(images)), list(range(len(images)))


@dataclass
class FaultPolicy:
    quarantine_after: int = 2
    actor_start_timeout_s: float = 600.0


class ExpertProxy:
    """An ``ExpertHandle`` whose calls go to the replicas of one expert actor."""

    def __init__(
        self,
        spec: ExpertSpec,
        fingerprint: str,
        replicas: Sequence[Any],
        monitor: Any,
        policy: FaultPolicy,
        encode_override: Any = None,
    ) -> None:
        self.spec = spec
        self._fingerprint = fingerprint
        self.replicas = list(replicas)
        self.monitor = monitor
        self.policy = policy
        self._encode = encode_override  # an expert class's own encode, if it overrides the base one
        self._init_local_state()

    def _init_local_state(self) -> None:
        """Per-process state: not pickled, so every shard task starts with its own."""
        self.context = ChunkContext()
        self._lock = threading.Lock()
        self._outstanding = [0] * len(self.replicas)
        self._dead: set[int] = set()
        self._next = 0
        self.max_batch: int | None = None  # lowered after an out-of-memory batch

    def __getstate__(self) -> dict[str, Any]:
        keep = ("spec", "_fingerprint", "replicas", "monitor", "policy", "_encode")
        return {name: self.__dict__[name] for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local_state()

    # ExpertHandle -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, label: Label) -> dict[str, bytes]:
        # Encoding depends only on the spec (see Expert.encode), so it runs here, on the CPU task.
        return (self._encode or Expert.encode)(self, label)

    def __call__(self, images: Sequence[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        ref, positions = self.context.locate(images)
        return self._predict(ref, positions, {task: list(labels) for task, labels in deps.items()})

    # batching, OOM halving ----------------------------------------------------------------------
    def _predict(self, ref: Any, positions: list[int], deps: dict[str, list[Label]]) -> list[Label]:
        size = len(positions)
        if self.max_batch is not None and size > self.max_batch:
            step = self.max_batch
            return [
                label
                for start in range(0, size, step)
                for label in self._predict(ref, positions[start : start + step], _slice(deps, start, step))
            ]
        try:
            return self._call(ref, positions, deps)
        except ExpertOOM:
            if size == 1:
                raise
            half = size // 2
            self.max_batch = min(self.max_batch or size, half)
            self.monitor.event.remote(self.spec.task, "oom_splits")
            logger.warning("%s: out of memory on a batch of %d; retrying in halves", self.spec.task, size)
            return self._predict(ref, positions[:half], _slice(deps, 0, half)) + self._predict(
                ref, positions[half:], _slice(deps, half, size - half)
            )

    # one batch on one replica, with crash attribution ------------------------------------------
    def _call(self, ref: Any, positions: list[int], deps: dict[str, list[Label]]) -> list[Label]:
        batch_id = uuid.uuid4().hex
        for _ in range(MAX_INNOCENT_RESUBMITS + 1):
            replica = self._pick()
            actor = self.replicas[replica]
            self.monitor.submitted.remote(self.spec.task, replica)
            started = time.perf_counter()
            try:
                labels, compute_s = ray.get(actor.predict.remote(ref, positions, deps, batch_id))
            except RayTaskError as exc:  # the expert raised: hand its own exception to the labeler
                self._done(replica, len(positions), started, None)
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                if cause is None:
                    raise RuntimeError(str(exc)) from None
                raise cause from None
            except RayActorError:
                self._done(replica, len(positions), started, None)
                kills = self._kills(replica, batch_id)
                if kills is not None and kills >= self.policy.quarantine_after:
                    self.monitor.event.remote(self.spec.task, "crashes")
                    if len(positions) == 1:
                        self.monitor.event.remote(self.spec.task, "quarantined")
                    raise ExpertCrashed(
                        f"the {self.spec.task} expert's process died {kills} times while labelling this "
                        f"{'sample; quarantined' if len(positions) == 1 else 'batch'}"
                    ) from None
                self.monitor.event.remote(self.spec.task, "resubmitted")
                continue  # it died running someone else's batch (or the node died): run ours again
            except RayError as exc:  # e.g. the chunk's object was lost: not the samples' fault
                self._done(replica, len(positions), started, None)
                raise ShardInterrupted(f"{self.spec.task}: {type(exc).__name__}: {exc}") from None
            self._done(replica, len(positions), started, compute_s)
            return labels
        raise ShardInterrupted(f"{self.spec.task}: a batch was resubmitted {MAX_INNOCENT_RESUBMITS} times")

    def _pick(self) -> int:
        """The live replica with the fewest batches outstanding from this process."""
        with self._lock:
            live = [r for r in range(len(self.replicas)) if r not in self._dead]
            if not live:
                raise ShardInterrupted(f"every replica of the {self.spec.task} expert is gone")
            self._next += 1
            replica = min(live, key=lambda r: (self._outstanding[r], (r - self._next) % len(self.replicas)))
            self._outstanding[replica] += 1
            return replica

    def _done(self, replica: int, images: int, started: float, compute_s: float | None) -> None:
        with self._lock:
            self._outstanding[replica] -= 1
        roundtrip = time.perf_counter() - started
        self.monitor.finished.remote(self.spec.task, replica, images, roundtrip, compute_s)

    def _kills(self, replica: int, batch_id: str) -> int | None:
        """Ask the (restarted) replica how often ``batch_id`` killed it; None if it stays gone."""
        try:
            return ray.get(
                self.replicas[replica].kills.remote(batch_id), timeout=self.policy.actor_start_timeout_s
            )
        except (RayActorError, GetTimeoutError):
            logger.warning("%s replica %d is gone", self.spec.task, replica)
            with self._lock:
                self._dead.add(replica)
            return None


def _slice(deps: Mapping[str, list[Label]], start: int, count: int) -> dict[str, list[Label]]:
    return {task: labels[start : start + count] for task, labels in deps.items()}


# -- the labeler and the shard task ----------------------------------------------------------------
class RayLabeler(Labeler):
    """The core labeler, with one object-store copy per chunk and independent experts in parallel.

    Experts at the same dependency depth run concurrently (their batches go to different actors);
    a deeper expert starts once the labels it needs are in. Members are sorted when written, so the
    bytes do not depend on which expert finishes first.
    """

    def __init__(
        self, experts: Mapping[str, ExpertProxy], batch_size: int | None = None, monitor: Any = None
    ) -> None:
        super().__init__(experts, batch_size)
        self.chunk = ChunkContext()
        for proxy in self.experts.values():
            proxy.context = self.chunk
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="expert-call")
        self.monitor = monitor
        self._cpu_mark = time.process_time()

    def label(self, items: Sequence[WorkItem], tasks: Sequence[str] | None = None) -> None:
        if self.monitor is not None and ray.get(self.monitor.stopping.remote()):
            raise ShardInterrupted("the run was stopped")
        tasks = list(tasks or self.experts)
        self.chunk.share([item.image.array for item in items if item.image is not None])
        try:
            for level in dependency_levels(tasks, self.experts):
                for task in level:
                    for item in items:
                        drop_task(item, task)
                ready = [item for item in items if item.image is not None]
                batches = [
                    (task, ready[start : start + self.batch_sizes[task]])
                    for task in level
                    for start in range(0, len(ready), self.batch_sizes[task])
                ]
                for future in [self._pool.submit(self._run_batch, task, batch) for task, batch in batches]:
                    future.result()
        finally:
            self.chunk.clear()
        for item in items:
            self._finish(item)
        self._report_cpu(len(items))

    def _report_cpu(self, images: int) -> None:
        """This process's CPU time since the last chunk (all threads: read-ahead decode, encoding,
        tar writing): the planner's measure of the CPU stage."""
        now = time.process_time()
        if self.monitor is not None:
            self.monitor.cpu.remote(images, now - self._cpu_mark)
        self._cpu_mark = now

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def dependency_levels(tasks: Sequence[str], experts: Mapping[str, Any]) -> list[list[str]]:
    """``tasks`` grouped by dependency depth (within ``tasks``), keeping their order inside a level."""
    wanted = set(tasks)
    depth: dict[str, int] = {}

    def level_of(task: str) -> int:
        if task not in depth:
            requires = [d for d in experts[task].spec.requires if d in wanted]
            depth[task] = 1 + max((level_of(d) for d in requires), default=-1)
        return depth[task]

    levels: dict[int, list[str]] = {}
    for task in tasks:
        levels.setdefault(level_of(task), []).append(task)
    return [levels[key] for key in sorted(levels)]


@dataclass
class ShardContext:
    """What a shard task needs besides its plan and the source; replaced when replicas are added."""

    output: str
    decode: DecodeConfig
    proxies: dict[str, ExpertProxy]
    batch_size: int | None
    monitor: Any


def label_shard(plan: ShardPlan, source: Source, context: ShardContext) -> ShardResult:
    """The CPU task: one shard through the core's ``run_shard`` (commit included)."""
    labeler = RayLabeler(context.proxies, batch_size=context.batch_size, monitor=context.monitor)
    try:
        return run_shard(plan, source, OutputStore(context.output), labeler, context.decode)
    except ShardInterrupted as exc:
        raise RuntimeError(f"shard {plan.shard.shard_id} abandoned: {exc}") from None
    finally:
        labeler.close()


def spec_with_batch_size(spec: ExpertSpec, batch_size: int) -> ExpertSpec:
    return spec if spec.batch_size == batch_size else replace(spec, batch_size=batch_size)
