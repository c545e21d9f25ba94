"""The Ray runner's driver: expert replicas as actors (pinned to GPUs), shards as CPU tasks, the same
output bytes as the local runner (the shard tasks run the core's ``run_shard`` and ``Labeler``).

1. connect to a cluster (``--address`` / ``RAY_ADDRESS``) or start a local Ray;
2. start one actor per expert, read each expert's fingerprint and batch size from it (calibrating
   the batch size on CUDA replicas), lock and plan the output;
3. stream shards through ``label_shard`` tasks, a bounded number at a time; each commits on its
   own, in any order; a shard that fails is retried, then recorded as failed, and the run goes on;
4. once every expert has finished a few batches (after a warm-up batch per replica), the planner
   (``ray_planner``) adds replicas to the bottleneck while the cluster has room and logs the plan
   with its predicted images/s; shards submitted after they load use them;
5. write ``OUT/stats/ray-*.json`` and release the actors.

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
from label_pipeline.runners.ray_executor import label_shard
from label_pipeline.runners.ray_planner import plan_replicas
from label_pipeline.runners.ray_pool import ActorCache, ExpertPool
from label_pipeline.runners.ray_stats import LiveView, RunStats, monitor_snapshot
from label_pipeline.shard_job import ShardPlan, ShardResult

logger = logging.getLogger(__name__)
CANCEL_GRACE_S = 30.0


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
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A local Ray's actors read this machine's caches: every missing weight is one message, before
        # Ray starts. On a cluster each node resolves its own (its cache, its network).
        require_weights([source for expert in resolved.values() for source in expert.weight_sources()])
    started_ray = connect(address, config)
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
        _label(prepared, pool, config, progress)
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


def _label(prepared: PreparedRun, pool: ExpertPool, config: RayRunnerConfig, progress: bool) -> None:
    stats = RunStats()
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


# -- streaming shards ------------------------------------------------------------------------------
class ShardStream:
    """Keeps a bounded number of shard tasks running; collects, retries and records them, and
    re-plans the replicas once the first batches have calibrated the experts."""

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
        self.task = ray.remote(max_retries=0, retry_exceptions=False)(label_shard)  # retried here
        self.source = ray.put(prepared.source)
        self.context = self._context()
        self.view = LiveView(len(prepared.plans), config.progress_interval_s, progress)
        logger.info(
            "labelling %d shards, %d at a time%s",
            len(prepared.plans),
            self.plan.shards_in_flight,
            "; replicas are planned after the first batches" if self.calibrating else "",
        )

    def _context(self) -> Any:
        return ray.put(self.pool.shard_context(self.prepared.store.url, self.prepared.manifest.decode))

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
                snapshot = monitor_snapshot(self.pool.monitor)
                self._replan(snapshot)
                self.view.tick(snapshot, self.pool.view(), len(running), len(pending))
        finally:
            self._cancel(running)
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
            self.calibrating = False
            self.plan = self.pool.plan(snapshot, launch=True)
            cluster = f"{self.pool.gpus:g} GPUs, {self.pool.cpus:g} CPUs"
            logger.info("replica plan (%s):\n%s", cluster, self.plan.describe())
        if self.pool.poll_launched():
            self.context = self._context()  # shards submitted from now on use the new replicas
            logger.info("replicas now:\n%s", self.pool.describe_actors())

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
            self.stats.add_samples(result.record["samples"])
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
