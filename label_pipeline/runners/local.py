"""The in-process runner: experts live in this process, shards are labelled one after another."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from expert_zoo.base import Label
from expert_zoo.registry import resolve_experts, resolve_name
from label_pipeline.config import Manifest
from label_pipeline.core.weights import require_weights
from label_pipeline.labeler import ExpertExecutor, Labeler, LocalExecutor
from label_pipeline.progress import Progress
from label_pipeline.run import PreparedRun, RunOptions, RunSummary, check_inputs, finish_run, prepare_run
from label_pipeline.run_stats import (
    ExpertTimes,
    Throughput,
    new_run_id,
    stats_document,
    utc_created,
    write_stats,
)
from label_pipeline.shard_job import run_shards

logger = logging.getLogger(__name__)


def build_experts(manifest: Manifest, device: str = "auto") -> dict:
    """Instantiate (load) every expert the manifest names; fails fast if one is unavailable.

    Every name and option is checked, then every expert's weights are found or fetched, before any model
    loads: all missing weights are one :class:`~label_pipeline.core.weights.MissingWeights` message."""
    resolved = resolve_experts(manifest.runnable_experts())
    require_weights([source for expert in resolved.values() for source in expert.weight_sources()])
    return {task: expert.build(device) for task, expert in resolved.items()}


def run_local(
    manifest: Manifest, options: RunOptions, progress: bool = True, device: str = "auto"
) -> RunSummary:
    inputs = check_inputs(manifest, options)  # before loading any weights
    experts = build_experts(manifest, device=device)
    executor = LocalExecutor(experts)
    names = {request.task: resolve_name(request) for request in manifest.experts}
    weights = {task: expert.weights_digest for task, expert in experts.items()}
    prepared = prepare_run(manifest, options, names, executor.fingerprints, inputs, weights)
    run = LocalRunMonitor(prepared, progress)
    labeler = Labeler(TimedExecutor(executor, run.times.batch, run.chunk_done))
    status = "error"
    try:
        _label_shards(prepared, labeler, run)
        status = "completed"
    except KeyboardInterrupt:  # Ctrl-C and SIGTERM (``Terminated``)
        status = "interrupted"
        raise
    finally:
        try:
            run.close(status)
        finally:
            finish_run(prepared)
    return prepared.summary


def _label_shards(prepared: PreparedRun, labeler: Labeler, run: LocalRunMonitor) -> None:
    # One pipeline for all shards: the next shards are decoded and labelled while one is committed.
    shards = run_shards(prepared.plans, prepared.source, prepared.store, labeler, prepared.manifest.decode)
    with contextlib.closing(shards):
        for plan, outcome in shards:
            shard_id = plan.shard.shard_id
            if isinstance(outcome, Exception):  # one shard fails (recorded), the run goes on
                # one line on the terminal; the traceback goes to the run's log (or --debug)
                error = f"{type(outcome).__name__}: {outcome}"
                logger.error("shard %s failed: %s", shard_id, error, exc_info=outcome)
                prepared.summary.failed_shards[shard_id] = error
                prepared.store.write_failed(shard_id, error)
                run.shard_done(0)
                continue
            prepared.summary.results.append(outcome)
            run.shard_done(outcome.record["samples"])


class TimedExecutor:
    """An executor that times each expert batch and reports each labelled chunk.

    It wraps the runner's executor without changing what runs: the labeler sees the same specs,
    fingerprints and batch sizes. ``on_batch(task, images, seconds, ok)`` feeds the statistics,
    ``on_chunk(images)`` the progress (per chunk, not per shard).
    """

    def __init__(
        self,
        inner: ExpertExecutor,
        on_batch: Callable[[str, int, float, bool], None],
        on_chunk: Callable[[int], None],
    ) -> None:
        self.inner, self.on_batch, self.on_chunk = inner, on_batch, on_chunk
        self.specs, self.fingerprints, self.batch_sizes = inner.specs, inner.fingerprints, inner.batch_sizes

    @contextlib.contextmanager
    def chunk(self, images: Sequence[np.ndarray]) -> Iterator[None]:
        with self.inner.chunk(images):
            yield
        self.on_chunk(len(images))

    def submit(
        self, task: str, images: list[np.ndarray], deps: dict[str, list[Label]]
    ) -> Future[list[Label]]:
        started = time.perf_counter()
        future = self.inner.submit(task, images, deps)

        def finished(done: Future[list[Label]]) -> None:
            ok = not done.cancelled() and done.exception() is None
            self.on_batch(task, len(images), time.perf_counter() - started, ok)

        future.add_done_callback(finished)  # runs at once for an in-process (already finished) call
        return future

    def encode(self, task: str, label: Label) -> dict[str, bytes]:
        return self.inner.encode(task, label)


class LocalRunMonitor:
    """The local run's progress view and its ``OUT/stats/local-*.json`` (docs/FORMAT.md)."""

    def __init__(self, prepared: PreparedRun, progress: bool) -> None:
        self.prepared = prepared
        self.run_id, self.created = new_run_id(), utc_created()
        self.times = ExpertTimes()
        self.throughput = Throughput()
        source = prepared.manifest.source
        # sources cut into shards of a known size tell the ETA before the first shard is done
        hint = source.shard_size if source.format != "webdataset" else None
        self.bar = Progress(len(prepared.plans), enabled=progress, samples_per_shard=hint)

    def chunk_done(self, images: int) -> None:
        elapsed = self.throughput.clock() - self.throughput.started
        self.bar.chunk_done(images, self.times.speeds(elapsed))

    def shard_done(self, samples: int) -> None:
        self.throughput.add(samples)
        self.bar.shard_done(samples)

    def close(self, status: str) -> None:
        self.bar.close()
        if self.prepared.plans:  # nothing ran: no statistics worth keeping
            write_stats(self.prepared.store, self.document(status))

    def document(self, status: str) -> dict[str, Any]:
        summary = self.prepared.summary
        return stats_document(
            runner="local",
            run_id=self.run_id,
            created=self.created,
            status=status,
            elapsed_s=self.throughput.clock() - self.throughput.started,
            samples=self.throughput.samples,
            shards={
                "planned": len(self.prepared.plans),
                "done": len(summary.results),
                "failed": len(summary.failed_shards),
                "skipped": summary.shards_skipped,
            },
            experts=self.times.as_dict(),
            throughput=self.throughput.points,
        )
