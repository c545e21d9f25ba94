"""A labelling run: check the output root, plan shards, hand them to a runner, summarise.

Runner-independent: the local runner and the Ray runner both go through ``prepare_run`` and
``finish_run``, so they share the same checks, manifest and output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from expert_zoo.base import THROUGHPUT_OPTIONS
from expert_zoo.registry import ExpertUnavailable, expert_class
from label_pipeline.config import ConfigError, Manifest, check_output_root
from label_pipeline.core.timestamps import utc_now
from label_pipeline.inputs import input_identities, input_paths, overlap, reads_files
from label_pipeline.logs import RunLog
from label_pipeline.output import OutputStore
from label_pipeline.shard_job import ShardPlan, ShardResult, plan_shards
from label_pipeline.sources import InputShard, Source, build_source
from label_pipeline.table_stage import write_run_tables

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    output: str | None = None  # overrides the manifest's output
    limit_shards: int | None = None
    relabel: list[str] = field(default_factory=list)  # tasks whose changed fingerprint is accepted
    force_unlock: bool = False
    only_shards: list[str] | None = None  # label only these shard ids (``verify --repair``)


@dataclass
class RunSummary:
    """What a run did, in per-shard counters: each labelled shard's done-record (``ShardResult``),
    never per-sample rows, which are in each shard's Parquet records; a long run stays flat in memory."""

    output: str
    shards_total: int
    shards_skipped: int
    results: list[ShardResult] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)
    skipped_with_failures: int = 0  # shards done by an earlier run whose records hold failures
    missing_inputs: list[str] = field(default_factory=list)  # listed input shards that do not exist

    @property
    def samples(self) -> int:
        return sum(r.record["samples"] for r in self.results)

    @property
    def has_failures(self) -> bool:
        """True while the output holds any failure, whichever run recorded it (stable exit codes)."""
        return (
            bool(self.failed_shards)
            or bool(self.skipped_with_failures)
            or any(r.has_failures for r in self.results)
        )


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
        if old and old.get("fingerprint") != info["fingerprint"] and task not in relabel:
            raise ConfigError(
                f"expert {task!r} changed since this output was labelled: "
                f"{'; '.join(describe_expert_change(old, info))} "
                f"(fingerprint {old.get('fingerprint')} → {info['fingerprint']}); "
                f"pass --relabel {task} to recompute it in place"
            )
    unknown = sorted(set(relabel) - set(experts))
    if unknown:
        raise ConfigError(f"--relabel {','.join(unknown)}: not among this run's experts {sorted(experts)}")


_UNSET = object()


def describe_expert_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two ``_run.json`` expert entries: backend, version, options, weights.

    Entries written before a field was recorded lack it; such a field is not compared.
    """
    changes = []
    if old.get("name") != new.get("name"):
        changes.append(f"backend {old.get('name')} → {new.get('name')}")
    if "version" in old and old["version"] != new.get("version"):
        changes.append(f"version {old['version']} → {new.get('version')}")
    if isinstance(old.get("options"), Mapping):
        defaults = _option_defaults(new.get("name")) if old.get("name") == new.get("name") else {}
        before, after = old["options"], new.get("options") or {}
        for key in sorted(set(before) | set(after), key=str):
            was, now = before.get(key, _UNSET), after.get(key, _UNSET)
            if key not in THROUGHPUT_OPTIONS and was != now:
                changes.append(f"option {key}: {_shown(was, defaults, key)} → {_shown(now, defaults, key)}")
    if old.get("weights") and new.get("weights") and old["weights"] != new["weights"]:
        changes.append(f"weights {old['weights'][:16]} → {new['weights'][:16]}")
    if not changes:
        changes.append("the expert's code or weights (nothing this output recorded differs)")
    return changes


def _option_defaults(name: str | None) -> dict[str, Any]:
    """The default of each option of the expert registered as ``name``, when it can be imported."""
    if name is None:  # an entry written before names were recorded
        return {}
    try:
        return asdict(expert_class(name).Options())
    except (KeyError, ExpertUnavailable):  # no longer registered here: shown as plain "default"
        return {}


def _shown(value: Any, defaults: Mapping[str, Any], key: str) -> str:
    if value is not _UNSET:
        return json.dumps(value)
    return f"default ({json.dumps(defaults[key])})" if key in defaults else "default"


def expert_entries(
    manifest: Manifest,
    names: Mapping[str, str],
    fingerprints: Mapping[str, str],
    weights: Mapping[str, str] | None = None,
) -> dict:
    """The ``_run.json`` record of each expert: what a later run compares to explain a refusal.

    ``weights`` maps a task to its expert's ``weights_digest``, where the runner knows it.
    """
    options = {request.task: request.options for request in manifest.experts}
    targets = {request.task: request.target for request in manifest.experts if request.target}
    entries = {}
    for task in fingerprints:
        entry = {"name": names[task], "fingerprint": fingerprints[task], "options": options.get(task, {})}
        version = _expert_version(names[task])
        if version is not None:
            entry["version"] = version
        if weights and weights.get(task):
            entry["weights"] = weights[task]
        if task in targets:  # a plugin: ``verify --repair`` needs its class to label again
            entry["class"] = targets[task]
        entries[task] = entry
    return entries


def _expert_version(name: str) -> str | None:
    try:
        return expert_class(name).spec.version
    except (KeyError, ExpertUnavailable):  # not registered in this process: nothing to record
        return None


@dataclass
class PreparedRun:
    manifest: Manifest
    source: Source
    store: OutputStore
    plans: list[ShardPlan]
    summary: RunSummary
    run_record: dict[str, Any]
    log: RunLog | None = None  # the run's log file under OUT/logs/, closed by finish_run
    shard_ids: list[str] = field(default_factory=list)  # the input shards this run covers


@dataclass
class CheckedInputs:
    """The inputs and output root of a run, checked before any expert is loaded or file written."""

    store: OutputStore
    source: Source
    shards: list[InputShard]  # every listed shard (after --limit-shards)
    present: list[InputShard]
    missing: list[InputShard]  # listed but absent: recorded as failed shards
    identities: dict[str, dict[str, Any] | None]


def check_inputs(manifest: Manifest, options: RunOptions) -> CheckedInputs:
    """List the inputs (one listing per folder) and check the output root; raise ConfigError if the
    run cannot start. Runners call this first, so a missing dataset is reported before weights load."""
    store = OutputStore(options.output or manifest.output)
    _check_output_root(store)
    _check_no_overlap(store, manifest)
    source = build_source(manifest.source)
    shards = _list_shards(source, manifest, options.limit_shards)
    if options.only_shards is not None:
        wanted = set(options.only_shards)
        shards = [shard for shard in shards if shard.shard_id in wanted]
    identities = input_identities(source, shards)
    tars = reads_files(source)
    missing = [shard for shard in shards if tars and identities[shard.shard_id] is None]
    present = [shard for shard in shards if not tars or identities[shard.shard_id] is not None]
    if not present:
        raise ConfigError(
            f"none of the {len(shards)} input shards exists ({_pattern(manifest)}); {_hint(manifest)}"
        )
    if missing:
        logger.warning(
            "%d of %d input shards do not exist (first: %s); labelling the other %d",
            len(missing),
            len(shards),
            missing[0].location,
            len(present),
        )
    return CheckedInputs(store, source, shards, present, missing, identities)


def prepare_run(
    manifest: Manifest,
    options: RunOptions,
    names: Mapping[str, str],
    fingerprints: Mapping[str, str],
    inputs: CheckedInputs | None = None,
    weights: Mapping[str, str] | None = None,
) -> PreparedRun:
    """Lock the output and plan the shards; the caller must finish_run.

    Every check that can refuse the run happens before anything is written to the output root.
    """
    inputs = inputs or check_inputs(manifest, options)
    store, source, shards, missing = inputs.store, inputs.source, inputs.shards, inputs.missing
    source_id = source.describe()
    experts = expert_entries(manifest, names, fingerprints, weights)
    previous = store.read_run()
    check_compatible(previous, source_id, experts, options.relabel)
    store.acquire_lock(force=options.force_unlock)
    log = None
    try:
        listing = store.prepare()  # planning below reuses this listing of shards/ and records/
        log = RunLog(store.url)
        run_record = _run_record(manifest, source_id, experts, previous)
        store.write_run(run_record)
        write_run_tables(store.url, manifest.experts, run_record["experts"])  # OUT/embeddings/
        plans, done = plan_shards(inputs.present, store, fingerprints, inputs.identities, listing)
        for shard in missing:
            store.write_failed(shard.shard_id, f"input shard missing: {shard.location}")
    except BaseException:
        if log is not None:
            log.close()
        store.release_lock()
        raise
    summary = RunSummary(store.url, len(shards), len(done), missing_inputs=[s.location for s in missing])
    summary.failed_shards.update({shard.shard_id: "input shard missing" for shard in missing})
    summary.skipped_with_failures = sum(entry.has_failures for entry in done.values())
    logger.info(
        "%d shards: %d done already, %d to label (%d incremental)",
        len(shards),
        len(done),
        len(plans),
        sum(p.mode == "incremental" for p in plans),
    )
    shard_ids = [shard.shard_id for shard in inputs.present]
    return PreparedRun(manifest, source, store, plans, summary, run_record, log, shard_ids)


def _run_record(
    manifest: Manifest, source_id: dict[str, Any], experts: dict[str, Any], previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "dataset": manifest.name,
        "source": source_id,
        "source_config": asdict(manifest.source),
        "decode": asdict(manifest.decode),
        "experts": {**(previous or {}).get("experts", {}), **experts},
        "created": (previous or {}).get("created", utc_now()),
        "updated": utc_now(),
    }


def _check_output_root(store: OutputStore) -> None:
    check_output_root(store.url)  # a file, or a path under one: one line, exit 2


def _check_no_overlap(store: OutputStore, manifest: Manifest) -> None:
    files, trees = input_paths(manifest.source)
    clash = overlap(store.url, files, trees)
    if clash is not None:
        raise ConfigError(
            f"output {store.url} overlaps the input {clash}: labelling would overwrite or re-read the "
            "inputs; choose an output root outside the input folders"
        )


def _list_shards(source: Source, manifest: Manifest, limit: int | None) -> list[InputShard]:
    try:
        shards = source.shards()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot list the input ({type(exc).__name__}: {exc}); {_hint(manifest)}") from exc
    if limit is not None:
        shards = shards[:limit]
    if not shards:
        raise ConfigError(f"no input shards found for {_pattern(manifest)}; {_hint(manifest)}")
    return shards


def _pattern(manifest: Manifest) -> str:
    config = manifest.source
    return config.path or config.images or "the source"


def _hint(manifest: Manifest) -> str:
    """The command that makes this dataset's inputs."""
    if manifest.name in DOWNLOADED:
        return f"make them with `make download DATASET={manifest.name}` (see docs/DATASETS.md)"
    if manifest.name in PREPARED:
        return f"download the archives, then run `make prepare DATASET={manifest.name}` (docs/DATASETS.md)"
    return "check the manifest's source paths (and DATA_ROOT)"


DOWNLOADED = ("cc3m", "sbu", "cc12m")
PREPARED = ("coco", "vg")


def finish_run(prepared: PreparedRun) -> RunSummary:
    try:
        if prepared.summary.results:  # index the new done-records: the next rerun plans from one read
            prepared.store.committed(prepared.shard_ids, save_index=True)
        if prepared.log is not None:
            prepared.log.close()
    finally:
        prepared.store.release_lock()
    return prepared.summary
