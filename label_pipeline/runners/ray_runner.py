"""The Ray runner's driver: expert replicas as actors (pinned to GPUs), shards as CPU tasks, the same
output bytes as the local runner (the shard tasks run the core's ``run_shard`` and ``Labeler``).

1. connect to a cluster (``--address`` / ``RAY_ADDRESS``, or one ``ray start`` left running on this
   machine: well under a second) or start a local Ray (seconds: its processes start);
2. start one actor per expert, read each expert's fingerprint and batch size from it (calibrating
   the batch size on CUDA replicas), lock and plan the output;
3. stream shards through ``label_shard`` tasks, a bounded number at a time; each commits on its
   own, in any order; a shard that fails is retried, then recorded as failed, and the run goes on;
4. once every expert has finished a few batches (after a warm-up batch per replica), the planner
   (``ray_planner``) sizes every expert's share of the cluster from the measured rates and logs the
   plan with its predicted images/s; shards submitted after the new replicas load use them, and the
   replicas they replace are retired once no running shard can call them;
5. when nodes leave or join, their replicas are ended or planned anew (shards that lost an expert
   run again, without counting it as a failed attempt);
6. write ``OUT/stats/ray-*.json`` and release the actors.

Ctrl-C cancels the shards in flight (their temp files are removed) and leaves a resumable output.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from expert_zoo.registry import available, resolve_experts, resolve_name
from label_pipeline.config import Manifest
from label_pipeline.core.signals import install_sigterm_handler
from label_pipeline.core.weights import require_weights
from label_pipeline.run import PreparedRun, RunOptions, RunSummary, check_inputs, finish_run, prepare_run
from label_pipeline.runners.ray_config import RayRunnerConfig, parse_ray_config
from label_pipeline.runners.ray_executor import ShardAbandoned, label_shard
from label_pipeline.runners.ray_planner import plan_replicas
from label_pipeline.runners.ray_pool import ActorCache, ExpertPool
from label_pipeline.runners.ray_stats import LiveView, RunStats, monitor_snapshot
from label_pipeline.shard_job import ShardPlan, ShardResult

logger = logging.getLogger(__name__)
CANCEL_GRACE_S = 30.0
NODE_CHECK_S = 2.0  # how often the driver looks for nodes that left or joined
MAX_ABANDONS = 20  # runs of one shard abandoned because the cluster changed, before it counts as failed


def run_ray(
    manifest: Manifest,
    options: RunOptions,
    address: str | None = None,
    progress: bool = True,
    actor_cache: ActorCache | None = None,
) -> RunSummary:
    """Label ``manifest`` on a Ray cluster; the output is byte-identical to ``run_local``'s.

    ``actor_cache`` keeps the expert actors for the next run of a driver that stays connected to
    Ray (unused when this call starts Ray itself).
    """
    known = {name.partition(":")[0] for name in available()} | {r.task for r in manifest.experts}
    config = parse_ray_config(manifest.runner, known)
    names = {request.task: resolve_name(request) for request in manifest.experts}
    # Fails fast, here: every name and option is checked before Ray starts or a model loads.
    resolved = resolve_experts(manifest.experts)
    classes = {task: expert.cls for task, expert in resolved.items()}
    inputs = check_inputs(manifest, options)  # before starting Ray or loading any weights
    if (address or os.environ.get("RAY_ADDRESS")) in (None, "", "local"):
        # A local Ray's actors read this machine's caches: every missing weight is one message, before
        # Ray starts. On a cluster each node resolves its own (its cache, its network).
        require_weights([source for expert in resolved.values() for source in expert.weight_sources()])
    started = time.perf_counter()
    started_ray = connect(address, config)
    connect_s = time.perf_counter() - started
    install_sigterm_handler()  # ray.init replaces it with one that exits without cleaning up
    pool: ExpertPool | None = None
    clean = False
    try:
        pool = ExpertPool(
            classes, actor_options(manifest, config), config, None if started_ray else actor_cache
        )
        pool.start()
        pool.choose_batch_sizes()
        prepared = prepare_run(manifest, options, names, pool.fingerprints(), inputs, pool.weights())
        _label(prepared, pool, config, progress, connect_s)
        clean = True
    finally:
        if pool is not None:
            pool.stop(clean)
        if started_ray:
            ray.shutdown()
    return prepared.summary


def actor_options(manifest: Manifest, config: RayRunnerConfig) -> dict[str, dict[str, Any]]:
    """Each expert's options; ``runner.ray.batch_sizes`` is its ``batch_size`` option on this runner."""
    options = {request.task: dict(request.options) for request in manifest.runnable_experts()}
    for task, size in config.batch_sizes.items():
        if task in options:
            options[task]["batch_size"] = size
    return options


def _label(
    prepared: PreparedRun, pool: ExpertPool, config: RayRunnerConfig, progress: bool, connect_s: float
) -> None:
    stats = RunStats(connect_s=connect_s)
    try:
        if prepared.plans:
            ShardStream(prepared, pool, config, stats, progress).run()
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
            stats.write(prepared, pool.view())
        finally:
            finish_run(prepared)  # the lock is released whatever happened above


def connect(address: str | None, config: RayRunnerConfig) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``, or a ``ray start`` cluster running on this machine), or
    start a local Ray; True when this call connected (and ``ray.shutdown`` is ours to call)."""
    if ray.is_initialized():
        logger.info("using the Ray instance this process is already connected to")
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = config.runtime_env or None
    started = time.perf_counter()
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # Ray's own rule: join the cluster `ray start` left running on this machine, if any, else
        # start a private one (its processes start, and stop at the end of the run: seconds);
        # "local" always starts a private one.
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
    elapsed = time.perf_counter() - started
    where = ray.get_runtime_context().gcs_address
    if _started_here():
        logger.info(
            "started a local Ray instance in %.2f s (to reuse one between runs: `ray start --head`, "
            "then RAY_ADDRESS=auto; see docs/CLUSTER.md)",
            elapsed,
        )
    else:
        logger.info("connected to the Ray cluster at %s in %.2f s", where, elapsed)
    return True


def _started_here() -> bool:
    """Whether ``ray.init`` started the Ray processes itself (rather than joining a cluster)."""
    node = getattr(ray._private.worker, "_global_node", None)  # no public API tells the two apart
    return bool(getattr(node, "head", False))


# -- streaming shards ------------------------------------------------------------------------------
class ShardStream:
    """Keeps a bounded number of shard tasks running; collects, retries and records them, re-plans
    the replicas once the first batches have calibrated the experts and whenever nodes leave or join,
    and retires replaced replicas once no running shard task can call them."""

    def __init__(
        self,
        prepared: PreparedRun,
        pool: ExpertPool,
        config: RayRunnerConfig,
        stats: RunStats,
        progress: bool,
    ) -> None:
        self.prepared, self.pool, self.config, self.stats = prepared, pool, config, stats
        self.plan = plan_replicas(pool.placements, config, pool.gpus, pool.cpus, pool.chunk_size(), None)
        pool.fit_shard_cpus(self.plan)  # the plan before calibration: one replica per expert
        self.calibrating = config.calibration_batches > 0
        self.planned = False
        self.starting_plan = False  # a plan's replicas are still starting
        self.task = ray.remote(max_retries=0, retry_exceptions=False)(label_shard)  # retried here
        self.source = ray.put(prepared.source)
        self.generation = 0  # of the shard context: it changes with the replicas in service
        self.context = self._context()
        self.abandons: dict[str, int] = {}
        self.next_node_check = time.monotonic() + NODE_CHECK_S
        self.view = LiveView(len(prepared.plans), config.progress_interval_s, progress)
        logger.info(
            "labelling %d shards, %d at a time%s",
            len(prepared.plans),
            self.plan.shards_in_flight,
            "; replicas are planned after the first batches" if self.calibrating else "",
        )

    def _context(self) -> Any:
        store, decode = self.prepared.store.url, self.prepared.manifest.decode
        return ray.put(self.pool.shard_context(store, decode, self.generation))

    def run(self) -> None:
        pending = deque((plan, 1) for plan in self.prepared.plans)
        running: dict[Any, tuple[ShardPlan, int, int]] = {}  # ref → plan, attempt, context generation
        self.stats.started = time.time()
        try:
            while pending or running:
                while pending and len(running) < self.plan.shards_in_flight and self.pool.ready():
                    plan, attempt = pending.popleft()
                    task = self.task.options(num_cpus=self.plan.shard_cpus)
                    ref = task.remote(plan, self.source, self.context)
                    running[ref] = (plan, attempt, self.generation)
                    if not pending:
                        self.stats.event("all submitted")  # the drain begins
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    plan, attempt, _ = running.pop(ref)
                    retry = self._collect(ref, plan, attempt)
                    if retry == attempt:  # abandoned: first in line once the replicas are back
                        pending.appendleft((plan, retry))
                    elif retry is not None:
                        pending.append((plan, retry))
                snapshot = monitor_snapshot(self.pool.monitor)
                self.stats.monitor = snapshot  # the latest counters, for the events
                self._watch_nodes(snapshot)
                self._replan(snapshot)
                self._release_retired(running, snapshot)
                self.view.tick(snapshot, self.pool.view(), len(running), len(pending))
        finally:
            self._cancel({ref: (plan, attempt) for ref, (plan, attempt, _) in running.items()})
            self.stats.finished = time.time()
            self.stats.monitor = monitor_snapshot(self.pool.monitor)
            if self.calibrating:  # never calibrated during the run: plan now, for the record
                self.plan = self.pool.plan(self.stats.monitor, launch=False)
                logger.info("replica plan from this run's measurements:\n%s", self.plan.describe())
            self.stats.plan = self.plan
            order = {plan.shard.shard_id: i for i, plan in enumerate(self.prepared.plans)}
            self.prepared.summary.results.sort(key=lambda result: order[result.shard_id])
            self.view.close()

    def _replan(self, snapshot: Mapping[str, Any]) -> None:
        if self.calibrating and self.pool.calibrated(snapshot):
            self.calibrating, self.planned = False, True
            self._plan(snapshot, "replica plan")
        if self.pool.poll_launched():
            self._new_context()
            self.stats.event("replicas", **self._replica_counts())
            logger.info("replicas now:\n%s", self.pool.describe_actors())
        if self.starting_plan and not self.pool.launching:
            self.starting_plan = False
            self.stats.event("plan in service", **self._replica_counts())

    def _release_retired(
        self, running: Mapping[Any, tuple[ShardPlan, int, int]], snapshot: Mapping[str, Any]
    ) -> None:
        """Kill the retired replicas once every running shard task labels with newer ones: it started
        with a newer context, or switched to one before its latest chunk (the monitor's ``acks``)."""
        acks = snapshot.get("acks", {})
        generations = [max(g, acks.get(plan.shard.shard_id, -1)) for plan, _, g in running.values()]
        self.pool.release_retired(min(generations, default=self.generation))

    def _new_context(self) -> None:
        """Shards submitted from now on, and the running ones from their next chunk, use the replicas
        in service now; the retired ones are killed once every running shard has switched."""
        self.generation += 1
        if self.pool.ready():  # else no shard is submitted until the missing experts are back
            self.context = self._context()
        self.pool.mark_retired(self.generation)

    def _plan(self, snapshot: Mapping[str, Any], what: str) -> None:
        self.plan = self.pool.plan(snapshot, launch=True)
        self.starting_plan = True
        cluster = f"{self.pool.gpus:g} GPUs, {self.pool.cpus:g} CPUs"
        logger.info("%s (%s):\n%s", what, cluster, self.plan.describe())
        predicted = self.plan.predicted_images_per_s
        self.stats.event(
            "plan",
            gpus=self.pool.gpus,
            cpus=self.pool.cpus,
            predicted_images_per_s=predicted,
            shares={task: list(p.shares) for task, p in self.plan.experts.items()},
        )

    def _watch_nodes(self, snapshot: Mapping[str, Any]) -> None:
        """Nodes that left or joined: end the lost replicas, and plan again for the new cluster."""
        if time.monotonic() < self.next_node_check:
            return
        self.next_node_check = time.monotonic() + NODE_CHECK_S
        if not self.pool.check_nodes():
            return
        self.stats.event("nodes", nodes=len(self.pool.nodes), gpus=self.pool.gpus, cpus=self.pool.cpus)
        if self.planned:
            self._plan(snapshot, "replica plan for the changed cluster")
        else:
            self.pool.restore_missing()  # calibration goes on with one replica per expert
        self.pool.poll_launched()
        self._new_context()  # without the lost replicas

    def _replica_counts(self) -> dict[str, Any]:
        return {task: len(replicas) for task, replicas in self.pool.replicas.items()}

    def _collect(self, ref: Any, plan: ShardPlan, attempt: int) -> int | None:
        """Record a finished shard task; the attempt to run it again with, or None when it is done
        (committed, or recorded as failed). A shard abandoned because the cluster changed runs
        again as the same attempt (up to ``MAX_ABANDONS`` times)."""
        shard_id = plan.shard.shard_id
        try:
            result: ShardResult = ray.get(ref)
        except RayTaskError as exc:  # the shard raised: as in the local runner, it fails, the run goes on
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if isinstance(cause, ShardAbandoned) and self.abandons.get(shard_id, 0) < MAX_ABANDONS:
                self.abandons[shard_id] = self.abandons.get(shard_id, 0) + 1
                self.stats.shards_abandoned += 1
                logger.warning("%s; running it again", cause)
                return attempt
            error = f"{type(cause).__name__}: {cause}" if cause else str(exc).splitlines()[0]
            logger.debug("shard %s failed:\n%s", shard_id, exc)
        except RayError as exc:  # the task's worker or node died
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        else:
            self.prepared.summary.results.append(result)
            self.stats.add_samples(result.record["samples"])
            self.view.shard_done(result.record["samples"])
            return None
        if attempt < self.config.shard_attempts:
            logger.warning("shard %s failed (attempt %d, retrying): %s", shard_id, attempt, error)
            self.stats.shard_retries += 1
            return attempt + 1
        logger.error("shard %s failed %d times, recorded as failed: %s", shard_id, attempt, error)
        self.prepared.summary.failed_shards[shard_id] = error
        self.prepared.store.write_failed(shard_id, error, attempts=attempt)
        self.view.shard_done(0)
        return None

    def _cancel(self, running: Mapping[Any, tuple[ShardPlan, int]]) -> None:
        """Stop the shards in flight at their next chunk: they remove their temp tars, and nothing is
        committed half-way. (A cooperative stop: cancelling Ray tasks as they complete can crash the
        driver in Ray 2.60.)"""
        if not running:
            return
        logger.info("stopping %d shards in flight", len(running))
        self.pool.monitor.stop.remote()
        finished, stuck = ray.wait(list(running), num_returns=len(running), timeout=CANCEL_GRACE_S)
        for ref in finished:  # a shard that committed before it saw the stop counts as committed
            try:
                result = ray.get(ref)
            except RayError:
                continue
            self.prepared.summary.results.append(result)
        for ref in stuck:
            ray.cancel(ref, force=True)  # a chunk slower than the grace period; the next run cleans up
