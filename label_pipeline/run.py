"""A labelling run: check the output root, plan shards, hand them to a runner, summarise.

Runner-independent: the local runner and the Ray runner both go through ``prepare_run`` and
``finish_run``, so they share the same checks, manifest and output.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from label_pipeline.config import ConfigError, Manifest
from label_pipeline.output import OutputStore
from label_pipeline.shard_job import ShardPlan, ShardResult, plan_shards
from label_pipeline.sources import Source, build_source

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    output: str | None = None  # overrides the manifest's output
    limit_shards: int | None = None
    relabel: list[str] = field(default_factory=list)  # tasks whose changed fingerprint is accepted
    force_unlock: bool = False


@dataclass
class RunSummary:
    output: str
    shards_total: int
    shards_skipped: int
    results: list[ShardResult] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(r.record["samples"] for r in self.results)

    @property
    def has_failures(self) -> bool:
        return bool(self.failed_shards) or any(r.has_failures for r in self.results)


def check_compatible(
    previous: Mapping[str, Any] | None,
    source: Mapping[str, Any],
    experts: Mapping[str, Any],
    relabel: list[str],
) -> None:
    """Refuse to mix outputs of different inputs or silently changed experts in one root."""
    if previous is None:
        return
    if previous.get("source") != source:
        raise ConfigError(
            f"the output already holds labels of another source ({previous.get('source')}); "
            "use a new output directory"
        )
    for task, info in experts.items():
        old = previous.get("experts", {}).get(task)
        if old and old["fingerprint"] != info["fingerprint"] and task not in relabel:
            raise ConfigError(
                f"expert {task!r} changed (fingerprint {old['fingerprint']} → {info['fingerprint']}, "
                f"{old.get('name')} → {info['name']}); pass --relabel {task} to recompute it in place"
            )
    unknown = sorted(set(relabel) - set(experts))
    if unknown:
        raise ConfigError(f"--relabel {','.join(unknown)}: not among this run's experts {sorted(experts)}")


def expert_entries(manifest: Manifest, names: Mapping[str, str], fingerprints: Mapping[str, str]) -> dict:
    options = {request.task: request.options for request in manifest.experts}
    return {
        task: {"name": names[task], "fingerprint": fingerprints[task], "options": options.get(task, {})}
        for task in fingerprints
    }


@dataclass
class PreparedRun:
    manifest: Manifest
    source: Source
    store: OutputStore
    plans: list[ShardPlan]
    summary: RunSummary
    run_record: dict[str, Any]


def prepare_run(
    manifest: Manifest, options: RunOptions, names: Mapping[str, str], fingerprints: Mapping[str, str]
) -> PreparedRun:
    """Validate against the existing output, lock it, and plan the shards; the caller must finish_run."""
    store = OutputStore(options.output or manifest.output)
    source = build_source(manifest.source)
    source_id = source.describe()
    experts = expert_entries(manifest, names, fingerprints)
    previous = store.read_run()
    check_compatible(previous, source_id, experts, options.relabel)
    store.acquire_lock(force=options.force_unlock)
    try:
        store.prepare()
        run_record = {
            "dataset": manifest.name,
            "source": source_id,
            "source_config": asdict(manifest.source),
            "experts": {**(previous or {}).get("experts", {}), **experts},
            "created": (previous or {}).get("created", _now()),
            "updated": _now(),
        }
        store.write_run(run_record)
        shards = source.shards()
        if options.limit_shards is not None:
            shards = shards[: options.limit_shards]
        plans, done = plan_shards(shards, store, fingerprints)
    except BaseException:
        store.release_lock()
        raise
    summary = RunSummary(store.url, shards_total=len(shards), shards_skipped=len(done))
    logger.info(
        "%d shards: %d done already, %d to label (%d incremental)",
        len(shards),
        len(done),
        len(plans),
        sum(p.mode == "incremental" for p in plans),
    )
    return PreparedRun(manifest, source, store, plans, summary, run_record)


def finish_run(prepared: PreparedRun) -> RunSummary:
    prepared.store.release_lock()
    return prepared.summary


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
