"""The Ray runner: expert replicas as actors (pinned to GPUs), shards as CPU tasks, same output bytes.

The driver does what the local runner does (``prepare_run`` → one ``run_shard`` per planned shard →
``finish_run``); only *where* things run changes:

1. connect to a cluster (``--address`` / ``RAY_ADDRESS``) or start a local Ray;
2. start one actor per expert, read each expert's fingerprint from it, lock and plan the output;
3. calibrate (a few timed batches per expert on images of the first shard) and add replicas to the
   bottleneck expert while the cluster has room (``ray_planner``); print the plan;
4. stream shards through ``label_shard`` tasks, a bounded number at a time; each commits on its
   own, in any order; a shard that fails is retried, then recorded as failed, and the run goes on;
5. write ``OUT/stats/ray-*.json`` (per-expert busy time, latency histograms, faults) and release.

Ctrl-C cancels the shards in flight (their temp files are removed) and leaves a resumable output.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from expert_zoo.base import Expert
from expert_zoo.registry import available, expert_class, resolve_name
from label_pipeline.config import Manifest
from label_pipeline.decode import DecodeError, decode_image
from label_pipeline.format import encode_json
from label_pipeline.labeler import Labeler
from label_pipeline.progress import Progress
from label_pipeline.run import PreparedRun, RunOptions, RunSummary, finish_run, prepare_run
from label_pipeline.runners.ray_actors import (
    CONCURRENCY_GROUPS,
    ExpertActor,
    ExpertOOM,
    ExpertProxy,
    FaultPolicy,
    RunMonitor,
    ShardContext,
    dependency_levels,
    label_shard,
    spec_with_batch_size,
)
from label_pipeline.runners.ray_config import RayRunnerConfig, parse_ray_config
from label_pipeline.runners.ray_planner import (
    ExpertProfile,
    Placement,
    ReplicaPlan,
    first_placements,
    plan_replicas,
)
from label_pipeline.shard_job import ShardPlan, ShardResult
from label_pipeline.sources.base import ShardReadReport, Source

logger = logging.getLogger(__name__)
SHARD_ERRORS = (OSError, ValueError, RuntimeError)  # as the local runner: the shard fails, the run goes on
CALIBRATION_IMAGES = 64
CANCEL_GRACE_S = 10.0


def run_ray(
    manifest: Manifest, options: RunOptions, address: str | None = None, progress: bool = True
) -> RunSummary:
    """Label ``manifest`` on a Ray cluster; the output is byte-identical to ``run_local``'s."""
    known = {name.partition(":")[0] for name in available()} | {r.task for r in manifest.experts}
    config = parse_ray_config(manifest.runner, known)
    names = {request.task: resolve_name(request) for request in manifest.experts}
    classes = {task: expert_class(name) for task, name in names.items()}  # fails fast, here
    options_by_task = {request.task: dict(request.options) for request in manifest.experts}
    started_ray = connect(address, config)
    experts: ExpertGroup | None = None
    clean = False
    try:
        experts = ExpertGroup(classes, options_by_task, config, reuse=not started_ray)
        experts.start_first_replicas()
        fingerprints = Labeler(experts.proxies(), batch_size=manifest.batch_size).fingerprints
        prepared = prepare_run(manifest, options, names, fingerprints)
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
    stats = RunStats(prepared.store.url, experts)
    try:
        if prepared.plans:
            experts.scale(calibrate(experts, prepared, manifest))
            stats.plan = experts.plan
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
        stats.write(prepared)
        finish_run(prepared)


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
            task: ExpertProfile(task, cls.spec.uses_gpu, cls.spec.batch_size) for task, cls in classes.items()
        }
        self.placements: dict[str, Placement] = first_placements(profiles, config, self.gpus, self.cpus)
        self.plan: ReplicaPlan | None = None
        self.replicas: dict[str, list[Replica]] = {task: [] for task in classes}
        parked = _CACHE.take(("monitor",)) if reuse else None  # before _start evicts the rest
        self.monitor = parked or ray.remote(RunMonitor).options(num_cpus=0).remote(list(classes))
        self.monitor.reset.remote(list(classes))
        if self.gpus == 0 and any(p.uses_gpu for p in profiles.values()):
            logger.warning("the cluster has no GPUs: every expert runs on CPU")

    def start_first_replicas(self) -> None:
        """One replica per expert (``replicas`` fixed in the manifest are all started here)."""
        self._start({task: placement.replicas for task, placement in self.placements.items()})

    def _start(self, counts: Mapping[str, int], required: bool = True) -> None:
        wanted = [(task, self._actor_key(task)) for task, count in counts.items() for _ in range(count)]
        reused = [_CACHE.take(key) if self.reuse else None for _, key in wanted]
        _CACHE.evict()
        new: list[Replica] = []
        for (task, key), actor in zip(wanted, reused):
            replica = Replica(task, len(self.replicas[task]), actor or self._create(task), key)
            self.replicas[task].append(replica)
            new.append(replica)
        self._await_ready(new, required)

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

    def _await_ready(self, new: list[Replica], required: bool) -> None:
        refs = {replica.actor.info.remote(): replica for replica in new}
        ready, pending = ray.wait(
            list(refs), num_returns=len(refs), timeout=self.config.actor_start_timeout_s
        )
        for ref in ready:
            replica = refs[ref]
            try:
                replica.info = ray.get(ref)
            except RayTaskError as exc:
                if isinstance(exc.cause, Exception):
                    raise exc.cause from None  # e.g. ExpertUnavailable: the CLI's usage error
                raise
        for ref in pending:
            replica = refs[ref]
            placement = self.placements[replica.task]
            message = (
                f"{replica.task} replica {replica.index} did not start within "
                f"{self.config.actor_start_timeout_s:g}s (it needs {placement.num_gpus:g} GPU and "
                f"{placement.num_cpus:g} CPU; the cluster has {self.gpus:g} GPU, {self.cpus:g} CPU)"
            )
            if required:
                raise RuntimeError(message)
            logger.warning("%s; running without it", message)
            ray.kill(replica.actor)
            self.replicas[replica.task].remove(replica)
            self.placements[replica.task].replicas -= 1

    def scale(self, calibration: Calibration) -> None:
        """Plan replicas from the calibration and start the extra ones."""
        for task, seconds in calibration.seconds_per_image.items():
            self.placements[task].images_per_s = 1 / seconds if seconds else None
        chunk = max(p.batch_size for p in self.placements.values())
        before = {task: p.replicas for task, p in self.placements.items()}
        self.plan = plan_replicas(
            self.placements, self.config, self.gpus, self.cpus, chunk, calibration.cpu_seconds_per_image
        )
        self._start({task: p.replicas - before[task] for task, p in self.placements.items()}, required=False)
        self._fit_shard_cpus(self.plan)
        logger.info("replica plan (%g GPUs, %g CPUs):\n%s", self.gpus, self.cpus, self.plan.describe())
        logger.info("actors:\n%s", self.describe_actors())

    def _fit_shard_cpus(self, plan: ReplicaPlan) -> None:
        """Shard tasks reserve at most what is free now (other jobs may share the cluster): a
        reservation nobody can satisfy would stall the run."""
        if self.config.shard_cpus is not None:
            return
        free = float(ray.available_resources().get("CPU", 0.0))
        fitting = math.floor(free / plan.shards_in_flight * 10_000) / 10_000
        if fitting < plan.shard_cpus:
            logger.info("only %g CPUs free: shard tasks reserve %g CPU each", free, fitting)
            plan.shard_cpus = fitting

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
                raise RuntimeError(
                    f"{task}: replicas disagree on the expert's fingerprint {sorted(fingerprints)}"
                )
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
        replicas = [r for task_replicas in self.replicas.values() for r in task_replicas]
        if self.reuse and clean:
            for replica in replicas:
                _CACHE.park(replica.key, replica.actor)
            _CACHE.park(("monitor",), self.monitor)
            return
        closing = [r.actor.close.remote() for r in replicas]
        ray.wait(closing, num_returns=len(closing), timeout=5)
        for actor in [*(r.actor for r in replicas), self.monitor]:
            ray.kill(actor, no_restart=True)


# -- calibration -----------------------------------------------------------------------------------
@dataclass
class Calibration:
    seconds_per_image: dict[str, float | None]
    cpu_seconds_per_image: float | None


def calibrate(experts: ExpertGroup, prepared: PreparedRun, manifest: Manifest) -> Calibration:
    """Time a few batches per expert (after one warm-up) on images of the first shard to label."""
    rounds = experts.config.calibration_batches
    tasks = list(experts.placements)
    if rounds == 0:
        return Calibration(dict.fromkeys(tasks), None)
    images, decode_s = _calibration_images(prepared.source, prepared.plans[0], manifest)
    if not images:
        logger.warning(
            "no decodable image in shard %s: skipping calibration", prepared.plans[0].shard.shard_id
        )
        return Calibration(dict.fromkeys(tasks), None)
    proxies = experts.proxies()
    seconds: dict[str, float | None] = {}
    encode_s = 0.0
    for level in dependency_levels(tasks, proxies):
        for task in level:
            try:
                labels, seconds[task] = _time_expert(experts, task, proxies, images, rounds)
            except (RayError, KeyError) as exc:
                logger.warning(
                    "calibration of %s failed (%s); it is planned without a measurement", task, exc
                )
                seconds[task] = None
                continue
            started = time.perf_counter()
            for label in labels:
                proxies[task].encode(label)
            encode_s += (time.perf_counter() - started) / len(labels)
    return Calibration(seconds, decode_s + encode_s)


def _time_expert(
    experts: ExpertGroup, task: str, proxies: Mapping[str, ExpertProxy], images: list, rounds: int
) -> tuple[list, float]:
    """(labels, seconds per image) of one replica; an out-of-memory batch halves the batch size."""
    placement = experts.placements[task]
    while True:
        batch = [images[i % len(images)] for i in range(placement.batch_size)]
        try:
            deps = {dep: _call(experts.replicas[dep][0].actor, batch, {})[0] for dep in _deps(task, proxies)}
            actor = experts.replicas[task][0].actor
            labels, _ = _call(actor, batch, deps)  # warm-up
            timed = [_call(actor, batch, deps)[1] for _ in range(rounds)]
            return labels, sum(timed) / (rounds * len(batch))
        except RayTaskError as exc:
            if not isinstance(exc.cause, ExpertOOM) or placement.batch_size == 1:
                raise
            placement.batch_size //= 2
            logger.warning("%s ran out of memory in calibration; batch size %d", task, placement.batch_size)


def _deps(task: str, proxies: Mapping[str, ExpertProxy]) -> list[str]:
    requires = proxies[task].spec.requires
    missing = [dep for dep in requires if dep not in proxies]
    if missing:
        raise KeyError(f"needs {missing}, not in this run")
    return list(requires)


def _call(actor: Any, images: list, deps: dict) -> tuple[list, float]:
    return ray.get(actor.predict.remote(ray.put(images), list(range(len(images))), deps, uuid.uuid4().hex))


def _calibration_images(source: Source, plan: ShardPlan, manifest: Manifest) -> tuple[list, float]:
    """Decoded images from the start of a shard, and the decode time per image."""
    images, elapsed = [], 0.0
    try:
        for sample in source.read(plan.shard, ShardReadReport()):
            if sample.image is None:
                continue
            started = time.perf_counter()
            try:
                image = decode_image(
                    sample.image, max_pixels=manifest.decode.max_pixels, min_side=manifest.decode.min_side
                )
            except DecodeError:
                continue
            elapsed += time.perf_counter() - started
            images.append(image.array)
            if len(images) == CALIBRATION_IMAGES:
                break
    except (OSError, ValueError) as exc:
        logger.warning("could not read shard %s for calibration: %s", plan.shard.shard_id, exc)
    return images, elapsed / max(len(images), 1)


# -- streaming shards ------------------------------------------------------------------------------
class ShardStream:
    """Keeps ``shards_in_flight`` shard tasks running; collects, retries and records them."""

    def __init__(
        self,
        prepared: PreparedRun,
        manifest: Manifest,
        experts: ExpertGroup,
        config: RayRunnerConfig,
        stats: RunStats,
        progress: bool,
    ) -> None:
        self.prepared, self.config, self.stats, self.experts = prepared, config, stats, experts
        plan = experts.plan
        self.in_flight = plan.shards_in_flight if plan else max(config.shards_in_flight or 2, 2)
        self.task = ray.remote(label_shard).options(
            num_cpus=plan.shard_cpus if plan else 1, max_retries=0, retry_exceptions=False
        )
        self.context = ray.put(
            ShardContext(
                prepared.source,
                prepared.store.url,
                manifest.decode,
                experts.proxies(),
                manifest.batch_size,
            )
        )
        self.view = LiveView(len(prepared.plans), experts, config.progress_interval_s, progress)

    def run(self) -> None:
        pending = deque((plan, 1) for plan in self.prepared.plans)
        running: dict[Any, tuple[ShardPlan, int]] = {}
        self.stats.started = time.time()
        try:
            while pending or running:
                while pending and len(running) < self.in_flight:
                    plan, attempt = pending.popleft()
                    running[self.task.remote(plan, self.context)] = (plan, attempt)
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    plan, attempt = running.pop(ref)
                    retry = self._collect(ref, plan, attempt)
                    if retry:
                        pending.append((plan, attempt + 1))
                self.view.tick(self.experts.monitor, len(running), len(pending))
        finally:
            self._cancel(running)
            order = {plan.shard.shard_id: i for i, plan in enumerate(self.prepared.plans)}
            self.prepared.summary.results.sort(key=lambda result: order[result.shard_id])
            self.stats.finished = time.time()
            self.stats.monitor = _snapshot(self.experts.monitor)
            self.view.close()

    def _collect(self, ref: Any, plan: ShardPlan, attempt: int) -> bool:
        """Record a finished shard task; True when it failed and should run again."""
        shard_id = plan.shard.shard_id
        try:
            result: ShardResult = ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause
            if not isinstance(cause, SHARD_ERRORS):  # a bug, not a bad shard: stop, as the local runner
                raise (cause if isinstance(cause, BaseException) else exc) from None
            error = f"{type(cause).__name__}: {cause}"
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
        """Stop the shards in flight: their temp tars are removed and nothing is committed half-way."""
        if not running:
            return
        logger.info("cancelling %d shards in flight", len(running))
        for ref in running:
            ray.cancel(ref)
        _, stuck = ray.wait(list(running), num_returns=len(running), timeout=CANCEL_GRACE_S)
        for ref in stuck:
            ray.cancel(ref, force=True)  # leftovers are temp files, removed by the next run


def _snapshot(monitor: Any) -> dict[str, Any]:
    try:
        return ray.get(monitor.snapshot.remote(), timeout=10)
    except (RayActorError, GetTimeoutError) as exc:
        logger.warning("could not read the run monitor: %s", exc)
        return {"experts": {}}


# -- progress and statistics -----------------------------------------------------------------------
class LiveView:
    """A shard bar (samples/s, ETA) plus a periodic per-expert line: throughput, queue, busy, GPUs."""

    def __init__(self, total: int, experts: ExpertGroup, interval: float, enabled: bool) -> None:
        self.bar = Progress(total, enabled=enabled)
        self.experts, self.interval, self.enabled = experts, interval, enabled
        self.last = time.monotonic()
        self.previous: dict[str, int] = {}

    def shard_done(self, samples: int) -> None:
        self.bar.shard_done(samples)

    def tick(self, monitor: Any, running: int, pending: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        snapshot = _snapshot(monitor)
        parts = []
        for task, counters in snapshot.get("experts", {}).items():
            replicas = self.experts.replicas[task]
            rate = (counters["images"] - self.previous.get(task, 0)) / (now - self.last)
            self.previous[task] = counters["images"]
            busy = counters["busy_s"] / max(snapshot["elapsed_s"] * len(replicas), 1e-9)
            gpus = ",".join(g for r in replicas for g in r.info.get("gpu_ids", [])) or "cpu"
            parts.append(
                f"{task} x{len(replicas)} [{gpus}] {rate:.1f} img/s q={counters['queued']} busy {busy:.0%}"
            )
        logger.info("shards running %d, queued %d | %s", running, pending, " | ".join(parts))
        self.last = now

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunStats:
    output: str
    experts: ExpertGroup
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    created: str = field(default_factory=lambda: _now())
    status: str = "error"
    plan: ReplicaPlan | None = None
    started: float | None = None
    finished: float | None = None
    samples: int = 0
    shard_retries: int = 0
    monitor: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, prepared: PreparedRun) -> dict[str, Any]:
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        experts = {}
        for task, placement in self.experts.placements.items():
            counters = self.monitor.get("experts", {}).get(task, {})
            replicas = []
            for r in self.experts.replicas[task]:
                busy = counters.get("busy_by_replica", {}).get(str(r.index), 0.0)
                replicas.append(
                    {
                        "replica": r.index,
                        "node": r.info.get("node"),
                        "gpu_ids": r.info.get("gpu_ids", []),
                        "cuda_visible_devices": r.info.get("cuda_visible_devices"),
                        "device": r.info.get("device"),
                        "busy_s": busy,
                        "busy_fraction": round(busy / elapsed, 4) if elapsed else None,
                    }
                )
            experts[task] = {
                "placement": asdict(placement),
                "images_per_s": round(counters.get("images", 0) / elapsed, 3) if elapsed else None,
                **counters,
                "replicas": replicas,
            }
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
            "experts": experts,
        }

    def write(self, prepared: PreparedRun) -> None:
        if not prepared.plans:
            return  # nothing ran: no stats worth keeping
        stamp = self.created.replace("-", "").replace(":", "").replace("+0000", "Z")
        path = f"{prepared.store.root}/stats/ray-{stamp}-{self.run_id}.json"
        try:
            prepared.store.write_bytes_atomic(path, encode_json(self.as_dict(prepared)))
        except OSError as exc:  # statistics never decide anything: a failure here only warns
            logger.warning("could not write run statistics to %s: %s", path, exc)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


__all__: Sequence[str] = ["run_ray", "connect"]
