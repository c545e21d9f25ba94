"""What runs inside Ray actors: one expert replica (``ExpertActor``) and the run's ``RunMonitor``.

An expert actor only runs ``expert(images, deps)`` on batches it is sent (the labeler, in the shard
task, decides what is sent: see ``ray_executor``). It keeps a small crash ledger on its node's disk
(the batch it is running), so that after Ray restarts it, it can tell which batch killed it.
"""

from __future__ import annotations

import bisect
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
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
        directory = Path(tempfile.gettempdir(), "label-pipeline-actors")
        directory.mkdir(exist_ok=True)
        self.current, self.ledger = directory / f"{actor_id}.current", directory / f"{actor_id}.kills.json"
        try:
            self.kills: dict[str, int] = json.loads(self.ledger.read_text())
        except (FileNotFoundError, ValueError):
            self.kills = {}
        if self.current.exists():  # the previous incarnation died running this batch
            batch_id = self.current.read_text().strip()
            if batch_id:
                self.kills[batch_id] = self.kills.get(batch_id, 0) + 1
                self.ledger.write_text(json.dumps(self.kills))
            self.current.unlink()

    def start(self, batch_id: str) -> None:
        self.current.write_text(batch_id)

    def finish(self) -> None:
        self.current.unlink()

    def remove(self) -> None:
        for path in (self.current, self.ledger):
            path.unlink(missing_ok=True)


class ExpertActor:
    """One replica of one expert. Built with ``ray.remote(...)`` options chosen by the planner; an
    actor without a GPU is started with ``CUDA_VISIBLE_DEVICES=""`` (its ``runtime_env``), so neither
    the expert nor a library it uses can take a card Ray gave to another actor.

    ``predict`` calls run one at a time, in order; the small ``control`` methods run beside them
    (see ``CONCURRENCY_GROUPS``) so the driver and the shard tasks can ask questions of a busy actor.
    """

    def __init__(self, expert_cls: type[Expert], options: Mapping[str, Any], task: str) -> None:
        self.task = task
        self.ledger = CrashLedger(str(ray.get_runtime_context().get_actor_id()))
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
            "node_id": ray.get_runtime_context().get_node_id(),
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


def _counters() -> dict[str, Any]:
    hist = [0] * (len(LATENCY_BUCKETS_S) + 1)
    return {
        **dict.fromkeys(("batches", "images", "busy_s", "queued", "failed_batches"), 0),
        # what calibration uses: every batch but each replica's first (its warm-up)
        **dict.fromkeys(("warm_batches", "warm_images", "warm_busy_s"), 0),
        **dict.fromkeys(("oom_splits", "crashes", "quarantined", "resubmitted"), 0),
        "busy_by_replica": {},
        "latency_buckets_s": list(LATENCY_BUCKETS_S),
        "compute_latency_hist": list(hist),
        "roundtrip_latency_hist": list(hist),
    }


class RunMonitor:
    """Counts what the shard tasks' executors report (fire-and-forget) for the live view, the planner
    and the stats file; holds the stop flag every shard task checks before each chunk (Ctrl-C)."""

    def __init__(self) -> None:
        self.reset([])

    def reset(self, tasks: Sequence[str]) -> None:
        self.started, self.stop_requested = time.time(), False
        self.experts = {task: _counters() for task in tasks}
        self.cpu = {"images": 0, "seconds": 0.0}  # shard tasks' CPU time: read, decode, encode, write
        self.generation, self.replica_sets = 0, None
        self.acks: dict[str, int] = {}  # shard id → the replica generation it labels with
        self.queues: dict[str, dict[int, int]] = {task: {} for task in tasks}  # batches sent, not back
        self.rates: dict[str, dict[int, float]] = {task: {} for task in tasks}  # images/s, recent batches

    def stop(self) -> None:
        self.stop_requested = True

    def stopping(self) -> bool:
        return self.stop_requested

    def publish(self, generation: int, replica_sets: Any) -> None:
        """The replicas in service from ``generation`` on (``ray_executor.ReplicaSets``)."""
        self.generation, self.replica_sets = generation, replica_sets

    def poll(self, shard_id: str, generation: int) -> tuple[bool, int, Any, dict[str, Any]]:
        """Before each chunk of a shard task: (stop?, the current generation, its replica sets if
        newer than the task's ``generation``, every replica's queue and recent images/s). The task
        labels that chunk with the current generation's replicas, which the driver reads back
        (``acks``) before it retires older ones; queues and rates steer its batches."""
        newer = self.generation > generation and self.replica_sets is not None
        self.acks[shard_id] = max(generation, self.generation) if newer else generation
        loads = {task: (dict(self.queues[task]), dict(self.rates[task])) for task in self.queues}
        return self.stop_requested, self.generation, self.replica_sets if newer else None, loads

    def sent(self, task: str, replica: int) -> None:
        """A batch went to ``replica`` (``finished`` says when it came back)."""
        self.experts[task]["queued"] += 1
        queue = self.queues.setdefault(task, {})
        queue[replica] = queue.get(replica, 0) + 1

    def add(self, task: str | None, **amounts: float) -> None:
        """Add to ``task``'s counters (or, without a task, to the shard tasks' CPU counters)."""
        counters = self.cpu if task is None else self.experts[task]
        for name, amount in amounts.items():
            counters[name] += amount

    def finished(
        self, task: str, replica: int, images: int, roundtrip_s: float, compute_s: float | None
    ) -> None:
        c = self.experts[task]
        c["queued"] -= 1
        queue = self.queues.setdefault(task, {})
        queue[replica] = max(queue.get(replica, 0) - 1, 0)
        if compute_s is None:
            c["failed_batches"] += 1
            return
        if compute_s > 0:  # a replica's speed as it is now: beside the other replicas on its card
            rate, rates = images / compute_s, self.rates.setdefault(task, {})
            rates[replica] = rate if replica not in rates else 0.7 * rates[replica] + 0.3 * rate
        busy = c["busy_by_replica"]
        if replica in busy:  # not this replica's first batch
            self.add(task, warm_batches=1, warm_images=images, warm_busy_s=compute_s)
        self.add(task, batches=1, images=images, busy_s=compute_s)
        busy[replica] = busy.get(replica, 0.0) + compute_s
        c["compute_latency_hist"][bisect.bisect_left(LATENCY_BUCKETS_S, compute_s)] += 1
        c["roundtrip_latency_hist"][bisect.bisect_left(LATENCY_BUCKETS_S, roundtrip_s)] += 1

    def snapshot(self) -> dict[str, Any]:
        experts = copy.deepcopy(self.experts)
        for counters in experts.values():
            counters["busy_by_replica"] = {str(r): s for r, s in sorted(counters["busy_by_replica"].items())}
        return {
            "elapsed_s": time.time() - self.started,
            "experts": experts,
            "cpu": dict(self.cpu),
            "acks": dict(self.acks),
        }
