"""Observability of a Ray run: the live progress view and the per-run statistics file.

The numbers come from the ``RunMonitor`` actor (fed by the expert proxies) and from the actors'
placement; ``label-pipeline status`` summarises the newest ``OUT/stats/ray-*.json``.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from label_pipeline.format import encode_json
from label_pipeline.progress import Progress
from label_pipeline.run import PreparedRun
from label_pipeline.runners.ray_planner import ReplicaPlan

if TYPE_CHECKING:
    from label_pipeline.runners.ray_runner import ExpertGroup

logger = logging.getLogger(__name__)


def monitor_snapshot(monitor: Any) -> dict[str, Any]:
    try:
        return ray.get(monitor.snapshot.remote(), timeout=10)
    except (RayActorError, GetTimeoutError) as exc:
        logger.warning("could not read the run monitor: %s", exc)
        return {"experts": {}, "elapsed_s": 0.0, "cpu": {"images": 0, "seconds": 0.0}}


class LiveView:
    """A shard bar (samples/s, ETA) plus a periodic per-expert line: throughput, queue, busy, GPUs."""

    def __init__(self, total: int, experts: ExpertGroup, interval: float, enabled: bool) -> None:
        self.bar = Progress(total, enabled=enabled)
        self.experts, self.interval, self.enabled = experts, interval, enabled
        self.last = time.monotonic()
        self.previous: dict[str, int] = {}

    def shard_done(self, samples: int) -> None:
        self.bar.shard_done(samples)

    def tick(self, snapshot: dict[str, Any], running: int, pending: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        parts = []
        for task, counters in snapshot.get("experts", {}).items():
            replicas = self.experts.replicas[task]
            rate = (counters["images"] - self.previous.get(task, 0)) / (now - self.last)
            self.previous[task] = counters["images"]
            busy = counters["busy_s"] / max(snapshot["elapsed_s"] * len(replicas), 1e-9)
            gpus = ",".join(g for r in replicas for g in r.info.get("gpu_ids", [])) or "cpu"
            queued = counters["queued"]
            parts.append(f"{task} x{len(replicas)} [GPU {gpus}] {rate:.1f} img/s q={queued} busy {busy:.0%}")
        logger.info("shards running %d, waiting %d | %s", running, pending, " | ".join(parts))
        self.last = now

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunStats:
    """What ``OUT/stats/ray-{time}-{id}.json`` holds; statistics never decide what is done."""

    experts: ExpertGroup
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")
    )
    status: str = "error"
    plan: ReplicaPlan | None = None
    started: float | None = None
    finished: float | None = None
    samples: int = 0
    shard_retries: int = 0
    monitor: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, prepared: PreparedRun) -> dict[str, Any]:
        elapsed = ((self.finished or time.time()) - self.started) if self.started else 0.0
        predicted = self.plan.predicted_images_per_s if self.plan else None
        return {
            "runner": "ray",
            "run_id": self.run_id,
            "created": self.created,
            "status": self.status,
            "cluster": {"GPU": self.experts.gpus, "CPU": self.experts.cpus},
            "shards": {
                "planned": len(prepared.plans),
                "labelled": len(prepared.summary.results),
                "failed": len(prepared.summary.failed_shards),
                "skipped": prepared.summary.shards_skipped,
                "retries": self.shard_retries,
                "in_flight": self.plan.shards_in_flight if self.plan else None,
            },
            "samples": self.samples,
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(self.samples / elapsed, 3) if elapsed else None,
            "predicted_images_per_s": None
            if predicted is None or math.isinf(predicted)
            else round(predicted, 3),
            "bottleneck": self.plan.bottleneck if self.plan else None,
            "cpu_stage": self.monitor.get("cpu", {}),
            "experts": {task: self._expert(task, elapsed) for task in self.experts.placements},
        }

    def _expert(self, task: str, elapsed: float) -> dict[str, Any]:
        counters = self.monitor.get("experts", {}).get(task, {})
        replicas = []
        for replica in self.experts.replicas[task]:
            busy = counters.get("busy_by_replica", {}).get(str(replica.index), 0.0)
            replicas.append(
                {
                    "replica": replica.index,
                    "node": replica.info.get("node"),
                    "pid": replica.info.get("pid"),
                    "gpu_ids": replica.info.get("gpu_ids", []),
                    "cuda_visible_devices": replica.info.get("cuda_visible_devices"),
                    "device": replica.info.get("device"),
                    "busy_s": busy,
                    "busy_fraction": round(busy / elapsed, 4) if elapsed else None,
                }
            )
        return {
            "placement": asdict(self.experts.placements[task]),
            "images_per_s": round(counters.get("images", 0) / elapsed, 3) if elapsed else None,
            **counters,
            "replicas": replicas,
        }

    def write(self, prepared: PreparedRun) -> None:
        if not prepared.plans:
            return  # nothing ran: no statistics worth keeping
        stamp = self.created.replace("-", "").replace(":", "").replace("+0000", "Z")
        path = f"{prepared.store.root}/stats/ray-{stamp}-{self.run_id}.json"
        try:
            prepared.store.write_bytes_atomic(path, encode_json(self.as_dict(prepared)))
        except Exception:  # noqa: BLE001 - statistics never decide anything: failing to write them warns
            logger.warning("could not write run statistics to %s", path, exc_info=True)
