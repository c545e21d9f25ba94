"""The in-process runner: experts live in this process, shards are labelled one after another."""

from __future__ import annotations

import logging

from expert_zoo.registry import resolve_experts, resolve_name
from label_pipeline.config import Manifest
from label_pipeline.labeler import Labeler, LocalExecutor
from label_pipeline.progress import Progress
from label_pipeline.run import RunOptions, RunSummary, check_inputs, finish_run, prepare_run
from label_pipeline.shard_job import run_shard

logger = logging.getLogger(__name__)


def build_experts(manifest: Manifest, device: str = "auto") -> dict:
    """Instantiate (load) every expert the manifest names; fails fast if one is unavailable."""
    # every name and option checked before a model loads
    resolved = resolve_experts(manifest.runnable_experts())
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
    labeler = Labeler(executor)
    bar = Progress(len(prepared.plans), enabled=progress)
    try:
        for plan in prepared.plans:
            try:
                result = run_shard(plan, prepared.source, prepared.store, labeler, manifest.decode)
            except Exception as exc:  # noqa: BLE001 - one shard fails (recorded), the run goes on
                # one line on the terminal; the traceback goes to the run's log (or --debug)
                logger.exception("shard %s failed: %s: %s", plan.shard.shard_id, type(exc).__name__, exc)
                prepared.summary.failed_shards[plan.shard.shard_id] = f"{type(exc).__name__}: {exc}"
                prepared.store.write_failed(plan.shard.shard_id, f"{type(exc).__name__}: {exc}")
                continue
            prepared.summary.results.append(result)
            bar.shard_done(result.record["samples"])
    finally:
        bar.close()
        finish_run(prepared)
    return prepared.summary
