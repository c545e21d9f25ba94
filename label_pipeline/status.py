"""``label-pipeline status``: what an output root holds, from its records (no tar is read)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.config import ConfigError, SourceConfig
from label_pipeline.output import OutputStore
from label_pipeline.sources import build_source


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
    return status


def _count_shards(run: dict[str, Any]) -> int | None:
    """Total input shards, when the source can still be listed from here."""
    try:
        return len(build_source(SourceConfig(**run["source_config"])).shards())
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    return "\n".join(lines)
