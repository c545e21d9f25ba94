"""``label-pipeline status``: what an output root holds, from its records (no tar is read).

Cheap by design: one listing of ``shards/`` and ``records/``, one of each input folder, and the small
json records. A done-record whose tar (or parquet) is missing or differs in size or mtime/etag counts
as damaged, not done; a done shard whose input shard changed since it was labelled is listed as stale.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from label_pipeline.config import ConfigError, SourceConfig
from label_pipeline.download import DownloadSummary, format_download_summary, read_download_summary
from label_pipeline.inputs import input_identities, list_names
from label_pipeline.output import OutputStore
from label_pipeline.run_stats import latest_stats
from label_pipeline.sources import InputShard, Source, build_source
from label_pipeline.sources.webdataset import expand_shard_urls

logger = logging.getLogger(__name__)


@dataclass
class OutputStatus:
    root: str
    dataset: str | None
    shards_total: int | None
    done: int
    failed: dict[str, str]
    samples: int
    sample_status: Counter = field(default_factory=Counter)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_errors: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)  # done-records the files no longer match
    stale_inputs: dict[str, str] = field(default_factory=dict)  # done shards whose input changed since
    pending: int | None = None  # input shards neither done, failed nor damaged (None: source unlisted)
    run_stats: dict[str, Any] | None = None  # the latest OUT/stats/*.json (either runner)
    downloads: list[DownloadSummary] = field(default_factory=list)  # img2dataset stats beside the inputs
    done_records: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # shard id → record

    @property
    def has_problems(self) -> bool:
        return bool(self.failed or self.damaged)


def output_status(root: str, count_source: bool = True) -> OutputStatus:
    """What ``root`` holds: one listing of ``shards/`` and ``records/``, the small records, no tar."""
    store = OutputStore(root)
    if not store.fs.isdir(store.root):
        raise ConfigError(f"{root}: no such output directory")
    run = store.read_run()
    if not isinstance(run, dict):
        raise ConfigError(f"{root} is not a label-pipeline output (no readable _run.json)")
    names = list_names(store.fs, f"{store.root}/records")  # names only: committed stats what it checks
    done, damaged = store.committed(
        sorted(n[: -len(".done.json")] for n in names if n.endswith(".done.json"))
    )
    failed = {
        sid: error
        for sid, error in _failed_records(store, names).items()
        if sid not in done and sid not in damaged
    }
    status = OutputStatus(root, run.get("dataset"), None, len(done), failed, samples=0, damaged=damaged)
    status.done_records = done
    for record in done.values():
        _add_record(status, record, run)
    if count_source:
        source, shards = _list_source(run)
        if shards is not None:
            status.shards_total = len(shards)
            settled = set(done) | set(failed) | set(damaged)
            status.pending = sum(shard.shard_id not in settled for shard in shards)
            status.stale_inputs = stale_inputs(source, [s for s in shards if s.shard_id in done], done)
        status.downloads = download_summaries(run)
    status.run_stats = latest_run_stats(store)
    return status


def _failed_records(store: OutputStore, names: Iterable[str]) -> dict[str, str]:
    failed = {}
    for name in names:
        if name.endswith(".failed.json"):
            record = store.read_json(f"{store.root}/records/{name}")
            error = record.get("error") if isinstance(record, dict) else None
            failed[name[: -len(".failed.json")]] = str(error or "failed-record unreadable")
    return failed


def _add_record(status: OutputStatus, record: dict[str, Any], run: dict[str, Any]) -> None:
    """Count one done-record into the totals (fields of any type: a hand-edited record must not crash)."""
    samples = record.get("samples")
    status.samples += samples if isinstance(samples, int) else 0
    counts = record.get("status_counts")
    if isinstance(counts, dict):
        status.sample_status.update({k: v for k, v in counts.items() if isinstance(v, int)})
    if record.get("input_error"):
        status.input_errors[record["shard"]] = str(record["input_error"])
    experts = record.get("experts")
    run_experts = found if isinstance(found := run.get("experts"), dict) else {}
    for task, info in (experts if isinstance(experts, dict) else {}).items():
        info = info if isinstance(info, dict) else {}
        entry = status.experts.setdefault(task, {"shards": 0, "ok": 0, "failed": 0, "stale": 0})
        entry["shards"] += 1
        entry["ok"] += _int(info.get("ok"))
        entry["failed"] += _int(info.get("failed"))
        current = run_experts.get(task)
        entry["stale"] += int(
            not isinstance(current, dict) or info.get("fingerprint") != current.get("fingerprint")
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def stale_inputs(source: Source | None, shards: list[InputShard], done: dict[str, dict]) -> dict[str, str]:
    """Done shards whose input is not what was labelled: one listing per input folder, no read."""
    recorded = {shard.shard_id: recorded_input(done[shard.shard_id]) for shard in shards}
    shards = [shard for shard in shards if recorded[shard.shard_id] is not None]
    if source is None or not shards:
        return {}
    try:
        now = input_identities(source, shards)
    except (OSError, ValueError) as exc:  # an unreachable input must not hide the output's status
        logger.warning("cannot list the input shards to compare them: %s", exc)
        return {}
    stale = {}
    for shard in shards:
        if now.get(shard.shard_id) is None:
            stale[shard.shard_id] = "input shard missing"
        elif now[shard.shard_id] != recorded[shard.shard_id]:
            stale[shard.shard_id] = (
                f"input changed (labelled {recorded[shard.shard_id]}, now {now[shard.shard_id]})"
            )
    return stale


def recorded_input(record: dict[str, Any]) -> dict[str, Any] | None:
    """The input identity a done-record stores (absent in records of older versions)."""
    for name in ("input_stat", "input"):
        if isinstance(record.get(name), dict):
            return record[name]
    return None


def latest_run_stats(store: OutputStore) -> dict[str, Any] | None:
    """The newest run statistics file, whichever runner wrote it (``OUT/stats/{runner}-{utc}-…``)."""
    return latest_stats(store)


def format_run_stats(stats: dict[str, Any]) -> list[str]:
    """Throughput, busy fraction, batch latency and faults per expert of the last run."""
    elapsed = stats.get("elapsed_s") or 0.0
    predicted = stats.get("predicted_images_per_s")
    lines = [
        f"last run {stats.get('created')} ({stats.get('runner')}, {stats.get('status')}): "
        f"{stats.get('samples', 0)} samples in {elapsed:.1f}s = {stats.get('images_per_s') or 0:.1f} images/s"
        + (f" (predicted {predicted:.1f}, bottleneck {stats.get('bottleneck')})" if predicted else ""),
        f"{'expert':<16}{'replicas':>9}{'images/s':>10}{'busy':>6}{'batches':>9}{'p50':>9}{'p95':>9}"
        "  faults (crash/oom/quarantined/resubmitted)  GPUs",
    ]
    for task, entry in sorted(stats.get("experts", {}).items()):
        replicas = entry.get("replicas", [])
        busy = entry.get("busy_s", 0.0) / (elapsed * max(len(replicas), 1)) if elapsed else 0.0
        hist, edges = entry.get("compute_latency_hist", []), entry.get("latency_buckets_s", [])
        gpus = ",".join(g for r in replicas for g in r.get("gpu_ids", [])) or "cpu"
        faults = "/".join(
            str(entry.get(k, 0)) for k in ("crashes", "oom_splits", "quarantined", "resubmitted")
        )
        p50, p95 = _percentile(hist, edges, 0.5), _percentile(hist, edges, 0.95)
        lines.append(
            f"{task:<16}{len(replicas) or 1:>9}{entry.get('images_per_s') or 0:>10.1f}{busy:>6.0%}"
            f"{entry.get('batches', 0):>9}{p50:>9}{p95:>9}  {faults:<42}  {gpus}"
        )
    return lines


def _percentile(hist: list[int], edges: list[float], q: float) -> str:
    """Upper edge of the histogram bucket holding the q-quantile, e.g. ``<=50ms``."""
    total = sum(hist)
    if not total:
        return "-"
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= q * total:
            return f"<={edges[index] * 1000:g}ms" if index < len(edges) else f">{edges[-1]:g}s"
    return "-"


def _list_source(run: dict[str, Any]) -> tuple[Source | None, list[InputShard] | None]:
    """The input source and its shards, when they can still be listed from here."""
    try:
        source = build_source(SourceConfig(**run["source_config"]))
        return source, source.shards()
    except (OSError, ValueError, KeyError, TypeError) as exc:  # ConfigError is a ValueError
        logger.debug("cannot list the input shards: %s", exc)
        return None, None


def download_summaries(run: dict[str, Any]) -> list[DownloadSummary]:
    """The download stats (img2dataset ``*_stats.json``) of each folder a webdataset source reads."""
    config = run.get("source_config") or {}
    if config.get("format") != "webdataset" or not config.get("path"):
        return []
    folders = sorted({url.rsplit("/", 1)[0] for url in expand_shard_urls(config["path"])})
    summaries = []
    for folder in folders:
        try:
            summary = read_download_summary(folder)
        except (OSError, ValueError) as exc:  # unreadable stats must not hide the labelling status
            logger.warning("cannot read the download stats in %s: %s", folder, exc)
            continue
        if summary is not None:
            summaries.append(summary)
    return summaries


def format_status(status: OutputStatus) -> str:
    total = "?" if status.shards_total is None else status.shards_total
    pending = "?" if status.pending is None else status.pending
    lines = [
        f"output   {status.root}  (dataset {status.dataset})",
        f"shards   {status.done} done / "
        + (f"{len(status.damaged)} damaged / " if status.damaged else "")
        + f"{len(status.failed)} failed / {pending} pending / {total} total",
        f"samples  {status.samples}  "
        + ", ".join(f"{k}={v}" for k, v in sorted(status.sample_status.items())),
        "",
        f"{'expert':<16}{'shards':>8}{'ok':>10}{'failed':>8}{'stale':>7}",
    ]
    for task, entry in sorted(status.experts.items()):
        lines.append(
            f"{task:<16}{entry['shards']:>8}{entry['ok']:>10}{entry['failed']:>8}{entry['stale']:>7}"
        )
    for shard_id, error in sorted(status.failed.items()):
        lines.append(f"failed shard {shard_id}: {error}")
    for shard_id, error in sorted(status.input_errors.items()):
        lines.append(f"damaged input {shard_id}: {error}")
    for shard_id, why in sorted(status.damaged.items()):
        lines.append(
            f"damaged shard {shard_id}: {why} (not done: the next run or verify --repair relabels it)"
        )
    for shard_id, why in sorted(status.stale_inputs.items()):
        lines.append(f"stale shard {shard_id}: {why} (the next run relabels it)")
    if status.run_stats:
        lines += ["", *format_run_stats(status.run_stats)]
    for summary in status.downloads:
        lines += ["", format_download_summary(summary)]
    return "\n".join(lines)


# -- machine-readable status and the failure list ----------------------------------------------------
def status_as_dict(status: OutputStatus) -> dict[str, Any]:
    """Everything ``format_status`` prints, as JSON-able data (``status --json``)."""
    return {
        "output": status.root,
        "dataset": status.dataset,
        "has_problems": status.has_problems,
        "shards": {
            "total": status.shards_total,
            "done": status.done,
            "failed": len(status.failed),
            "damaged": len(status.damaged),
            "pending": status.pending,
            "stale": len(status.stale_inputs),
        },
        "samples": status.samples,
        "sample_status": dict(sorted(status.sample_status.items())),
        "experts": {task: dict(entry) for task, entry in sorted(status.experts.items())},
        "failed_shards": dict(sorted(status.failed.items())),
        "damaged_shards": dict(sorted(status.damaged.items())),
        "stale_shards": dict(sorted(status.stale_inputs.items())),
        "input_errors": dict(sorted(status.input_errors.items())),
        "run_stats": status.run_stats,
        "downloads": [_download_as_dict(summary) for summary in status.downloads],
    }


def _download_as_dict(summary: DownloadSummary) -> dict[str, Any]:
    return {
        **asdict(summary),
        "expected": summary.expected,
        "not_started": summary.not_started,
        "complete": summary.complete,
    }


@dataclass
class Failure:
    """One failure in an output: a sample, one expert on a sample, or a whole shard (``key`` None)."""

    shard: str
    key: str | None
    expert: str | None  # None: the sample (or shard) failed as a whole
    status: str
    reason: str


@dataclass
class FailureList:
    failures: list[Failure]  # the first ``limit``, in shard order
    total: int  # every failure the output's records count, shown or not
    has_problems: bool = False  # a failed or damaged shard (``status`` exits 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "has_problems": self.has_problems,
            "total": self.total,
            "shown": len(self.failures),
            "failures": [asdict(failure) for failure in self.failures],
        }


def list_failures(root: str, limit: int | None = None) -> FailureList:
    """The failures of ``root`` from its records: failed, damaged and damaged-input shards first, then
    each failed sample (``error`` column) and each failed expert of a ``partial`` sample
    (``expert_status``). Parquet files are read only until ``limit`` failures are found; the total
    comes from the done-records' counts."""
    store = OutputStore(root)
    status = output_status(root, count_source=False)
    done = status.done_records  # committed shards only: a damaged shard's records are not trusted
    failures = _shard_failures(status)
    total = len(failures) + sum(_recorded_failures(record) for record in done.values())
    for shard_id in sorted(done):
        if limit is not None and len(failures) >= limit:
            break
        if _recorded_failures(done[shard_id]):
            failures.extend(_sample_failures(store, shard_id))
    return FailureList(failures if limit is None else failures[:limit], total, status.has_problems)


def _shard_failures(status: OutputStatus) -> list[Failure]:
    rows = [Failure(sid, None, None, "shard_failed", error) for sid, error in sorted(status.failed.items())]
    rows += [Failure(sid, None, None, "shard_damaged", why) for sid, why in sorted(status.damaged.items())]
    rows += [Failure(sid, None, None, "input_error", e) for sid, e in sorted(status.input_errors.items())]
    return rows


def _recorded_failures(record: dict[str, Any]) -> int:
    """Failure rows a done-record counts: failed samples (``partial`` ones by their failed experts)."""
    counts = found if isinstance(found := record.get("status_counts"), dict) else {}
    whole = sum(_int(n) for state, n in counts.items() if state not in ("ok", "partial"))
    experts = listed if isinstance(listed := record.get("experts"), dict) else {}
    return whole + sum(_int(info.get("failed")) for info in experts.values() if isinstance(info, dict))


def _sample_failures(store: OutputStore, shard_id: str) -> Iterator[Failure]:
    try:
        with store.fs.open(store.records_path(shard_id), "rb") as handle:
            table = pq.read_table(handle, columns=["key", "status", "error", "expert_status"])
    except (OSError, pa.ArrowException) as exc:
        yield Failure(shard_id, None, None, "records_unreadable", f"{type(exc).__name__}: {exc}")
        return
    for row in table.to_pylist():
        if row["status"] == "ok":
            continue
        if row["status"] != "partial":
            yield Failure(shard_id, row["key"], None, row["status"], row["error"] or row["status"])
            continue
        for task, outcome in sorted(expert_outcomes(row["expert_status"]).items()):
            if outcome != "ok":
                # the records keep each expert's status only; its message is in the sample's json
                reason = f"{task} failed (its error is in {row['key']}.json of shards/{shard_id}.tar)"
                yield Failure(shard_id, row["key"], task, outcome, reason)


def expert_outcomes(text: str | None) -> dict[str, str]:
    """A records row's ``expert_status`` (task → ok/error/skipped); {} when it is not a JSON object."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(t): str(s) for t, s in value.items()} if isinstance(value, dict) else {}


def format_failures(listing: FailureList) -> str:
    lines = [f"{'shard':<12}{'key':<24}{'expert':<16}{'status':<18}reason"]
    for f in listing.failures:
        lines.append(f"{f.shard:<12}{f.key or '-':<24}{f.expert or '-':<16}{f.status:<18}{f.reason}")
    shown = len(listing.failures)
    if shown < listing.total:
        lines.append(f"{listing.total} failures, {shown} shown (--limit 0 shows all)")
    else:
        lines.append(f"{listing.total} failures")
    return "\n".join(lines)
