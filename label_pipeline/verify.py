"""``label-pipeline verify``: re-read every committed shard and check it against its records."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from label_pipeline.format import IMAGE_EXTENSIONS, decode_png
from label_pipeline.output import OutputStore
from label_pipeline.tario import HashingReader, read_tar_samples

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(root: str) -> VerifyReport:
    store = OutputStore(root)
    report = VerifyReport()
    run = store.read_run()
    if run is None:
        report.problems.append(f"{root}: no _run.json (not a label-pipeline output)")
        return report
    for shard_id, record in sorted(store.done_shards().items()):
        report.shards += 1
        report.problems.extend(_verify_shard(store, shard_id, record, report))
    return report


def _verify_shard(store: OutputStore, shard_id: str, record: dict, report: VerifyReport) -> list[str]:
    problems: list[str] = []
    try:
        keys = store.read_records(shard_id).column("key").to_pylist()
    except (FileNotFoundError, OSError) as exc:
        return [f"{shard_id}: records unreadable ({exc})"]
    seen: list[str] = []
    try:
        with store.fs.open(store.shard_path(shard_id), "rb") as raw:
            reader = HashingReader(raw)
            for key, members in read_tar_samples(reader):
                seen.append(key)
                problems.extend(_verify_sample(shard_id, key, members, record))
    except FileNotFoundError:
        return [f"{shard_id}: tar missing"]
    except (OSError, EOFError, ValueError) as exc:
        return [f"{shard_id}: tar unreadable ({type(exc).__name__}: {exc})"]
    report.samples += len(seen)
    if reader.sha256.hexdigest() != record.get("sha256") or reader.size != record.get("bytes"):
        problems.append(f"{shard_id}: checksum mismatch (sha256 or size differs from the done-record)")
    if seen != keys:
        problems.append(f"{shard_id}: keys in the tar differ from the records ({len(seen)} vs {len(keys)})")
    if len(seen) != len(set(seen)):
        problems.append(f"{shard_id}: duplicate keys")
    return problems


def _verify_sample(shard_id: str, key: str, members: dict[str, bytes], record: dict) -> list[str]:
    where = f"{shard_id}/{key}"
    if "json" not in members:
        return [f"{where}: no json member"]
    try:
        meta = json.loads(members["json"])
    except ValueError:
        return [f"{where}: json member is not valid JSON"]
    problems = []
    size = tuple(meta.get("size") or ())
    for task, info in meta.get("experts", {}).items():
        if info.get("status") != "ok":
            continue
        png = members.get(f"{task}.png")
        if png is None:
            problems.append(f"{where}: {task} is ok in the json but has no {task}.png")
            continue
        try:
            label = decode_png(png)
        except (OSError, ValueError) as exc:
            problems.append(f"{where}: {task}.png does not decode ({exc})")
            continue
        if label.shape[:2] != size:
            problems.append(f"{where}: {task}.png is {label.shape[:2]}, image is {size}")
        if (
            task in record.get("experts", {})
            and info.get("fingerprint") != record["experts"][task]["fingerprint"]
        ):
            problems.append(f"{where}: {task} fingerprint differs from the shard record")
    if meta.get("status") in ("ok", "partial") and not any(ext in members for ext in IMAGE_EXTENSIONS):
        problems.append(f"{where}: labelled sample without its image")
    return problems
