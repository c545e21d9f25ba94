"""The expert actors of a Ray run (driver side): where they are placed, how many replicas each
expert has, its batch size, and an ``ActorCache`` that keeps them for a driver's next run."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from expert_zoo.base import Expert
from label_pipeline.config import DecodeConfig
from label_pipeline.core.format import encode_json
from label_pipeline.runners.ray_actors import CONCURRENCY_GROUPS, ExpertActor, RunMonitor
from label_pipeline.runners.ray_config import RayRunnerConfig
from label_pipeline.runners.ray_executor import RemoteExpert, ShardContext
from label_pipeline.runners.ray_planner import (
    ExpertProfile,
    ReplicaPlan,
    candidate_batch_sizes,
    choose_batch_size,
    first_placements,
    plan_replicas,
)
from label_pipeline.runners.ray_stats import REPLICA_FIELDS, ClusterView

logger = logging.getLogger(__name__)


class ActorCache:
    """Expert actors kept between the runs of a driver that stays connected to one Ray instance
    (notebooks, benchmarks), so a model loads once rather than once per run. Pass the same cache to
    every ``run_ray``; ``close()`` ends the actors it holds. A run takes the actors it can use and
    ends the others (they hold CPUs and GPUs)."""

    def __init__(self) -> None:
        self.session: tuple[str, str] | None = None
        self.parked: dict[tuple, list[Any]] = {}

    def _check_session(self) -> None:
        context = ray.get_runtime_context()
        session = (context.get_node_id(), context.get_job_id())
        if session != self.session:  # another Ray instance: the handles are dead
            self.session, self.parked = session, {}

    def take(self, key: tuple) -> Any | None:
        self._check_session()
        actors = self.parked.get(key)
        return actors.pop() if actors else None

    def park(self, key: tuple, actor: Any) -> None:
        self._check_session()
        self.parked.setdefault(key, []).append(actor)

    def close(self) -> None:
        if not ray.is_initialized():  # Ray is down: its actors are gone with it
            self.parked = {}
            return
        self._check_session()
        for actors in self.parked.values():
            for actor in actors:
                ray.kill(actor, no_restart=True)
        self.parked = {}


@dataclass
class Replica:
    task: str
    actor: Any
    key: tuple  # what an ``ActorCache`` matches it by
    info: dict[str, Any] = field(default_factory=dict)


class ExpertPool:
    """The expert actors of one run: their placement, replicas and batch sizes."""

    def __init__(
        self,
        classes: Mapping[str, type[Expert]],
        options: Mapping[str, dict[str, Any]],
        config: RayRunnerConfig,
        cache: ActorCache | None = None,
    ) -> None:
        self.classes, self.options, self.config, self.cache = classes, options, config, cache
        self.actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertActor)  # type: ignore[call-overload]
        resources = ray.cluster_resources()
        self.gpus, self.cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        # Placement comes before any actor exists; the batch size is set once the first replica reports it.
        profiles = {
            task: ExpertProfile(task, cls.spec.uses_gpu, cls.spec.batch_size) for task, cls in classes.items()
        }
        self.placements = first_placements(profiles, config, self.gpus, self.cpus)
        self.replicas: dict[str, list[Replica]] = {task: [] for task in classes}
        self.launching: dict[Any, tuple[Replica, float]] = {}  # info() ref → replica still starting
        parked = cache.take(("monitor",)) if cache is not None else None
        self.monitor: Any = parked or ray.remote(RunMonitor).options(num_cpus=0).remote()
        self.monitor.reset.remote(list(classes))  # type: ignore[union-attr]  # Ray: methods lack .remote
        if self.gpus == 0 and any(p.uses_gpu for p in profiles.values()):
            logger.warning("the cluster has no GPUs: every expert runs on CPU")

    # -- starting replicas -------------------------------------------------------------------------
    def start(self) -> None:
        """One replica per expert (or the count fixed in the manifest); waits until all are loaded."""
        self.launch({task: placement.replicas for task, placement in self.placements.items()}, reuse=True)
        if self.cache is not None:
            self.cache.close()  # what this run did not take
        refs = list(self.launching)
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.config.actor_start_timeout_s)
        if pending:
            raise RuntimeError(self._not_started(self.launching[pending[0]][0]))
        for ref in refs:
            self._adopt(ref)
        for task, replicas in self.replicas.items():  # one batch size per expert: its first replica's
            size = self.placements[task].batch_size = replicas[0].info["batch_size"]
            ray.get([r.actor.use_batch_size.remote(size) for r in replicas if r.info["batch_size"] != size])
        logger.info("experts loaded:\n%s", self.describe_actors())

    def launch(self, counts: Mapping[str, int], reuse: bool = False) -> None:
        """Start replicas without waiting (``reuse``: take them from the cache where it has them)."""
        for task, count in counts.items():
            for _ in range(count):
                key = self._key(task)
                parked = self.cache.take(key) if reuse and self.cache is not None else None
                replica = Replica(task, parked or self._create(task), key)
                self.launching[replica.actor.info.remote()] = (replica, time.monotonic())

    def poll_launched(self) -> bool:
        """Adopt the extra replicas that finished loading; True when the set of replicas changed."""
        if not self.launching:
            return False
        ready, _ = ray.wait(list(self.launching), num_returns=len(self.launching), timeout=0)
        for ref in ready:
            try:
                self._adopt(ref, self.placements[self.launching[ref][0].task].batch_size)
            except Exception as exc:  # noqa: BLE001 - an extra replica that fails is only a lost speed-up
                logger.warning("an extra replica failed to start (%s); running without it", exc)
        for ref, (replica, since) in list(self.launching.items()):
            if time.monotonic() - since > self.config.actor_start_timeout_s:
                logger.warning("%s; running without it", self._not_started(replica))
                del self.launching[ref]
                self._drop(replica)
        return bool(ready)

    def _adopt(self, ref: Any, batch_size: int | None = None) -> None:
        """A started replica joins its expert's (with the expert's batch size, when given)."""
        replica, _ = self.launching.pop(ref)
        try:
            replica.info = self._info(ref)
            if batch_size is not None:
                ray.get(replica.actor.use_batch_size.remote(batch_size))
        except BaseException:
            self._drop(replica)
            raise
        self.replicas[replica.task].append(replica)

    def _drop(self, replica: Replica) -> None:
        ray.kill(replica.actor, no_restart=True)
        self.placements[replica.task].replicas -= 1

    def _info(self, ref: Any) -> dict[str, Any]:
        try:
            return ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, Exception):
                raise exc.cause from None  # e.g. ExpertUnavailable: the CLI's usage error
            raise

    def _not_started(self, replica: Replica) -> str:
        placement = self.placements[replica.task]
        return (
            f"a {replica.task} replica did not start within {self.config.actor_start_timeout_s:g}s "
            f"(it needs {placement.num_gpus:g} GPU and {placement.num_cpus:g} CPU; the cluster has "
            f"{self.gpus:g} GPU, {self.cpus:g} CPU)"
        )

    def _key(self, task: str) -> tuple:
        cls, placement = self.classes[task], self.placements[task]
        return (
            f"{cls.__module__}:{cls.__qualname__}",
            encode_json(self.options[task]),
            placement.num_gpus,
            placement.num_cpus,
            self.config.max_restarts,
            self.config.batch_retries,
        )

    def _create(self, task: str) -> Any:
        placement = self.placements[task]
        # A CPU replica must not see the node's cards (nor may torch or onnxruntime inside it).
        env = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}} if placement.num_gpus == 0 else None
        return self.actor_class.options(
            num_gpus=placement.num_gpus,
            num_cpus=placement.num_cpus,
            max_restarts=self.config.max_restarts,
            max_task_retries=self.config.batch_retries,
            runtime_env=env,
        ).remote(self.classes[task], self.options[task], task)

    # -- batch sizes and planning ------------------------------------------------------------------
    def choose_batch_sizes(self) -> None:
        """Time a few synthetic batches at candidate sizes on each expert's first replica and keep the
        fastest (``choose_batch_size``), where the manifest sets no batch size, no dependency is
        needed and ``calibrate_batch_size`` allows it (by default: replicas running on CUDA)."""
        timing = {}
        for task, replicas in self.replicas.items():
            info, wanted = replicas[0].info, self.config.calibrate_batch_size
            if wanted is None:
                wanted = str(info["device"]).startswith("cuda")
            if wanted and "batch_size" not in self.options[task] and not info["spec"].requires:
                sizes = candidate_batch_sizes(self.placements[task].batch_size)
                timing[task] = replicas[0].actor.time_batches.remote(sizes)
        for task, ref in timing.items():
            placement = self.placements[task]
            try:
                timings = ray.get(ref)
            except RayError as exc:  # a failed calibration only costs speed: keep the expert's own size
                logger.warning("%s: batch-size calibration failed (%s)", task, str(exc).splitlines()[0])
                continue
            placement.batch_size = choose_batch_size(timings, placement.batch_size)
            ray.get([r.actor.use_batch_size.remote(placement.batch_size) for r in self.replicas[task]])
            measured = ", ".join(
                f"{size}: {'OOM' if s is None else f'{1 / s:.1f} img/s' if s else 'inf'}"
                for size, s in sorted(timings.items())
            )
            logger.info("%s: batch size %d (calibrated: %s)", task, placement.batch_size, measured)

    def calibrated(self, snapshot: Mapping[str, Any]) -> bool:
        """Every expert has finished ``calibration_batches`` batches after its warm-up batch."""
        counters, wanted = snapshot.get("experts", {}), self.config.calibration_batches
        return wanted > 0 and all(
            counters.get(t, {}).get("warm_batches", 0) >= wanted for t in self.placements
        )

    def plan(self, snapshot: Mapping[str, Any], launch: bool) -> ReplicaPlan:
        """Plan replicas from the measured rates; ``launch`` starts the extra replicas (else the plan
        is only a record, and the placements stay as they are)."""
        placements = self.placements if launch else copy.deepcopy(self.placements)
        for task, placement in placements.items():
            measured = snapshot.get("experts", {}).get(task, {})
            if measured.get("warm_images") and measured.get("warm_busy_s"):
                placement.images_per_s = measured["warm_images"] / measured["warm_busy_s"]
        cpu = snapshot.get("cpu", {})
        cpu_seconds = cpu["seconds"] / cpu["images"] if cpu.get("images") else None
        before = {task: p.replicas for task, p in placements.items()}
        plan = plan_replicas(placements, self.config, self.gpus, self.cpus, self.chunk_size(), cpu_seconds)
        if launch:
            self.launch({task: p.replicas - before[task] for task, p in self.placements.items()})
            self.fit_shard_cpus(plan)
        return plan

    def chunk_size(self) -> int:
        return max(p.batch_size for p in self.placements.values())

    def fit_shard_cpus(self, plan: ReplicaPlan) -> None:
        """Shard tasks reserve at most what is free (other jobs may share the cluster): a reservation
        nobody can satisfy would stall the run."""
        if self.config.shard_cpus is not None:
            return
        launching = sum(self.placements[r.task].num_cpus for r, _ in self.launching.values())
        free = max(float(ray.available_resources().get("CPU", 0.0)) - launching, 0.0)
        fitting = math.floor(free / plan.shards_in_flight * 10_000) / 10_000
        if fitting < plan.shard_cpus:
            logger.info("%g CPUs free: shard tasks reserve %g CPU each", free, fitting)
            plan.shard_cpus = fitting

    # -- what the shard tasks, the stats and the run manifest get ----------------------------------
    def fingerprints(self) -> dict[str, str]:
        fingerprints = {}
        for task, replicas in self.replicas.items():
            found = {r.info["fingerprint"] for r in replicas}
            if len(found) != 1:
                raise RuntimeError(f"{task}: replicas disagree on the fingerprint: {sorted(found)}")
            fingerprints[task] = found.pop()
        return fingerprints

    def weights(self) -> dict[str, str]:
        return {task: replicas[0].info.get("weights", "") for task, replicas in self.replicas.items()}

    def shard_context(self, output: str, decode: DecodeConfig) -> ShardContext:
        fingerprints = self.fingerprints()
        experts = {
            task: RemoteExpert(
                self.classes[task],
                replicas[0].info["spec"],
                fingerprints[task],
                self.placements[task].batch_size,
                [r.actor for r in replicas],
            )
            for task, replicas in self.replicas.items()
        }
        policy = self.config.quarantine_after, self.config.actor_start_timeout_s
        return ShardContext(output, decode, experts, self.monitor, *policy)

    def view(self) -> ClusterView:
        replicas = {
            task: [{name: r.info.get(name) for name in REPLICA_FIELDS} for r in replicas]
            for task, replicas in self.replicas.items()
        }
        return ClusterView(self.gpus, self.cpus, self.placements, replicas)

    def describe_actors(self) -> str:
        return "\n".join(
            f"  {task}[{index}] node {r.info.get('node')} pid {r.info.get('pid')} "
            f"GPU {','.join(r.info.get('gpu_ids', [])) or '-'} device {r.info.get('device')}"
            for task, replicas in self.replicas.items()
            for index, r in enumerate(replicas)
        )

    def stop(self, clean: bool) -> None:
        """Park the actors in the cache for the next run (after a clean run), else end them."""
        replicas = [r for replicas in self.replicas.values() for r in replicas]
        for replica, _ in self.launching.values():
            ray.kill(replica.actor, no_restart=True)
        if self.cache is not None and clean and self._reset(replicas):
            for replica in replicas:
                self.cache.park(replica.key, replica.actor)
            self.cache.park(("monitor",), self.monitor)
            return
        closing = [r.actor.close.remote() for r in replicas]
        ray.wait(closing, num_returns=len(closing), timeout=5)
        for actor in [*(r.actor for r in replicas), self.monitor]:
            ray.kill(actor, no_restart=True)

    def _reset(self, replicas: list[Replica]) -> bool:
        """Back to the manifest's batch size (or the expert's own) for the next run; False if one is gone."""
        try:
            ray.get([r.actor.use_batch_size.remote(self.options[r.task].get("batch_size")) for r in replicas])
        except RayError:
            return False
        return True
