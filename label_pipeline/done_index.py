"""What planning needs of each done-record, and the index that keeps it in one small file.

A rerun over 100k done shards must decide which are done (docs/FORMAT.md, "What done means") at the
cost of listing the folders, not of reading 100k files. The checks need, per shard, only a few fields
of its done-record: the sizes and mtimes/etags of the tar and Parquet it vouches for, the input
identity, the expert fingerprints and whether it has failures (``DoneEntry``).
``records/_done_index.json`` stores those fields column by column (lists of scalars parse several
times faster than one object per shard), each row with the size and mtime/etag of the done-record file
it was taken from; a row is used only while that file is listed with the same size and mtime/etag,
otherwise the done-record itself is read.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

from label_pipeline.inputs import FileStat

INDEX_VERSION = 2  # 1: a copy of each whole done-record per shard (planning parsed every field)
Key = tuple[int, int | str]  # one version of a done-record file: size and mtime_ns or etag


class DoneEntry(NamedTuple):
    """The fields of one done-record that planning checks."""

    tar_bytes: Any
    tar_change: int | str | None  # the tar's mtime_ns (local) or etag (object store); None: not recorded
    records_bytes: Any  # None: a record older than format 2, without ``records``
    records_change: int | str | None
    input_stat: dict[str, Any] | None
    fingerprints: dict[str, Any]  # task → recorded fingerprint
    has_failures: bool  # failed samples or a damaged input shard


def done_key(stat: FileStat | None) -> Key | None:
    """What tells one version of a done-record file from another: size and mtime_ns (local) or etag
    (object stores), as listed. None: not listed with a stat; such a file is never taken from a cache."""
    if stat is None:
        return None
    change = stat.etag if stat.etag is not None else stat.mtime_ns
    return None if change is None else (stat.size, change)


def entry_of(shard_id: str, record: Any) -> DoneEntry | None:
    """The planning fields of a done-record (None: not a usable done-record of this shard)."""
    if not isinstance(record, dict) or record.get("shard") != shard_id or "bytes" not in record:
        return None
    tar_change = _change(record.get("tar_stat", {}))
    records = record.get("records")
    records_change = _change(records) if records is not None else None
    if tar_change is False or records_change is False or (records is not None and "bytes" not in records):
        return None
    experts = record.get("experts")
    fingerprints = {
        task: info.get("fingerprint") if isinstance(info, dict) else None
        for task, info in (experts.items() if isinstance(experts, dict) else ())
    }
    input_stat = record.get("input_stat")
    return DoneEntry(
        record["bytes"],
        tar_change,
        records["bytes"] if records is not None else None,
        records_change,
        input_stat if isinstance(input_stat, dict) else None,
        fingerprints,
        bool(record.get("failed") or record.get("input_error")),
    )


def _change(stat: Any) -> int | str | None | bool:
    """The recorded mtime_ns or etag of a file; False when the stat is malformed."""
    if not isinstance(stat, dict):
        return False
    if "mtime_ns" in stat:
        value = stat["mtime_ns"]
        return value if isinstance(value, int) and not isinstance(value, bool) else False
    if "etag" in stat:
        return stat["etag"] if isinstance(stat["etag"], str) else False
    return None


def mismatch(entry: DoneEntry, tar: FileStat | None, records: FileStat | None) -> str | None:
    """Why the listed tar and Parquet file are not what the done-record vouches for (None: they are)."""
    problem = _stat_mismatch("tar", tar, entry.tar_bytes, entry.tar_change)
    if problem is None and entry.records_bytes is not None:
        problem = _stat_mismatch("records", records, entry.records_bytes, entry.records_change)
    return problem


def _stat_mismatch(what: str, stat: FileStat | None, size: Any, change: int | str | None) -> str | None:
    if stat is None:
        return f"{what} missing"
    if stat.size != size:
        return f"{what} has {stat.size} bytes, the done-record says {size}"
    if isinstance(change, int) and stat.mtime_ns is not None and stat.mtime_ns != change:
        return f"{what} was modified after it was committed"
    if isinstance(change, str) and stat.etag is not None and stat.etag != change:
        return f"{what} was replaced after it was committed"
    return None


# -- the index file --------------------------------------------------------------------------------
_COLUMNS = ("tar_bytes", "tar_change", "records_bytes", "records_change", "input_stat")


def encode_index(rows: Mapping[str, tuple[Key, DoneEntry]]) -> dict[str, Any]:
    """The index as JSON-able columns; rows with the same experts share one fingerprint map."""
    tables: dict[str, int] = {}
    seen: dict[int, int] = {}  # id of a fingerprint map → its table row (decoded rows share maps)
    experts: list[dict[str, Any]] = []
    refs = []
    for _, entry in rows.values():
        ref = seen.get(id(entry.fingerprints))
        if ref is None:
            text = json.dumps(entry.fingerprints, sort_keys=True, default=str)
            ref = seen[id(entry.fingerprints)] = tables.setdefault(text, len(experts))
            if ref == len(experts):
                experts.append(entry.fingerprints)
        refs.append(ref)
    entries = [entry for _, entry in rows.values()]
    return {
        "version": INDEX_VERSION,
        "shards": list(rows),
        "done_bytes": [key[0] for key, _ in rows.values()],
        "done_change": [key[1] for key, _ in rows.values()],
        **{name: [getattr(entry, name) for entry in entries] for name in _COLUMNS},
        "experts": experts,
        "experts_ref": refs,
        "has_failures": [entry.has_failures for entry in entries],
    }


def decode_index(data: Any) -> dict[str, tuple[Key, DoneEntry]]:
    """shard id → (key, entry) from an index file's content; empty when it is not a valid index."""
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        return {}
    names = ("shards", "done_bytes", "done_change", *_COLUMNS, "experts_ref", "has_failures")
    columns = [data.get(name) for name in names]
    experts = data.get("experts")
    lists = [column for column in columns if isinstance(column, list)]
    if len(lists) != len(names) or len({len(column) for column in lists}) != 1:
        return {}
    shards, done_bytes, done_change, *fields, refs, failures = lists
    if not isinstance(experts, list) or not all(isinstance(m, dict) for m in experts):
        return {}
    try:
        fingerprints = [experts[ref] for ref in refs]
        entries = map(partial(tuple.__new__, DoneEntry), zip(*fields, fingerprints, failures))
        return dict(zip(shards, zip(zip(done_bytes, done_change), entries)))
    except (IndexError, TypeError):  # a reference out of range, an unhashable shard id
        return {}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Parsing builds ~10^5 acyclic objects: the cycle collector would walk them again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_index(raw: bytes | None) -> dict[str, tuple[Key, DoneEntry]]:
    if not raw:
        return {}
    with gc_paused():
        try:
            return decode_index(json.loads(raw))
        except (ValueError, UnicodeDecodeError):  # a cache: a torn or foreign file is just ignored
            return {}
