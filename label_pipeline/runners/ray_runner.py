"""The Ray runner: expert replicas as actors (pinned to GPUs), shards as CPU tasks, same output bytes.

The driver does what the local runner does (``prepare_run`` → one ``run_shard`` per planned shard →
``finish_run``); only *where* things run changes:

1. connect to a cluster (``--address`` / ``RAY_ADDRESS``) or start a local Ray;
2. start one actor per expert, read each expert's fingerprint from it, lock and plan the output;
3. stream shards through ``label_shard`` tasks, a bounded number at a time; each commits on its
   own, in any order; a shard that fails is retried, then recorded as failed, and the run goes on;
4. calibrate on the run itself: once every expert has finished a few batches (after a warm-up
   batch per replica), the planner (``ray_planner``) adds replicas to the bottleneck while the
   cluster has room, and prints the plan with its predicted images/s; later shards use them;
5. write ``OUT/stats/ray-*.json`` (per-expert busy time, latency histograms, faults) and release.

Ctrl-C cancels the shards in flight (their temp files are removed) and leaves a resumable output.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from expert_zoo.base import Expert
from expert_zoo.registry import available, resolve_experts, resolve_name
from label_pipeline.config import Manifest
from label_pipeline.format import encode_json
from label_pipeline.labeler import Labeler
from label_pipeline.run import PreparedRun, RunOptions, RunSummary, check_inputs, finish_run, prepare_run
from label_pipeline.runners.ray_actors import (
    CONCURRENCY_GROUPS,
    ExpertActor,
    ExpertProxy,
    FaultPolicy,
    RunMonitor,
    ShardContext,
    label_shard,
    spec_with_batch_size,
)
from label_pipeline.runners.ray_config import RayRunnerConfig, parse_ray_config
from label_pipeline.runners.ray_planner import (
    ExpertProfile,
    Placement,
    ReplicaPlan,
    candidate_batch_sizes,
    choose_batch_size,
    first_placements,
    plan_replicas,
)
from label_pipeline.runners.ray_stats import LiveView, RunStats, monitor_snapshot
from label_pipeline.shard_job import ShardPlan, ShardResult
from label_pipeline.core.signals import install_sigterm_handler

logger = logging.getLogger(__name__)
CANCEL_GRACE_S = 30.0


def run_ray(
    manifest: Manifest, options: RunOptions, address: str | None = None, progress: bool = True
) -> RunSummary:
    """Label ``manifest`` on a Ray cluster; the output is byte-identical to ``run_local``'s."""
    known = {name.partition(":")[0] for name in available()} | {r.task for r in manifest.experts}
    config = parse_ray_config(manifest.runner, known)
    names = {request.task: resolve_name(request) for request in manifest.experts}
    # Fails fast, here: every name and option is checked before Ray starts or a model loads.
    classes = {task: expert.cls for task, expert in resolve_experts(manifest.experts).items()}
    options_by_task = {request.task: dict(request.options) for request in manifest.experts}
    inputs = check_inputs(manifest, options)  # before starting Ray or loading any weights
    started_ray = connect(address, config)
    install_sigterm_handler()  # ray.init replaces it with one that exits without cleaning up
    experts: ExpertGroup | None = None
    clean = False
    try:
        experts = ExpertGroup(classes, options_by_task, config, reuse=not started_ray)
        experts.start_first_replicas()
        experts.choose_batch_sizes(manifest.batch_size)
        fingerprints = Labeler(experts.proxies(), batch_size=manifest.batch_size).fingerprints
        weights = {task: replicas[0].info.get("weights", "") for task, replicas in experts.replicas.items()}
        prepared = prepare_run(manifest, options, names, fingerprints, inputs, weights)
        _label(prepared, manifest, experts, config, progress)
        clean = True
    finally:
        if experts is not None:
            experts.stop(clean)
        if started_ray:
            ray.shutdown()
    return prepared.summary


def _label(
    prepared: PreparedRun, manifest: Manifest, experts: ExpertGroup, config: RayRunnerConfig, progress: bool
) -> None:
    stats = RunStats(experts)
    try:
        if prepared.plans:
            ShardStream(prepared, manifest, experts, config, stats, progress).run()
        stats.status = "completed"
    except KeyboardInterrupt:
        stats.status = "interrupted"
        logger.warning(
            "interrupted: %d shards committed; run the same command again to resume",
            len(prepared.summary.results),
        )
        raise
    finally:
        try:
            stats.write(prepared)
        finally:
            finish_run(prepared)  # the lock is released whatever happened above


def connect(address: str | None, config: RayRunnerConfig) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        logger.info("using the Ray instance this process is already connected to")
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = config.runtime_env or None
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        logger.info("starting a local Ray instance (set RAY_ADDRESS or --address to use a cluster)")
        ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
    return True


# -- expert actors ---------------------------------------------------------------------------------
@dataclass
class Replica:
    task: str
    index: int
    actor: Any
    key: tuple
    info: dict[str, Any] = field(default_factory=dict)


class ActorCache:
    """Expert actors kept between runs of a driver that owns its Ray connection (tests, notebooks,
    benchmarks), so a model is loaded once per process rather than once per run. The CLI starts and
    stops Ray for each run, so there nothing is ever parked here."""

    def __init__(self) -> None:
        self.session: tuple[str, str] | None = None
        self.parked: dict[tuple, list[Any]] = {}

    def _sync(self) -> None:
        context = ray.get_runtime_context()
        session = (context.get_node_id(), context.get_job_id())
        if session != self.session:  # another Ray instance: the handles are dead
            self.session, self.parked = session, {}

    def take(self, key: tuple) -> Any | None:
        self._sync()
        actors = self.parked.get(key)
        return actors.pop() if actors else None

    def park(self, key: tuple, actor: Any) -> None:
        self._sync()
        self.parked.setdefault(key, []).append(actor)

    def evict(self) -> None:
        """End every parked actor this run did not take: they hold CPUs and GPUs."""
        self._sync()
        for actors in self.parked.values():
            for actor in actors:
                ray.kill(actor, no_restart=True)
        self.parked = {}


_CACHE = ActorCache()


def _preferred_batch_size(cls: type, gpus: float) -> int:
    """A GPU expert on a cluster with GPUs starts from its GPU batch size (Prismer's), else its CPU one."""
    gpu_size = getattr(cls, "GPU_BATCH_SIZE", None)
    return gpu_size if cls.spec.uses_gpu and gpus > 0 and gpu_size else cls.spec.batch_size


class ExpertGroup:
    """The expert actors of one run: their placement, their replicas and the proxies to them."""

    def __init__(
        self,
        classes: Mapping[str, type[Expert]],
        options: Mapping[str, dict],
        config: RayRunnerConfig,
        reuse: bool = False,
    ) -> None:
        self.classes, self.options, self.config, self.reuse = classes, options, config, reuse
        self.actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertActor)
        resources = ray.cluster_resources()
        self.gpus, self.cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        profiles = {
            task: ExpertProfile(task, cls.spec.uses_gpu, _preferred_batch_size(cls, self.gpus))
            for task, cls in classes.items()
        }
        self.placements: dict[str, Placement] = first_placements(profiles, config, self.gpus, self.cpus)
        self.replicas: dict[str, list[Replica]] = {task: [] for task in classes}
        self.launching: dict[Any, tuple[Replica, float]] = {}  # info() ref → replica still starting
        parked = _CACHE.take(("monitor",)) if reuse else None  # before _start evicts the rest
        self.monitor = parked or ray.remote(RunMonitor).options(num_cpus=0).remote(list(classes))
        self.monitor.reset.remote(list(classes))
        if self.gpus == 0 and any(p.uses_gpu for p in profiles.values()):
            logger.warning("the cluster has no GPUs: every expert runs on CPU")

    # -- starting replicas -------------------------------------------------------------------------
    def start_first_replicas(self) -> None:
        """One replica per expert (or the count fixed in the manifest); waits until all are loaded."""
        wanted = [
            (task, self._actor_key(task)) for task, p in self.placements.items() for _ in range(p.replicas)
        ]
        reused = [_CACHE.take(key) if self.reuse else None for _, key in wanted]
        _CACHE.evict()
        refs = {}
        for (task, key), actor in zip(wanted, reused):
            replica = Replica(task, len(self.replicas[task]), actor or self._create(task), key)
            self.replicas[task].append(replica)
            refs[replica.actor.info.remote()] = replica
        ready, pending = ray.wait(
            list(refs), num_returns=len(refs), timeout=self.config.actor_start_timeout_s
        )
        if pending:
            raise RuntimeError(self._not_started(refs[pending[0]]))
        for ref in ready:
            refs[ref].info = self._info(ref)
        logger.info("experts loaded:\n%s", self.describe_actors())

    def launch(self, counts: Mapping[str, int]) -> None:
        """Start more replicas without waiting: ``poll_launched`` adds them once loaded."""
        for task, count in counts.items():
            for _ in range(count):
                replica = Replica(task, -1, self._create(task), self._actor_key(task))
                self.launching[replica.actor.info.remote()] = (replica, time.monotonic())

    def poll_launched(self) -> bool:
        """Adopt the replicas that finished loading; True when the set of replicas changed."""
        if not self.launching:
            return False
        ready, _ = ray.wait(list(self.launching), num_returns=len(self.launching), timeout=0)
        changed = False
        for ref in ready:
            replica, _ = self.launching.pop(ref)
            try:
                replica.info = self._info(ref)
            except Exception as exc:  # noqa: BLE001 - an extra replica that fails is only a lost speed-up
                logger.warning(
                    "an extra %s replica failed to start (%s); running without it", replica.task, exc
                )
                self._drop(replica)
                continue
            replica.index = len(self.replicas[replica.task])
            self.replicas[replica.task].append(replica)
            changed = True
        for ref, (replica, since) in list(self.launching.items()):
            if time.monotonic() - since > self.config.actor_start_timeout_s:
                logger.warning("%s; running without it", self._not_started(replica))
                del self.launching[ref]
                self._drop(replica)
        return changed

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

    def _actor_key(self, task: str) -> tuple:
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
        return self.actor_class.options(
            num_gpus=placement.num_gpus,
            num_cpus=placement.num_cpus,
            max_restarts=self.config.max_restarts,
            max_task_retries=self.config.batch_retries,
        ).remote(self.classes[task], self.options[task], task)

    # -- planning ----------------------------------------------------------------------------------
    def choose_batch_sizes(self, manifest_batch_size: int | None) -> None:
        """Time a few synthetic batches at candidate sizes on each expert's first replica and keep the
        fastest (``choose_batch_size``), where neither the manifest nor a dependency fixes the size
        and ``calibrate_batch_size`` allows it (by default: replicas running on CUDA)."""
        if manifest_batch_size is not None:
            return  # the manifest's batch_size overrides every expert's
        timing = {}
        for task, placement in self.placements.items():
            replica = self.replicas[task][0]
            switch = self.config.calibrate_batch_size
            wanted = str(replica.info.get("device", "")).startswith("cuda") if switch is None else switch
            if wanted and task not in self.config.batch_sizes and not replica.info["spec"].requires:
                sizes = candidate_batch_sizes(placement.batch_size)
                timing[task] = replica.actor.time_batches.remote(sizes)
        for task, ref in timing.items():
            placement = self.placements[task]
            try:
                timings = ray.get(ref)
            except RayError as exc:  # a failed calibration only costs speed: keep the preferred size
                logger.warning("%s: batch-size calibration failed (%s)", task, str(exc).splitlines()[0])
                continue
            placement.batch_size = choose_batch_size(timings, placement.batch_size)
            measured = ", ".join(
                f"{size}: {'OOM' if s is None else f'{1 / s:.1f} img/s' if s else 'inf'}"
                for size, s in sorted(timings.items())
            )
            logger.info("%s: batch size %d (calibrated: %s)", task, placement.batch_size, measured)

    def calibrated(self, snapshot: Mapping[str, Any]) -> bool:
        """Every expert has finished ``calibration_batches`` batches after its warm-up batch."""
        counters = snapshot.get("experts", {})
        wanted = self.config.calibration_batches
        return wanted > 0 and all(
            counters.get(t, {}).get("warm_batches", 0) >= wanted for t in self.placements
        )

    def plan(self, snapshot: Mapping[str, Any], launch: bool) -> ReplicaPlan:
        """Plan replicas from the measured rates; ``launch`` starts the extra replicas (else the plan
        is only a record, and the placements stay as they are)."""
        placements = self.placements if launch else copy.deepcopy(self.placements)
        counters = snapshot.get("experts", {})
        for task, placement in placements.items():
            measured = counters.get(task, {})
            if measured.get("warm_images") and measured.get("warm_busy_s"):
                placement.images_per_s = measured["warm_images"] / measured["warm_busy_s"]
            if measured.get("oom_splits") and placement.batch_size > 1 and launch:
                placement.batch_size //= 2  # it ran out of memory: later shards use half the batch
        cpu = snapshot.get("cpu", {})
        cpu_seconds = cpu["seconds"] / cpu["images"] if cpu.get("images") else None
        before = {task: p.replicas for task, p in placements.items()}
        chunk = max(p.batch_size for p in placements.values())
        plan = plan_replicas(placements, self.config, self.gpus, self.cpus, chunk, cpu_seconds)
        if launch:
            self.launch({task: p.replicas - before[task] for task, p in self.placements.items()})
            self.fit_shard_cpus(plan)
        return plan

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

    def _all_replicas(self) -> list[Replica]:
        return [r for replicas in self.replicas.values() for r in replicas]

    def describe_actors(self) -> str:
        lines = []
        for task, replicas in self.replicas.items():
            for r in replicas:
                gpus = ",".join(r.info.get("gpu_ids", [])) or "-"
                lines.append(
                    f"  {task}[{r.index}] node {r.info.get('node')} pid {r.info.get('pid')} "
                    f"GPU {gpus} device {r.info.get('device')}"
                )
        return "\n".join(lines)

    def proxies(self) -> dict[str, ExpertProxy]:
        policy = FaultPolicy(self.config.quarantine_after, self.config.actor_start_timeout_s)
        proxies = {}
        for task, replicas in self.replicas.items():
            info = replicas[0].info
            fingerprints = {r.info["fingerprint"] for r in replicas}
            if len(fingerprints) != 1:
                raise RuntimeError(f"{task}: replicas disagree on the fingerprint: {sorted(fingerprints)}")
            cls = self.classes[task]
            proxies[task] = ExpertProxy(
                spec_with_batch_size(info["spec"], self.placements[task].batch_size),
                info["fingerprint"],
                [r.actor for r in replicas],
                self.monitor,
                policy,
                encode_override=None if cls.encode is Expert.encode else cls.encode,
            )
        return proxies

    def stop(self, clean: bool) -> None:
        """Park the actors for the next run (``reuse`` and a clean finish), else end them."""
        replicas = self._all_replicas()
        for replica, _ in self.launching.values():
            ray.kill(replica.actor, no_restart=True)
        if self.reuse and clean:
            for replica in replicas:
                _CACHE.park(replica.key, replica.actor)
            _CACHE.park(("monitor",), self.monitor)
            return
        closing = [r.actor.close.remote() for r in replicas]
        ray.wait(closing, num_returns=len(closing), timeout=5)
        for actor in [*(r.actor for r in replicas), self.monitor]:
            ray.kill(actor, no_restart=True)


# -- streaming shards ------------------------------------------------------------------------------
class ShardStream:
    """Keeps a bounded number of shard tasks running; collects, retries and records them, and
    re-plans the replicas once the first batches have calibrated the experts."""

    def __init__(
        self,
        prepared: PreparedRun,
        manifest: Manifest,
        experts: ExpertGroup,
        config: RayRunnerConfig,
        stats: RunStats,
        progress: bool,
    ) -> None:
        self.prepared, self.manifest, self.config = prepared, manifest, config
        self.experts, self.stats = experts, stats
        chunk = max(p.batch_size for p in experts.placements.values())
        self.plan = plan_replicas(experts.placements, config, experts.gpus, experts.cpus, chunk, None)
        experts.fit_shard_cpus(self.plan)  # the plan before calibration: one replica per expert
        self.calibrating = config.calibration_batches > 0
        self.task = ray.remote(max_retries=0, retry_exceptions=False)(label_shard)  # retried here
        self.source = ray.put(prepared.source)
        self.context = self._context()
        self.view = LiveView(len(prepared.plans), experts, config.progress_interval_s, progress)
        logger.info(
            "labelling %d shards, %d at a time%s",
            len(prepared.plans),
            self.plan.shards_in_flight,
            "; replicas are planned after the first batches" if self.calibrating else "",
        )

    def _context(self) -> Any:
        proxies = self.experts.proxies()
        return ray.put(
            ShardContext(
                self.prepared.store.url,
                self.manifest.decode,
                proxies,
                self.manifest.batch_size,
                self.experts.monitor,
            )
        )

    def run(self) -> None:
        pending = deque((plan, 1) for plan in self.prepared.plans)
        running: dict[Any, tuple[ShardPlan, int]] = {}
        self.stats.started = time.time()
        try:
            while pending or running:
                while pending and len(running) < self.plan.shards_in_flight:
                    plan, attempt = pending.popleft()
                    task = self.task.options(num_cpus=self.plan.shard_cpus)
                    running[task.remote(plan, self.source, self.context)] = (plan, attempt)
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    plan, attempt = running.pop(ref)
                    if self._collect(ref, plan, attempt):
                        pending.append((plan, attempt + 1))
                snapshot = monitor_snapshot(self.experts.monitor)
                self._replan(snapshot)
                self.view.tick(snapshot, len(running), len(pending))
        finally:
            self._cancel(running)
            self.stats.finished = time.time()
            self.stats.monitor = monitor_snapshot(self.experts.monitor)
            if self.calibrating:  # never calibrated during the run: plan now, for the record
                self.plan = self.experts.plan(self.stats.monitor, launch=False)
                logger.info("replica plan from this run's measurements:\n%s", self.plan.describe())
            self.stats.plan = self.plan
            order = {plan.shard.shard_id: i for i, plan in enumerate(self.prepared.plans)}
            self.prepared.summary.results.sort(key=lambda result: order[result.shard_id])
            self.view.close()

    def _replan(self, snapshot: Mapping[str, Any]) -> None:
        if self.calibrating and self.experts.calibrated(snapshot):
            self.calibrating = False
            self.plan = self.experts.plan(snapshot, launch=True)
            self.context = self._context()  # batch sizes halved after an OOM apply from now on
            cluster = f"{self.experts.gpus:g} GPUs, {self.experts.cpus:g} CPUs"
            logger.info("replica plan (%s):\n%s", cluster, self.plan.describe())
        if self.experts.poll_launched():
            self.context = self._context()  # shards submitted from now on use the new replicas
            logger.info("replicas now:\n%s", self.experts.describe_actors())

    def _collect(self, ref: Any, plan: ShardPlan, attempt: int) -> bool:
        """Record a finished shard task; True when it failed and should run again."""
        shard_id = plan.shard.shard_id
        try:
            result: ShardResult = ray.get(ref)
        except RayTaskError as exc:  # the shard raised: as in the local runner, it fails, the run goes on
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            error = f"{type(cause).__name__}: {cause}" if cause else str(exc).splitlines()[0]
            logger.debug("shard %s failed:\n%s", shard_id, exc)
        except RayError as exc:  # the task's worker or node died
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        else:
            self.prepared.summary.results.append(result)
            self.stats.samples += result.record["samples"]
            self.view.shard_done(result.record["samples"])
            return False
        if attempt < self.config.shard_attempts:
            logger.warning("shard %s failed (attempt %d, retrying): %s", shard_id, attempt, error)
            self.stats.shard_retries += 1
            return True
        logger.error("shard %s failed %d times, recorded as failed: %s", shard_id, attempt, error)
        self.prepared.summary.failed_shards[shard_id] = error
        self.prepared.store.write_failed(shard_id, error, attempts=attempt)
        self.view.shard_done(0)
        return False

    def _cancel(self, running: Mapping[Any, tuple[ShardPlan, int]]) -> None:
        """Stop the shards in flight at their next chunk: they remove their temp tars, and nothing is
        committed half-way. (A cooperative stop: cancelling Ray tasks as they complete can crash the
        driver in Ray 2.60.)"""
        if not running:
            return
        logger.info("stopping %d shards in flight", len(running))
        self.experts.monitor.stop.remote()
        finished, stuck = ray.wait(list(running), num_returns=len(running), timeout=CANCEL_GRACE_S)
        for ref in finished:  # a shard that committed before it saw the stop counts as committed
            try:
                result = ray.get(ref)
            except RayError:
                continue
            self.prepared.summary.results.append(result)
        for ref in stuck:
            ray.cancel(ref, force=True)  # a chunk slower than the grace period; the next run cleans up
