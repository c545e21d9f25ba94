"""``label-pipeline verify``: re-read every committed shard and check it against its records.

Damage is what this command exists to show, so nothing in an output root may stop it: each damaged
shard becomes a problem line and the other shards are still checked. ``repair_output`` then takes
the damaged shards out of "done" and labels them again with the labelling recorded in ``_run.json``,
which gives the bytes of a clean run (tars and records are byte-reproducible).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from label_pipeline.config import ConfigError, Manifest, manifest_from_dict
from label_pipeline.core.format import ARRAY_ROWS_FOLLOW, IMAGE_EXTENSIONS, decode_npy, decode_png
from label_pipeline.core.tario import HashingReader, read_tar_samples
from label_pipeline.inputs import list_folder
from label_pipeline.output import OutputLocked, OutputStore
from label_pipeline.sources import build_source

logger = logging.getLogger(__name__)
DONE_SUFFIX = ".done.json"
REQUIRED_DONE_FIELDS = ("shard", "sha256", "bytes")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
MAX_SAMPLE_PROBLEMS = 5  # per shard; more are counted in one line instead of a wall of text


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)  # shard id → its problems
    general: list[str] = field(default_factory=list)  # problems of the root, not of one shard
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (e.g. uncommitted tars)

    @property
    def problems(self) -> list[str]:
        return self.general + [line for shard in sorted(self.damaged) for line in self.damaged[shard]]

    @property
    def ok(self) -> bool:
        return not self.general and not self.damaged


def verify_output(root: str) -> VerifyReport:
    """Check every done shard of ``root``; raises ConfigError only when ``root`` does not exist."""
    store = OutputStore(root)
    if not store.fs.isdir(store.root):
        raise ConfigError(f"{root}: no such output directory")
    report = VerifyReport()
    if store.read_run() is None:
        report.general.append(f"{root}: _run.json missing or unreadable (not a label-pipeline output?)")
        return report
    records = read_done_records(store)
    for shard_id, (record, error) in sorted(records.items()):
        report.shards += 1
        problems = (
            [f"{shard_id}: {error}"] if error else _verify_shard_safely(store, shard_id, record, report)
        )
        if problems:
            report.damaged[shard_id] = problems
    report.notes.extend(_uncommitted_notes(store, set(records)))
    return report


def read_done_records(store: OutputStore) -> dict[str, tuple[dict[str, Any], str | None]]:
    """shard id (from the file name) → (done-record, None) or ({}, why it is not a usable record)."""
    records: dict[str, tuple[dict[str, Any], str | None]] = {}
    for name in list_folder(store.fs, f"{store.root}/records"):
        if name.endswith(DONE_SUFFIX):
            shard_id = name[: -len(DONE_SUFFIX)]
            records[shard_id] = parse_done_record(store, shard_id)
    return records


def parse_done_record(store: OutputStore, shard_id: str) -> tuple[dict[str, Any], str | None]:
    try:
        record = json.loads(store.fs.cat_file(store.done_path(shard_id)))
    except FileNotFoundError:
        return {}, "done-record vanished while reading"
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, f"done-record is not valid JSON ({type(exc).__name__})"
    if not isinstance(record, dict):
        return {}, f"done-record is a JSON {type(record).__name__}, not an object"
    missing = [name for name in REQUIRED_DONE_FIELDS if name not in record]
    if missing:
        return record, f"done-record lacks field(s) {missing}"
    if record["shard"] != shard_id:
        return record, f"done-record names shard {record['shard']!r}"
    return record, None


def _uncommitted_notes(store: OutputStore, committed: set[str]) -> list[str]:
    """Tars without a done-record: what a killed run leaves; the next run labels them again."""
    orphans = sorted(
        name[: -len(".tar")]
        for name in list_folder(store.fs, f"{store.root}/shards")
        if name.endswith(".tar") and name[: -len(".tar")] not in committed
    )
    if not orphans:
        return []
    if run_in_progress(store):
        return [
            f"a run holds {store.lock_path}: {len(orphans)} tar(s) without a done-record may be in progress"
        ]
    return [
        f"{shard_id}: tar not committed (no done-record); the next run labels it again"
        for shard_id in orphans
    ]


def run_in_progress(store: OutputStore) -> bool:
    """A live run holds the output's lock (a lock file left by a dead run does not count)."""
    return store.held_by_live_run()


def _verify_shard_safely(store: OutputStore, shard_id: str, record: dict, report: VerifyReport) -> list[str]:
    try:
        return _verify_shard(store, shard_id, record, report)
    except Exception as exc:  # noqa: BLE001 - damage of any kind is a report line, never a traceback
        logger.debug("verifying %s failed", shard_id, exc_info=True)
        return [f"{shard_id}: cannot be checked ({type(exc).__name__}: {exc})"]


def _verify_shard(store: OutputStore, shard_id: str, record: dict, report: VerifyReport) -> list[str]:
    keys, error = _record_keys(store, shard_id, record)
    if error:
        return [f"{shard_id}: {error}"]
    seen: list[str] = []
    sample_problems: list[str] = []
    try:
        with store.fs.open(store.shard_path(shard_id), "rb") as raw:
            reader = HashingReader(raw)
            for key, members in read_tar_samples(reader):
                seen.append(key)
                sample_problems.extend(_verify_sample(shard_id, key, members, record))
    except FileNotFoundError:
        return [f"{shard_id}: tar missing"]
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        return [f"{shard_id}: tar unreadable ({type(exc).__name__}: {exc})"]
    report.samples += len(seen)
    problems = []
    if reader.sha256.hexdigest() != record["sha256"] or reader.size != record["bytes"]:
        problems.append(f"{shard_id}: checksum mismatch (sha256 or size differs from the done-record)")
    if seen != keys:
        problems.append(f"{shard_id}: keys in the tar differ from the records ({len(seen)} vs {len(keys)})")
    if "samples" in record and record["samples"] != len(seen):
        problems.append(
            f"{shard_id}: the done-record counts {record['samples']} samples, the tar holds {len(seen)}"
        )
    if len(seen) != len(set(seen)):
        problems.append(f"{shard_id}: duplicate keys")
    problems.extend(sample_problems[:MAX_SAMPLE_PROBLEMS])
    if len(sample_problems) > MAX_SAMPLE_PROBLEMS:
        problems.append(
            f"{shard_id}: … and {len(sample_problems) - MAX_SAMPLE_PROBLEMS} more sample problems"
        )
    return problems


def _record_keys(store: OutputStore, shard_id: str, record: dict) -> tuple[list[str], str | None]:
    """The keys of the shard's records, or why they cannot be read or are not the committed ones."""
    try:
        data = store.fs.cat_file(store.records_path(shard_id))
        table = pq.read_table(pa.BufferReader(data))
    except FileNotFoundError:
        return [], "records parquet missing"
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid: not a parquet file
        return [], f"records unreadable ({type(exc).__name__}: {exc})"
    committed = record.get("records")  # {sha256, bytes, …}: written by format version 2 and later
    if isinstance(committed, dict) and committed.get("sha256") != hashlib.sha256(data).hexdigest():
        return [], "records checksum mismatch (sha256 differs from the done-record)"
    if "key" not in table.column_names:
        return [], "records have no 'key' column"
    return [str(key) for key in table.column("key").to_pylist()], None


def _verify_sample(shard_id: str, key: str, members: dict[str, bytes], record: dict) -> list[str]:
    where = f"{shard_id}/{key}"
    if "json" not in members:
        return [f"{where}: no json member"]
    try:
        meta = json.loads(members["json"])
    except ValueError:
        return [f"{where}: json member is not valid JSON"]
    if not isinstance(meta, dict) or not isinstance(meta.get("experts", {}), dict):
        return [f"{where}: json member is not a sample's metadata object"]
    problems = []
    size = tuple(meta.get("size") or ())
    recorded = found if isinstance(found := record.get("experts"), dict) else {}
    for task, info in meta.get("experts", {}).items():
        if not isinstance(info, dict) or info.get("status") != "ok":
            continue
        if f"{task}.png" not in members and f"{task}.npy" in members:  # a task without a map
            problems.extend(_verify_array(where, task, members))
        else:
            problems.extend(_verify_label(where, task, members.get(f"{task}.png"), size))
        expected = entry.get("fingerprint") if isinstance(entry := recorded.get(task), dict) else None
        if task in recorded and info.get("fingerprint") != expected:
            problems.append(f"{where}: {task} fingerprint differs from the shard record")
    if meta.get("status") in ("ok", "partial") and not any(ext in members for ext in IMAGE_EXTENSIONS):
        problems.append(f"{where}: labelled sample without its image")
    return problems


def _verify_label(where: str, task: str, png: bytes | None, size: tuple) -> list[str]:
    if png is None:
        return [f"{where}: {task} is ok in the json but has no {task}.png"]
    try:
        label = decode_png(png)
    except Exception as exc:  # noqa: BLE001 - PIL/zlib raise many types on damaged bytes
        return [f"{where}: {task}.png does not decode ({describe(exc)})"]
    if label.shape[:2] != size:
        return [f"{where}: {task}.png is {label.shape[:2]}, image is {size}"]
    return []


def _verify_array(where: str, task: str, members: dict[str, bytes]) -> list[str]:
    """An ``.npy`` member loads without pickle and, where its rows follow a json list, has one per entry."""
    try:
        array = decode_npy(members[f"{task}.npy"])
    except Exception as exc:  # noqa: BLE001 - numpy raises many types on damaged bytes
        return [f"{where}: {task}.npy does not load ({type(exc).__name__}: {exc})"]
    owner = ARRAY_ROWS_FOLLOW.get(task)
    if owner is None or f"{owner}.json" not in members:
        return []
    try:
        entries = json.loads(members[f"{owner}.json"])
    except ValueError:
        return []  # reported for its own task
    if array.ndim != 2 or not isinstance(entries, list) or array.shape[0] != len(entries):
        return [f"{where}: {task}.npy has shape {array.shape}, {owner}.json lists {len(entries)} entries"]
    return []


def describe(exc: BaseException) -> str:
    """``Type: message`` without object reprs such as ``<_io.BytesIO object at 0x7f…>`` (PIL's)."""
    return f"{type(exc).__name__}: {_OBJECT_REPR.sub('the bytes', str(exc))}"


# -- repair ------------------------------------------------------------------------------------------
@dataclass
class RepairResult:
    relabelled: list[str]  # shards taken out of "done" and labelled again
    failed: dict[str, str]  # shard id → why relabelling it failed
    after: VerifyReport  # verify of the output once repaired


def repair_output(root: str, report: VerifyReport, device: str = "auto") -> RepairResult:
    """Un-done the damaged shards of ``report`` and label them again as the output was labelled.

    The done-records of damaged shards are deleted first: they describe bytes that are no longer
    there, so they are wrong whether or not the relabelling succeeds (a later run relabels them).
    """
    from label_pipeline.run import RunOptions
    from label_pipeline.runners.local import run_local

    store = OutputStore(root)
    manifest = recorded_manifest(store, root)
    if run_in_progress(store):  # its planning may already count on the records repair would delete
        raise OutputLocked(
            f"{root} is being written by a run ({store.lock_path}); repair it once that run ends"
        )
    damaged = sorted(report.damaged)
    for shard_id in damaged:
        logger.info("repair: %s is no longer done (%s)", shard_id, "; ".join(report.damaged[shard_id]))
        try:
            store.fs.rm_file(store.done_path(shard_id))
        except FileNotFoundError:
            pass
    known = _input_shard_ids(manifest)
    failed = {
        sid: "not a shard of the input; its done-record was removed" for sid in damaged if sid not in known
    }
    relabelled: list[str] = []
    wanted = [sid for sid in damaged if sid in known]
    if wanted:
        options = RunOptions(output=root, only_shards=wanted)
        summary = run_local(manifest, options, progress=False, device=device)
        relabelled = [result.shard_id for result in summary.results]
        failed.update(summary.failed_shards)
    return RepairResult(relabelled, failed, verify_output(root))


def _input_shard_ids(manifest: Manifest) -> set[str]:
    try:
        return {shard.shard_id for shard in build_source(manifest.source).shards()}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot repair: the input cannot be listed ({type(exc).__name__}: {exc})") from exc


def recorded_manifest(store: OutputStore, root: str) -> Manifest:
    """The manifest an output was labelled with, rebuilt from its ``_run.json``."""
    run = store.read_run()
    if not isinstance(run, dict) or not isinstance(run.get("experts"), dict) or not run["experts"]:
        raise ConfigError(f"{root}: cannot repair, _run.json is missing, unreadable or names no experts")
    try:
        experts = [
            {"name": info["name"], "options": info.get("options") or {}}
            | ({"class": info["class"]} if info.get("class") else {})
            for _, info in sorted(run["experts"].items())
        ]
        data: dict[str, Any] = {
            "name": run["dataset"],
            "source": run["source_config"],
            "output": root,
            "experts": experts,
        }
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{root}: cannot repair, _run.json lacks {exc}") from exc
    for optional in ("decode", "batch_size"):  # recorded by newer runs; defaults otherwise
        if run.get(optional) is not None:
            data[optional] = run[optional]
    # The recorded values are already expanded: no ${VAR} may be substituted a second time.
    return manifest_from_dict(data, env={})
