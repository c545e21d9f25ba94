"""Observability of a Ray run: the live progress view and the per-run statistics file.

The numbers come from the ``RunMonitor`` actor (fed by the shard tasks' executors) and from a
``ClusterView`` of the actors the driver hands over; ``label-pipeline status`` summarises the newest
``OUT/stats/*.json`` (the schema every runner writes: ``label_pipeline.run_stats``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from label_pipeline.progress import Progress
from label_pipeline.run import PreparedRun
from label_pipeline.run_stats import Throughput, new_run_id, stats_document, utc_created, write_stats
from label_pipeline.runners.ray_planner import Placement, ReplicaPlan

logger = logging.getLogger(__name__)
REPLICA_FIELDS = ("node", "node_id", "pid", "gpu_ids", "cuda_visible_devices", "device")


@dataclass
class ClusterView:
    """The run's actors as the statistics see them: a snapshot the driver makes."""

    gpus: float
    cpus: float
    placements: dict[str, Placement]
    replicas: dict[str, list[dict[str, Any]]]  # task → one ``REPLICA_FIELDS`` dict per replica in service
    former: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # retired or lost during the run

    def gpu_ids(self, task: str) -> str:
        return ",".join(g for r in self.replicas[task] for g in r.get("gpu_ids", [])) or "cpu"


def monitor_snapshot(monitor: Any) -> dict[str, Any]:
    try:
        return ray.get(monitor.snapshot.remote(), timeout=10)
    except (RayActorError, GetTimeoutError) as exc:
        logger.warning("could not read the run monitor: %s", exc)
        return {"experts": {}, "elapsed_s": 0.0, "cpu": {"images": 0, "seconds": 0.0}}


class LiveView:
    """A shard bar (samples/s, ETA) plus a periodic per-expert line: throughput, queue, busy, GPUs."""

    def __init__(self, total: int, interval: float, enabled: bool) -> None:
        self.bar = Progress(total, enabled=enabled)
        self.interval, self.enabled = interval, enabled
        self.last = time.monotonic()
        self.previous: dict[str, int] = {}

    def shard_done(self, samples: int) -> None:
        self.bar.shard_done(samples)

    def tick(self, snapshot: dict[str, Any], cluster: ClusterView, running: int, pending: int) -> None:
        now = time.monotonic()
        # images labelled in the shards still running: all the shard tasks' chunks less what committed
        labelled = snapshot.get("cpu", {}).get("images", 0)
        self.bar.in_flight(max(labelled - self.bar.samples, 0), running)
        if not self.enabled or now - self.last < self.interval:
            return
        parts = []
        for task, counters in snapshot.get("experts", {}).items():
            count = len(cluster.replicas[task])
            rate = (counters["images"] - self.previous.get(task, 0)) / (now - self.last)
            self.previous[task] = counters["images"]
            busy = counters["busy_s"] / max(snapshot["elapsed_s"] * count, 1e-9)
            parts.append(
                f"{task} x{count} [GPU {cluster.gpu_ids(task)}] {rate:.1f} img/s q={counters['queued']} "
                f"busy {busy:.0%}"
            )
        logger.info("shards running %d, waiting %d | %s", running, pending, " | ".join(parts))
        self.last = now

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunStats:
    """What ``OUT/stats/ray-{time}-{id}.json`` holds (the schema of ``label_pipeline.run_stats``, plus
    the cluster, the replica plan and the CPU stage); statistics never decide what is done."""

    run_id: str = field(default_factory=new_run_id)
    created: str = field(default_factory=utc_created)
    status: str = "error"
    plan: ReplicaPlan | None = None
    started: float | None = None
    finished: float | None = None
    shard_retries: int = 0
    shards_abandoned: int = 0  # re-run without counting an attempt: replicas or nodes were lost
    connect_s: float | None = None  # joining or starting Ray
    events: list[dict[str, Any]] = field(default_factory=list)  # plans, replicas in service, nodes
    monitor: dict[str, Any] = field(default_factory=dict)
    throughput: Throughput = field(default_factory=lambda: Throughput(clock=time.time))

    @property
    def samples(self) -> int:
        return self.throughput.samples

    def add_samples(self, samples: int) -> None:
        """A shard committed ``samples`` samples."""
        self.throughput.add(samples)

    def event(self, name: str, **details: Any) -> None:
        """Something that changed the run's shape, at seconds since the first shard was submitted."""
        at = round(time.time() - self.started, 3) if self.started else 0.0
        labelled = self.monitor.get("cpu", {}).get("images", 0)  # in chunks, committed or not
        self.events.append({"t": at, "event": name, "samples": self.samples, "labelled": labelled, **details})

    def as_dict(self, prepared: PreparedRun, cluster: ClusterView) -> dict[str, Any]:
        elapsed = ((self.finished or time.time()) - self.started) if self.started else 0.0
        predicted = self.plan.predicted_images_per_s if self.plan else None
        return stats_document(
            runner="ray",
            run_id=self.run_id,
            created=self.created,
            status=self.status,
            elapsed_s=elapsed,
            samples=self.samples,
            shards={
                "planned": len(prepared.plans),
                "done": len(prepared.summary.results),
                "failed": len(prepared.summary.failed_shards),
                "skipped": prepared.summary.shards_skipped,
                "retries": self.shard_retries,
                "abandoned": self.shards_abandoned,
                "in_flight": self.plan.shards_in_flight if self.plan else None,
            },
            experts={task: self._expert(task, elapsed, cluster) for task in cluster.placements},
            throughput=self.throughput.points,
            cluster={"GPU": cluster.gpus, "CPU": cluster.cpus},
            predicted_images_per_s=None
            if predicted is None or math.isinf(predicted)
            else round(predicted, 3),
            bottleneck=self.plan.bottleneck if self.plan else None,
            cpu_stage=self.monitor.get("cpu", {}),
            started_unix=self.started,  # events' ``t`` count from here
            connect_s=None if self.connect_s is None else round(self.connect_s, 3),
            events=self.events,
        )

    def _expert(self, task: str, elapsed: float, cluster: ClusterView) -> dict[str, Any]:
        counters = self.monitor.get("experts", {}).get(task, {})
        entries = []
        for index, replica in enumerate([*cluster.replicas[task], *cluster.former.get(task, [])]):
            key = replica.get("id", index)
            busy = counters.get("busy_by_replica", {}).get(str(key), 0.0)
            fraction = round(busy / elapsed, 4) if elapsed else None
            entries.append({"replica": key, **replica, "busy_s": busy, "busy_fraction": fraction})
        running = [e for e in entries if e.get("state", "running") == "running"]
        former = [e for e in entries if e.get("state", "running") != "running"]
        return {
            "placement": asdict(cluster.placements[task]),
            **counters,
            "replicas": running,
            "former_replicas": former,
        }

    def write(self, prepared: PreparedRun, cluster: ClusterView) -> None:
        if not prepared.plans:
            return  # nothing ran: no statistics worth keeping
        write_stats(prepared.store, self.as_dict(prepared, cluster))
