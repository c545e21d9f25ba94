"""``label-pipeline report OUT``: what a labelled output holds and whether its labels look sane.

The numbers come from three places, cheapest first:

* the done-records and ``records/*.parquet`` of every done shard (no tar is read): samples, failures
  by reason and by shard, each expert's ok/failed counts, when each shard was committed;
* ``OUT/stats/*.json``, the run statistics (``label_pipeline.run_stats``), when present: wall time,
  images/s over time, per-expert busy time;
* a bounded, deterministic sample of the shards' tars: the first ⌈samples ÷ shards⌉ samples of up to
  ``shards`` shards drawn with ``seed``, so the bytes read stay bounded however large the output is.
  Their labels give the per-expert statistics (``label_pipeline.label_stats``); a few of them, and a
  few failed samples, are drawn as contact sheets with ``label_pipeline.contact_sheet``.

``label_pipeline.report_html`` turns the result into one self-contained HTML page.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from label_pipeline.config import ConfigError
from label_pipeline.contact_sheet import contact_sheet
from label_pipeline.core.tario import read_tar_samples
from label_pipeline.inputs import list_folder
from label_pipeline.label_stats import TaskStats, flags, merge_into, sample_stats
from label_pipeline.output import OutputStore
from label_pipeline.status import OutputStatus, expert_outcomes, output_status
from label_pipeline.verify import describe

logger = logging.getLogger(__name__)
RECORD_COLUMNS = ["key", "status", "error", "expert_status"]
STATS_THREADS = 8  # at most, and no more than the CPUs
FAILED_STATUSES_KEPT = 50_000  # failed rows kept for the failure table and gallery; counts stay exact


@dataclass
class ReportOptions:
    """How much of the output the label statistics and the gallery read."""

    samples: int = 1000  # labels decoded for the statistics, at most
    shards: int = 16  # shards those samples come from, at most
    gallery: int = 6  # samples drawn at random as contact sheets
    failures: int = 6  # failed samples drawn as contact sheets
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "shards", "gallery", "failures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 or more, got {getattr(self, name)}")


@dataclass
class FailedSample:
    shard: str
    index: int  # position in the shard (= row of its records)
    key: str
    status: str
    error: str | None
    experts: dict[str, str]  # task → status, for the experts that did not say ok


@dataclass
class RecordSummary:
    """Every done shard's records, counted."""

    samples: int = 0
    status: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # (status, error) → samples
    experts: dict[str, Counter] = field(default_factory=dict)  # task → {status: samples}
    failures_by_shard: Counter = field(default_factory=Counter)
    failures: list[FailedSample] = field(default_factory=list)  # the first FAILED_STATUSES_KEPT
    unreadable: dict[str, str] = field(default_factory=dict)  # shard → why its records did not read
    keys: dict[str, list[str]] = field(default_factory=dict)  # shard → keys in order (for the gallery)


@dataclass
class Sheet:
    title: str
    image: Image.Image


@dataclass
class Report:
    """Everything the HTML page shows."""

    root: str
    options: ReportOptions
    status: OutputStatus
    records: RecordSummary
    labels: dict[str, TaskStats]
    sampled: dict[str, int]  # shard → samples read for the statistics
    read_errors: dict[str, str]  # shard → why its tar could not be read to the end
    runs: list[dict[str, Any]]  # OUT/stats/*.json, oldest first
    commits: list[tuple[float, int, float]]  # (commit time s, samples, duration s) per done shard
    gallery: list[Sheet]
    failure_sheets: list[Sheet]
    experts: dict[str, str]  # task → expert name, from _run.json
    timings: dict[str, float] = field(default_factory=dict)


def build_report(root: str, options: ReportOptions | None = None) -> Report:
    """Read ``root`` (any fsspec URL) and compute the report; raises ConfigError if it is no output."""
    options = options or ReportOptions()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    status = output_status(root)
    store = OutputStore(root)
    done, _ = store.committed(_done_ids(store))
    run = store.read_run() or {}
    timings["status"] = time.perf_counter() - started

    started = time.perf_counter()
    records = summarise_records(store, sorted(done))
    runs = read_run_stats(store)
    timings["records"] = time.perf_counter() - started

    started = time.perf_counter()
    plan = sample_plan(done, records, options)
    wanted = sheet_choice(plan, records, options)
    labels, read_errors, sheets = read_sampled_shards(store, plan, wanted)
    timings["labels"] = time.perf_counter() - started

    experts = run.get("experts")
    experts = experts if isinstance(experts, dict) else {}
    return Report(
        root=store.url,
        options=options,
        status=status,
        records=records,
        labels=dict(sorted(labels.items())),
        sampled={shard: count for shard, count in plan.items() if count},
        read_errors=read_errors,
        runs=runs,
        commits=commit_times(done),
        gallery=[sheets[k] for k in wanted if wanted[k] == "sample" and k in sheets],
        failure_sheets=[sheets[k] for k in wanted if wanted[k] == "failure" and k in sheets],
        experts={t: str(e.get("name", t)) for t, e in experts.items() if isinstance(e, dict)},
        timings=timings,
    )


def _done_ids(store: OutputStore) -> list[str]:
    names = list_folder(store.fs, f"{store.root}/records")
    return sorted(n[: -len(".done.json")] for n in names if n.endswith(".done.json"))


# -- records --------------------------------------------------------------------------------------
def summarise_records(store: OutputStore, shard_ids: list[str]) -> RecordSummary:
    """Count statuses, errors and expert outcomes over every row of every done shard's Parquet."""
    summary = RecordSummary()
    tables = []
    for shard_id in shard_ids:
        try:
            table = store.read_records(shard_id).select(RECORD_COLUMNS)
        except Exception as exc:  # noqa: BLE001 - a damaged Parquet is reported, the others still count
            summary.unreadable[shard_id] = describe(exc)
            continue
        summary.keys[shard_id] = table.column("key").to_pylist()
        rows = len(table)
        table = table.append_column("shard", pa.array([shard_id] * rows, pa.string()))
        tables.append(table.append_column("index", pa.array(range(rows), pa.int64())))
    if not tables:
        return summary
    table = pa.concat_tables(tables)
    summary.samples = len(table)
    summary.status = _value_counts(table.column("status"))
    # Few distinct expert_status strings exist (one per combination of outcomes): parse each once.
    for text, count in _value_counts(table.column("expert_status")).items():
        for task, outcome in expert_outcomes(text).items():
            summary.experts.setdefault(task, Counter())[outcome] += count
    failed = table.filter(pc.not_equal(table.column("status"), "ok"))
    for row in failed.to_pylist():
        summary.errors[(row["status"], row["error"] or "")] += 1
        summary.failures_by_shard[row["shard"]] += 1
        if len(summary.failures) < FAILED_STATUSES_KEPT:
            outcomes = expert_outcomes(row["expert_status"])
            summary.failures.append(
                FailedSample(
                    row["shard"],
                    row["index"],
                    row["key"],
                    row["status"],
                    row["error"],
                    {t: s for t, s in outcomes.items() if s != "ok"},
                )
            )
    return summary


def _value_counts(column: pa.ChunkedArray) -> Counter:
    counts = pc.value_counts(column)
    return Counter(
        {
            ("" if value is None else value): count
            for value, count in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            )
        }
    )


# -- run statistics and commit times ----------------------------------------------------------------
def read_run_stats(store: OutputStore) -> list[dict[str, Any]]:
    """Every readable ``OUT/stats/*.json`` of any runner, oldest first (by ``created``, then name)."""
    runs = []
    for path in store.fs.glob(f"{store.root}/stats/*.json"):
        stats = store.read_json(path)
        if isinstance(stats, dict):
            runs.append((str(stats.get("created", "")), path, stats))
    return [stats for _, _, stats in sorted(runs, key=lambda item: item[:2])]


def commit_times(done: dict[str, dict[str, Any]]) -> list[tuple[float, int, float]]:
    """(commit time in s, samples, labelling time in s) of each done shard whose record has them.

    The tar's mtime is when the shard was committed (a done-record stores it); object stores record
    an etag instead, so there the list is empty.
    """
    commits = []
    for record in done.values():
        mtime = (record.get("tar_stat") or {}).get("mtime_ns")
        samples, duration = record.get("samples"), record.get("duration_s")
        if isinstance(mtime, int) and isinstance(samples, int):
            commits.append(
                (mtime / 1e9, samples, float(duration) if isinstance(duration, int | float) else 0.0)
            )
    return sorted(commits)


# -- the sample of shards ---------------------------------------------------------------------------
def sample_plan(
    done: dict[str, dict[str, Any]], records: RecordSummary, options: ReportOptions
) -> dict[str, int]:
    """Shard → how many of its first samples to read: up to ``options.shards`` shards drawn with
    ``options.seed``, ``options.samples`` samples in all (a short shard's unused share moves on)."""
    readable = sorted(s for s in done if s in records.keys)
    chosen = sorted(random.Random(options.seed).sample(readable, min(options.shards, len(readable))))
    plan: dict[str, int] = {}
    budget = max(options.samples, 0)
    for position, shard in enumerate(chosen):
        share = math.ceil(budget / (len(chosen) - position))
        plan[shard] = min(share, len(records.keys[shard]))
        budget -= plan[shard]
    return plan


def sheet_choice(
    plan: dict[str, int], records: RecordSummary, options: ReportOptions
) -> dict[tuple[str, str], str]:
    """(shard, key) → "sample" or "failure", for the contact sheets.

    Samples are drawn with the seed from the ok samples the statistics read (failed ones have their
    own part). Failures take turns by status (so each kind of failure is shown), the earliest in its
    shard first (less of the tar to read).
    """
    rng = random.Random(options.seed + 1)
    failed = {(f.shard, f.key) for f in records.failures}
    pool = [(shard, records.keys[shard][i]) for shard, count in plan.items() for i in range(count)]
    pool = [item for item in pool if item not in failed]
    wanted = {item: "sample" for item in rng.sample(pool, min(options.gallery, len(pool)))}
    by_status: dict[str, list[FailedSample]] = defaultdict(list)
    for failure in sorted(records.failures, key=lambda f: (f.index, f.shard)):
        by_status[failure.status].append(failure)
    queues = [by_status[s] for s in sorted(by_status)]
    taken = 0
    while taken < options.failures and any(queues):
        for queue in queues:
            if queue and taken < options.failures:
                failure = queue.pop(0)
                wanted[(failure.shard, failure.key)] = "failure"
                taken += 1
    return wanted


def read_sampled_shards(
    store: OutputStore, plan: dict[str, int], wanted: dict[tuple[str, str], str]
) -> tuple[dict[str, TaskStats], dict[str, str], dict[tuple[str, str], Sheet]]:
    """One streamed read per shard: statistics over its first ``plan[shard]`` samples, and a contact
    sheet for each wanted key; reading stops once both are through.

    Decoding the labels is most of the cost and OpenCV and NumPy release the GIL, so samples are
    counted in worker threads while this one reads on; results are merged in reading order, so the
    totals do not depend on the threads, and at most a few samples per worker wait in memory.
    """
    stats: dict[str, TaskStats] = {}
    errors: dict[str, str] = {}
    sheets: dict[tuple[str, str], Sheet] = {}
    keys_by_shard: dict[str, set[str]] = defaultdict(set)
    for shard, key in wanted:
        keys_by_shard[shard].add(key)
    workers = min(STATS_THREADS, os.cpu_count() or 1)
    pending: deque[Future[dict[str, TaskStats]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="report-stats") as pool:
        for shard in sorted(set(plan) | set(keys_by_shard)):
            count, keys = plan.get(shard, 0), keys_by_shard.get(shard, set())
            try:
                for index, (key, members) in _shard_samples(store, shard, count, keys):
                    if index < count:
                        pending.append(pool.submit(sample_stats, key, members))
                    if key in keys:
                        sheets[(shard, key)] = Sheet(f"{shard}/{key}", contact_sheet(members, key))
                    while len(pending) > 4 * workers:
                        merge_into(stats, pending.popleft().result())
            except Exception as exc:  # noqa: BLE001 - an unreadable shard is a finding; the others still count
                errors[shard] = describe(exc)
        while pending:
            merge_into(stats, pending.popleft().result())
    return stats, errors, sheets


def _shard_samples(
    store: OutputStore, shard: str, count: int, keys: set[str]
) -> Iterator[tuple[int, tuple[str, dict[str, bytes]]]]:
    errors: list[str] = []
    remaining = set(keys)
    with fsspec.open(f"{store.url}/shards/{shard}.tar", "rb") as handle:
        for index, sample in enumerate(read_tar_samples(handle, errors)):
            if index >= count and not remaining:
                return  # statistics and sheets are through: leave the rest of the tar unread
            remaining.discard(sample[0])
            yield index, sample
    if errors:
        raise OSError(f"tar unreadable ({errors[0]})")


def report_flags(report: Report) -> list[str]:
    """Every warning of the report, one line each (also what tests and the CLI summary read)."""
    found = []
    for task in sorted(set(report.labels) | set(report.records.experts)):
        outcomes = report.records.experts.get(task)
        failed = sum(c for s, c in outcomes.items() if s != "ok") if outcomes else 0
        labelled = sum(outcomes.values()) if outcomes else 0
        stats = report.labels.get(task) or TaskStats(task, "map")
        found += [f"{task}: {flag}" for flag in flags(stats, failed, labelled)]
    status = report.status
    found += [f"shard {s} failed: {e}" for s, e in sorted(status.failed.items())]
    found += [
        f"shard {s} damaged: {e} (label-pipeline verify --repair)" for s, e in sorted(status.damaged.items())
    ]
    found += [f"shard {s} stale: {e}" for s, e in sorted(status.stale_inputs.items())]
    found += [f"records of shard {s} unreadable: {e}" for s, e in sorted(report.records.unreadable.items())]
    found += [f"tar of shard {s} unreadable: {e}" for s, e in sorted(report.read_errors.items())]
    return found


def write_report(root: str, out: str, options: ReportOptions | None = None) -> tuple[Report, int]:
    """Build the report of ``root`` and write it as one HTML file to ``out``; returns it and its size."""
    from label_pipeline.report_html import render_html

    report = build_report(root, options)
    started = time.perf_counter()
    page = render_html(report).encode("utf-8")
    report.timings["render"] = time.perf_counter() - started
    with fsspec.open(out, "wb") as handle:
        handle.write(page)
    return report, len(page)
