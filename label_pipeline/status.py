"""``label-pipeline status``: what an output root holds, from its records (no tar is read)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.config import ConfigError, SourceConfig
from label_pipeline.download import DownloadSummary, format_download_summary, read_download_summary
from label_pipeline.output import OutputStore
from label_pipeline.sources import build_source
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
    run_stats: dict[str, Any] | None = None  # the latest OUT/stats/*.json (written by the Ray runner)
    downloads: list[DownloadSummary] = field(default_factory=list)  # img2dataset stats beside the inputs

    @property
    def pending(self) -> int | None:
        return None if self.shards_total is None else self.shards_total - self.done - len(self.failed)


def output_status(root: str, count_source: bool = True) -> OutputStatus:
    store = OutputStore(root)
    run = store.read_run()
    if run is None:
        raise ConfigError(f"{root} is not a label-pipeline output (no _run.json)")
    done = store.done_shards()
    failed = {sid: rec.get("error", "") for sid, rec in store.failed_shards().items() if sid not in done}
    status = OutputStatus(
        root,
        run.get("dataset"),
        _count_shards(run) if count_source else None,
        len(done),
        failed,
        samples=sum(r["samples"] for r in done.values()),
    )
    for record in done.values():
        status.sample_status.update(record.get("status_counts", {}))
        if record.get("input_error"):
            status.input_errors[record["shard"]] = record["input_error"]
        for task, info in record.get("experts", {}).items():
            entry = status.experts.setdefault(task, {"shards": 0, "ok": 0, "failed": 0, "stale": 0})
            entry["shards"] += 1
            entry["ok"] += info.get("ok", 0)
            entry["failed"] += info.get("failed", 0)
            current = run.get("experts", {}).get(task, {}).get("fingerprint")
            entry["stale"] += int(info.get("fingerprint") != current)
    status.run_stats = latest_run_stats(store)
    if count_source:
        status.downloads = download_summaries(run)
    return status


def latest_run_stats(store: OutputStore) -> dict[str, Any] | None:
    """The newest run statistics file (names start with a UTC timestamp)."""
    for path in sorted(store.fs.glob(f"{store.root}/stats/*.json"), reverse=True):
        stats = store.read_json(path)
        if stats is not None:
            return stats
    return None


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
            f"{task:<16}{len(replicas):>9}{entry.get('images_per_s') or 0:>10.1f}{busy:>6.0%}"
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


def _count_shards(run: dict[str, Any]) -> int | None:
    """Total input shards, when the source can still be listed from here."""
    try:
        return len(build_source(SourceConfig(**run["source_config"])).shards())
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        f"shards   {status.done} done / {len(status.failed)} failed / {pending} pending / {total} total",
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
    if status.run_stats:
        lines += ["", *format_run_stats(status.run_stats)]
    for summary in status.downloads:
        lines += ["", format_download_summary(summary)]
    return "\n".join(lines)
