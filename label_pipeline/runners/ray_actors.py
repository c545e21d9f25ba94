"""What runs inside Ray actors: one expert replica (``ExpertActor``) and the run's ``RunMonitor``.

An expert actor only runs ``expert(images, deps)`` on batches it is sent (the labeler, in the shard
task, decides what is sent: see ``ray_executor``). It keeps a small crash ledger on its node's disk
(the batch it is running), so that after Ray restarts it, it can tell which batch killed it.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from expert_zoo.base import Expert, Label
from label_pipeline.labeler import is_out_of_memory

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
CONCURRENCY_GROUPS = {"control": 1}


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
        try:
            with open(self.kills_path) as handle:
                self.kills: dict[str, int] = json.load(handle)
        except (FileNotFoundError, ValueError):
            self.kills = {}
        if os.path.exists(self.current_path):
            with open(self.current_path) as handle:
                batch_id = handle.read().strip()
            if batch_id:
                self.kills[batch_id] = self.kills.get(batch_id, 0) + 1
                with open(self.kills_path, "w") as handle:
                    json.dump(self.kills, handle)
            os.remove(self.current_path)

    def start(self, batch_id: str) -> None:
        with open(self.current_path, "w") as handle:
            handle.write(batch_id)

    def finish(self) -> None:
        os.remove(self.current_path)

    def remove(self) -> None:
        for path in (self.current_path, self.kills_path):
            if os.path.exists(path):
                os.remove(path)


class ExpertActor:
    """One replica of one expert. Built with ``ray.remote(...)`` options chosen by the planner; an
    actor without a GPU is started with ``CUDA_VISIBLE_DEVICES=""`` (its ``runtime_env``), so neither
    the expert nor a library it uses can take a card Ray gave to another actor.

    ``predict`` calls run one at a time, in order; the small ``control`` methods run beside them
    (see ``CONCURRENCY_GROUPS``) so the driver and the shard tasks can ask questions of a busy actor.
    """

    def __init__(self, expert_cls: type[Expert], options: Mapping[str, Any], task: str) -> None:
        self.task = task
        self.ledger = CrashLedger(ray.get_runtime_context().get_actor_id())
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        # With a GPU assigned the expert picks CUDA when this process can see it, else falls back to CPU.
        device = "auto" if self.gpu_ids else "cpu"
        self.error: Exception | None = None
        try:
            self.expert: Expert = expert_cls(dict(options), device=device)
        except Exception as exc:  # noqa: BLE001 - reported to the driver by info()
            self.error = exc

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {
            "task": self.task,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.expert.torch_device or "cpu"),
            "spec": self.expert.spec,
            "fingerprint": self.expert.fingerprint(),
            "weights": self.expert.weights_digest,
            "batch_size": self.expert.batch_size,
        }

    @ray.method(concurrency_group="control")
    def kills(self, batch_id: str) -> int:
        """How many times this actor died while running ``batch_id``."""
        return self.ledger.kills.get(batch_id, 0)

    def use_batch_size(self, size: int | None) -> None:
        """The expert's forward batch from now on (None: the expert's own default for its device).

        Set through the ``batch_size`` option, which is what ``Expert.batch_size`` reads and what the
        fingerprint leaves out.
        """
        if size is None:
            self.expert.config.pop("batch_size", None)
        else:
            self.expert.config["batch_size"] = size

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
            if is_out_of_memory(exc):
                _free_accelerator_memory()  # for the other actors sharing the card
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
        before = self.expert.config.get("batch_size")
        try:
            for position, size in enumerate(sorted(sizes)):
                self.use_batch_size(size)
                try:
                    if position == 0:
                        self.expert(images[:size], {})
                    started = time.perf_counter()
                    for _ in range(repeats):
                        self.expert(images[:size], {})
                    timings[size] = (time.perf_counter() - started) / (repeats * size)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    _free_accelerator_memory()
                    timings.update({bigger: None for bigger in sizes if bigger >= size})
                    break
        finally:
            self.use_batch_size(before)
        return timings

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        self.ledger.remove()


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class ExpertCounters:
    batches: int = 0
    images: int = 0
    busy_s: float = 0.0
    warm_batches: int = 0  # what calibration uses: every batch but each replica's first (warm-up)
    warm_images: int = 0
    warm_busy_s: float = 0.0
    failed_batches: int = 0
    oom_splits: int = 0
    crashes: int = 0
    quarantined: int = 0
    resubmitted: int = 0
    queued: dict[int, int] = field(default_factory=dict)  # replica → batches submitted, not finished
    busy_by_replica: dict[int, float] = field(default_factory=dict)
    compute_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    roundtrip_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.images,
            "busy_s": round(self.busy_s, 3),
            "warm_batches": self.warm_batches,
            "warm_images": self.warm_images,
            "warm_busy_s": round(self.warm_busy_s, 6),
            "busy_by_replica": {str(r): round(s, 3) for r, s in sorted(self.busy_by_replica.items())},
            "queued": sum(self.queued.values()),
            "failed_batches": self.failed_batches,
            "oom_splits": self.oom_splits,
            "crashes": self.crashes,
            "quarantined": self.quarantined,
            "resubmitted": self.resubmitted,
            "latency_buckets_s": list(LATENCY_BUCKETS_S),
            "compute_latency_hist": list(self.compute_hist),
            "roundtrip_latency_hist": list(self.roundtrip_hist),
        }


class RunMonitor:
    """Collects fire-and-forget events from the shard tasks' executors; the driver reads ``snapshot()``
    and sets the stop flag every shard task checks before each chunk (Ctrl-C)."""

    def __init__(self) -> None:
        self.reset([])

    def reset(self, tasks: Sequence[str]) -> None:
        self.started = time.time()
        self.experts = {task: ExpertCounters() for task in tasks}
        self.cpu_images, self.cpu_s = 0, 0.0
        self.stop_requested = False

    def stop(self) -> None:
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
        c = self.experts[task]
        c.queued[replica] = max(c.queued.get(replica, 0) - 1, 0)
        if compute_s is None:
            c.failed_batches += 1
            return
        if replica in c.busy_by_replica:  # not this replica's first batch
            c.warm_batches += 1
            c.warm_images += images
            c.warm_busy_s += compute_s
        c.batches += 1
        c.images += images
        c.busy_s += compute_s
        c.busy_by_replica[replica] = c.busy_by_replica.get(replica, 0.0) + compute_s
        c.compute_hist[bisect.bisect_left(LATENCY_BUCKETS_S, compute_s)] += 1
        c.roundtrip_hist[bisect.bisect_left(LATENCY_BUCKETS_S, roundtrip_s)] += 1

    def event(self, task: str, kind: str) -> None:
        counters = self.experts[task]
        setattr(counters, kind, getattr(counters, kind) + 1)

    def snapshot(self) -> dict[str, Any]:
        return {
            "elapsed_s": round(time.time() - self.started, 3),
            "experts": {task: counters.as_dict() for task, counters in self.experts.items()},
            "cpu": {"images": self.cpu_images, "seconds": round(self.cpu_s, 6)},
        }
