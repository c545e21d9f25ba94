"""The expert actors of a Ray run (driver side): where they are placed, how many replicas each
expert has (with which GPU share), its batch size, the cluster's nodes coming and going, and an
``ActorCache`` that keeps the actors for a driver's next run.

Replicas change during a run: the plan adds some and replaces others (a share that no longer fits),
a lost node takes its replicas with it, a new node gets new ones. Every change is published to the
running shard tasks, which switch before their next chunk; a replaced replica is *retired* (taken out
of service) and killed once every running shard task has switched (``release_retired``).
"""

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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expert_zoo.base import Expert
from label_pipeline.config import DecodeConfig
from label_pipeline.core.format import encode_json
from label_pipeline.labeler import dependency_levels
from label_pipeline.runners.ray_actors import CONCURRENCY_GROUPS, ExpertActor, RunMonitor
from label_pipeline.runners.ray_config import RayRunnerConfig
from label_pipeline.runners.ray_executor import RemoteExpert, ShardContext, replica_sets
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
# A control call (the batch size) to a loaded replica answers in milliseconds; one to a replica
# whose node left waits for a restart that may never come.
CONTROL_TIMEOUT_S = 30.0


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
    share: float  # GPUs it holds
    id: int  # stable across the run (the monitor's and the statistics' replica key)
    info: dict[str, Any] = field(default_factory=dict)
    replaced: bool = False  # the plan no longer lists it: retired once its replacements run
    retired_at: int | None = None  # first context generation without it
    state: str = "running"  # running / retired / lost

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "share": self.share, "state": self.state, **self.info_fields()}

    def info_fields(self) -> dict[str, Any]:
        return {name: self.info.get(name) for name in REPLICA_FIELDS}


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
        specs = {task: cls.spec for task, cls in classes.items()}
        for level, tasks in enumerate(dependency_levels(list(classes), specs)):
            for task in tasks:
                self.placements[task].level = level
        self.replicas: dict[str, list[Replica]] = {task: [] for task in classes}
        self.launching: dict[Any, tuple[Replica, float]] = {}  # info() ref → replica still starting
        self.retiring: list[Replica] = []  # out of new contexts; killed once no shard task can call them
        self.former: dict[str, list[Replica]] = {task: [] for task in classes}  # retired or lost
        self.nodes = alive_nodes()
        self._next_id = 0
        parked = cache.take(("monitor",)) if cache is not None else None
        # On the driver's node: a node that leaves the cluster must not take the run's counters with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.monitor: Any = (
            parked or ray.remote(RunMonitor).options(num_cpus=0, scheduling_strategy=here).remote()
        )
        self.monitor.reset.remote(list(classes))  # type: ignore[union-attr]  # Ray: methods lack .remote
        if self.gpus == 0 and any(p.uses_gpu for p in profiles.values()):
            logger.warning("the cluster has no GPUs: every expert runs on CPU")

    # -- starting replicas -------------------------------------------------------------------------
    def start(self) -> None:
        """One replica per expert (or the count fixed in the manifest); waits until all are loaded."""
        self.launch({task: placement.shares for task, placement in self.placements.items()}, reuse=True)
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

    def launch(self, requests: Mapping[str, list[float]], reuse: bool = False) -> None:
        """Start replicas of the given GPU shares without waiting; ``reuse``: take them from the cache
        where it has them. First those of experts whose every replica is being replaced (their old
        ones free their cards only once these run), then largest first (so they pack onto the cards)."""

        def order(item: tuple[float, str]) -> tuple[bool, float]:
            share, task = item
            return (not all(r.replaced for r in self.replicas[task]) or not self.replicas[task], -share)

        wanted = sorted(((share, task) for task, shares in requests.items() for share in shares), key=order)
        for share, task in wanted:
            key = self._key(task, share)
            parked = self.cache.take(key) if reuse and self.cache is not None else None
            replica = Replica(task, parked or self._create(task, share), key, share, self._next_id)
            self._next_id += 1
            self.launching[replica.actor.info.remote()] = (replica, time.monotonic())

    def poll_launched(self) -> bool:
        """Adopt the replicas that finished loading and take the ones they replace out of service;
        True when the set of replicas in service changed (the shard tasks need a new context)."""
        changed = False
        if self.launching:
            ready, _ = ray.wait(list(self.launching), num_returns=len(self.launching), timeout=0)
            for ref in ready:
                try:
                    self._adopt(ref, self.placements[self.launching[ref][0].task].batch_size)
                    changed = True
                except Exception as exc:  # noqa: BLE001 - an extra replica that fails is only a lost speed-up
                    logger.warning("an extra replica failed to start (%s); running without it", exc)
            for ref, (replica, since) in list(self.launching.items()):
                if time.monotonic() - since > self.config.actor_start_timeout_s:
                    logger.warning("%s; running without it", self._not_started(replica))
                    del self.launching[ref]
                    self._drop(replica)
        return self._take_replaced_out() or changed

    def _take_replaced_out(self) -> bool:
        """Replaced replicas leave service (their cards free once no shard task can call them) when
        their expert has another replica in service; if not, once its new ones run."""
        starting = {replica.task for replica, _ in self.launching.values()}
        changed = False
        for task, replicas in self.replicas.items():
            if not any(r.replaced for r in replicas):
                continue
            if all(r.replaced for r in replicas):
                if task in starting:
                    continue
                for replica in replicas:  # nothing replaced them (they failed to start): keep serving
                    replica.replaced = False
                    self.placements[task].add_replica(replica.share)
                continue
            self.retiring += [r for r in replicas if r.replaced]
            self.replicas[task] = [r for r in replicas if not r.replaced]
            changed = True
        return changed

    def mark_retired(self, generation: int) -> None:
        """The contexts from ``generation`` on no longer list the retiring replicas."""
        for replica in self.retiring:
            if replica.retired_at is None:
                replica.retired_at = generation

    def release_retired(self, oldest_generation: int) -> None:
        """Kill the retired replicas no running shard task can call any more (every running task
        started with a context of ``oldest_generation`` or later)."""
        for replica in list(self.retiring):
            if replica.retired_at is not None and replica.retired_at <= oldest_generation:
                self.retiring.remove(replica)
                self._end(replica, "retired")

    def ready(self) -> bool:
        """Every expert has a replica in service (after a lost node, shards wait for new ones)."""
        return all(self.replicas.values())

    def _adopt(self, ref: Any, batch_size: int | None = None) -> None:
        """A started replica joins its expert's (with the expert's batch size, when given)."""
        replica, _ = self.launching.pop(ref)
        try:
            replica.info = self._info(ref)
            if batch_size is not None:
                ray.get(replica.actor.use_batch_size.remote(batch_size), timeout=CONTROL_TIMEOUT_S)
        except BaseException:
            self._drop(replica)
            raise
        self.replicas[replica.task].append(replica)

    def _drop(self, replica: Replica) -> None:
        """A replica that never served (failed or too slow to start)."""
        ray.kill(replica.actor, no_restart=True)
        self.placements[replica.task].remove_replica(replica.share)

    def _end(self, replica: Replica, state: str) -> None:
        """A replica that served leaves the run (its statistics stay in ``former``)."""
        ray.kill(replica.actor, no_restart=True)
        replica.state = state
        self.former[replica.task].append(replica)

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
            f"(it needs {replica.share:g} GPU and {placement.num_cpus:g} CPU; the cluster has "
            f"{self.gpus:g} GPU, {self.cpus:g} CPU)"
        )

    def _key(self, task: str, share: float) -> tuple:
        cls, placement = self.classes[task], self.placements[task]
        return (
            f"{cls.__module__}:{cls.__qualname__}",
            encode_json(self.options[task]),
            share,
            placement.num_cpus,
            self.config.max_restarts,
            self.config.batch_retries,
        )

    def _create(self, task: str, share: float) -> Any:
        placement = self.placements[task]
        # A CPU replica must not see the node's cards (nor may torch or onnxruntime inside it). On a
        # cluster without cards there is nothing to hide, and a runtime env of its own would keep the
        # actor from taking one of the worker processes Ray has already started.
        env = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}} if share == 0 and self.gpus > 0 else None
        return self.actor_class.options(
            num_gpus=share,
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
        """Plan replicas from the rates measured on the first replicas (calibration: measured once,
        later batches run beside other replicas on shared cards); ``launch`` starts the missing
        replicas and marks the ones the plan no longer lists as replaced (else the plan is only a
        record, and the placements stay as they are)."""
        placements = self.placements if launch else copy.deepcopy(self.placements)
        for task, placement in placements.items():
            measured = snapshot.get("experts", {}).get(task, {})
            if placement.images_per_s is None and measured.get("warm_images") and measured.get("warm_busy_s"):
                placement.images_per_s = measured["warm_images"] / measured["warm_busy_s"]
        cpu = snapshot.get("cpu", {})
        cpu_seconds = cpu["seconds"] / cpu["images"] if cpu.get("images") else None
        plan = plan_replicas(placements, self.config, self.gpus, self.cpus, self.chunk_size(), cpu_seconds)
        if launch:
            self.launch({task: self._apply(task, p.shares) for task, p in self.placements.items()})
            self.fit_shard_cpus(plan)
        return plan

    def _apply(self, task: str, wanted: list[float]) -> list[float]:
        """Match the replicas in service or starting to the planned ``wanted`` shares: those not
        wanted are marked replaced (or, still starting, stopped); returns the shares to start."""
        missing = list(wanted)
        for replica in self.replicas[task]:
            match = next((i for i, s in enumerate(missing) if math.isclose(s, replica.share)), None)
            replica.replaced = match is None
            if match is not None:
                missing.pop(match)
        for ref, (replica, _) in list(self.launching.items()):
            if replica.task != task:
                continue
            match = next((i for i, s in enumerate(missing) if math.isclose(s, replica.share)), None)
            if match is None:
                del self.launching[ref]
                ray.kill(replica.actor, no_restart=True)
            else:
                missing.pop(match)
        return missing

    # -- nodes coming and going --------------------------------------------------------------------
    def check_nodes(self) -> bool:
        """Follow the cluster's nodes: replicas on a node that left are ended (Ray would restart them
        only where there is room; the plan decides instead), and the cluster's size is updated.
        True when the nodes changed: the caller re-plans."""
        nodes = alive_nodes()
        if nodes == self.nodes:
            return False
        lost, joined = set(self.nodes) - set(nodes), set(nodes) - set(self.nodes)
        self.nodes = nodes
        resources = ray.cluster_resources()
        self.gpus, self.cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        gone = []
        for task, replicas in self.replicas.items():
            for replica in [r for r in replicas if r.info.get("node_id") in lost]:
                replicas.remove(replica)
                self.placements[task].remove_replica(replica.share)
                self._end(replica, "lost")
                gone.append(f"{task}[{replica.id}]")
        for replica in [r for r in self.retiring if r.info.get("node_id") in lost]:
            self.retiring.remove(replica)
            self._end(replica, "lost")
        logger.warning(
            "cluster changed: %d node(s) left%s, %d joined; now %g GPUs, %g CPUs",
            len(lost),
            f" (with replicas {', '.join(gone)})" if gone else "",
            len(joined),
            self.gpus,
            self.cpus,
        )
        return True

    def restore_missing(self) -> None:
        """Before a plan exists: one replica (of its first share) for every expert that lost all."""
        starting = {replica.task for replica, _ in self.launching.values()}
        wanted = {
            t: [p.num_gpus] for t, p in self.placements.items() if not self.replicas[t] and t not in starting
        }
        for task, shares in wanted.items():
            self.placements[task].add_replica(shares[0])
        self.launch(wanted)

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
            found = {r.info["fingerprint"] for r in [*replicas, *self.former[task]]}
            if len(found) != 1:
                raise RuntimeError(f"{task}: replicas disagree on the fingerprint: {sorted(found)}")
            fingerprints[task] = found.pop()
        return fingerprints

    def weights(self) -> dict[str, str]:
        return {task: replicas[0].info.get("weights", "") for task, replicas in self.replicas.items()}

    def shard_context(self, output: str, decode: DecodeConfig, generation: int = 0) -> ShardContext:
        """What shard tasks need; its replica sets are also published to the running ones."""
        fingerprints = self.fingerprints()
        experts = {
            task: RemoteExpert(
                self.classes[task],
                replicas[0].info["spec"],
                fingerprints[task],
                self.placements[task].batch_size,
                [r.actor for r in replicas],
                [r.id for r in replicas],
                [min(r.share, 1.0) or 1.0 for r in replicas],  # a share of a card runs at that share
            )
            for task, replicas in self.replicas.items()
        }
        policy = self.config.quarantine_after, self.config.actor_start_timeout_s
        self.monitor.publish.remote(generation, replica_sets(experts))
        return ShardContext(output, decode, experts, self.monitor, *policy, generation)

    def view(self) -> ClusterView:
        replicas = {task: [r.describe() for r in replicas] for task, replicas in self.replicas.items()}
        former = {
            task: [r.describe() for r in [*replicas, *(x for x in self.retiring if x.task == task)]]
            for task, replicas in self.former.items()
        }
        return ClusterView(self.gpus, self.cpus, self.placements, replicas, former)

    def describe_actors(self) -> str:
        return "\n".join(
            f"  {task}[{r.id}] node {r.info.get('node')} ({str(r.info.get('node_id'))[:8]}) "
            f"pid {r.info.get('pid')} GPU {','.join(r.info.get('gpu_ids', [])) or '-'} x {r.share:g} "
            f"device {r.info.get('device')}"
            for task, replicas in self.replicas.items()
            for r in replicas
        )

    def stop(self, clean: bool) -> None:
        """Park the actors in the cache for the next run (after a clean run), else end them."""
        replicas = [r for replicas in self.replicas.values() for r in replicas]
        for replica in [*(r for r, _ in self.launching.values()), *self.retiring]:
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
            sizes = [r.actor.use_batch_size.remote(self.options[r.task].get("batch_size")) for r in replicas]
            ray.get(sizes, timeout=CONTROL_TIMEOUT_S)
        except RayError:  # GetTimeoutError included: a replica on a node that left
            return False
        return True


def alive_nodes() -> list[str]:
    """Ids of the cluster's live nodes, sorted."""
    return sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
