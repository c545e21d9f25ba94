"""The output root: atomic shard commits, per-shard records, the run manifest and the run lock.

A shard is committed in this order (docs/FORMAT.md): tar to a temp name → fsync → rename; parquet
records; done-record last. A done-record names the size, sha256 and mtime/etag of the tar and of the
records it vouches for; a shard counts as done only while both still match (``committed_shards``), so
a run killed at any point, or a file changed afterwards, leaves nothing that looks finished but isn't.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import methodcaller
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from label_pipeline.core.format import encode_json
from label_pipeline.core.tario import HashingWriter, Member, write_tar
from label_pipeline.core.timestamps import utc_now
from label_pipeline.done_index import (
    DoneEntry,
    Key,
    done_key,
    encode_index,
    entry_of,
    gc_paused,
    mismatch,
    parse_index,
)
from label_pipeline.inputs import FileStat, is_local, list_folder, list_names, remote_stat

logger = logging.getLogger(__name__)
# 2: done-records carry tar/records stats and the input's identity; 3: label PNGs use zlib's RLE
# strategy (core/format.py), and each done-record names the version that wrote it
FORMAT_VERSION = 3
RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("expert_status", pa.string()),
        ("image_bytes", pa.int64()),
        ("label_bytes", pa.int64()),
    ]
)


# One listing each of shards/ and records/: basename → size and mtime/etag (None: not stat-ed).
Listing = tuple[dict[str, FileStat | None], dict[str, FileStat | None]]


class OutputLocked(RuntimeError):
    """Another live run holds the output root."""


@dataclass
class ShardWrite:
    """What a committed file is: its sha256 and size, plus the stat that detects a later change."""

    sha256: str
    size: int
    stat: dict[str, Any] | None = None  # {"mtime_ns": …} locally, {"etag": …} on object stores

    def as_record(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.size, **(self.stat or {})}


class OutputStore:
    """Everything the pipeline reads and writes under one output root (any fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.url = root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = is_local(self.fs)
        self._lock_handle: Any = None  # the open, flock-ed lock file while this process holds it

    # -- paths ---------------------------------------------------------------------------------
    def shard_path(self, shard_id: str) -> str:
        return f"{self.root}/shards/{shard_id}.tar"

    def records_path(self, shard_id: str) -> str:
        return f"{self.root}/records/{shard_id}.parquet"

    def done_path(self, shard_id: str) -> str:
        return f"{self.root}/records/{shard_id}.done.json"

    def failed_path(self, shard_id: str) -> str:
        return f"{self.root}/records/{shard_id}.failed.json"

    @property
    def run_path(self) -> str:
        return f"{self.root}/_run.json"

    @property
    def lock_path(self) -> str:
        return f"{self.root}/_lock"

    def prepare(self) -> Listing:
        """Create the layout and delete temp files of runs that died (safe: we hold the lock).

        Returns the listing of ``shards/`` and ``records/`` it looked through (temp files left out),
        for the planning that follows: a rerun lists each folder once (``committed_entries``).
        """
        for sub in ("shards", "records", "stats"):
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)
        tars, records = self.listing()
        stats = dict.fromkeys(list_names(self.fs, f"{self.root}/stats"))
        for sub, names in (("shards", tars), ("records", records), ("stats", stats)):
            for name in sorted(name for name in names if ".tmp-" in name):
                logger.info("removing %s/%s/%s left by an interrupted run", self.root, sub, name)
                self._remove_quietly(f"{self.root}/{sub}/{name}")
                del names[name]
        return tars, records

    # -- atomic writes ---------------------------------------------------------------------------
    def write_shard(self, shard_id: str, samples: Iterable[Iterable[Member]]) -> ShardWrite:
        """Stream samples into a temp tar, make it durable, then rename it into place."""
        final = self.shard_path(shard_id)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with self.fs.open(tmp, "wb") as handle:
                hashing = HashingWriter(handle)
                write_tar(hashing, samples)
                self._sync(handle)
            self._rename(tmp, final)
        except BaseException:
            self._remove_quietly(tmp)
            raise
        return ShardWrite(hashing.sha256.hexdigest(), hashing.size, self.file_stat(final))

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with self.fs.open(tmp, "wb") as handle:
                handle.write(data)
                self._sync(handle)
            self._rename(tmp, path)
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def _sync(self, handle: Any) -> None:
        if self.local:
            handle.flush()
            os.fsync(handle.fileno())

    def _rename(self, src: str, dst: str) -> None:
        if self.local:
            os.replace(src, dst)  # atomic on POSIX
            directory = os.open(os.path.dirname(dst), os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        else:
            self.fs.mv(src, dst)  # object stores: the final object appears whole or not at all

    def file_stat(self, path: str) -> dict[str, Any]:
        """The change detector of a file just written: mtime_ns locally, etag on object stores."""
        if self.local:
            return {"mtime_ns": os.stat(path).st_mtime_ns}
        etag = remote_stat(self.fs.info(path)).etag
        return {"etag": etag} if etag is not None else {}

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    # -- records ---------------------------------------------------------------------------------
    def write_records(self, shard_id: str, rows: list[dict[str, Any]]) -> ShardWrite:
        table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        path = self.records_path(shard_id)
        self.write_bytes_atomic(path, data)
        return ShardWrite(hashlib.sha256(data).hexdigest(), len(data), self.file_stat(path))

    def read_records(self, shard_id: str) -> pa.Table:
        with self.fs.open(self.records_path(shard_id), "rb") as handle:
            return pq.read_table(handle)

    def write_done(self, shard_id: str, record: dict[str, Any]) -> None:
        self.write_bytes_atomic(self.done_path(shard_id), encode_json(record))
        if self.fs.exists(self.failed_path(shard_id)):
            self.fs.rm(self.failed_path(shard_id))

    def write_failed(self, shard_id: str, error: str, attempts: int = 1) -> None:
        record = {"shard": shard_id, "error": error, "attempts": attempts, "time": utc_now()}
        self.write_bytes_atomic(self.failed_path(shard_id), encode_json(record))

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            if self.local:  # plain I/O: fsspec's per-call overhead dominates for small files
                with open(path, "rb") as handle:
                    return json.loads(handle.read())
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            logger.warning("%s is not valid JSON; treating it as absent", path)
            return None

    def _judge_done_record(
        self, shard_id: str, tar: FileStat | None, parquet: FileStat | None
    ) -> tuple[dict[str, Any] | None, DoneEntry | None, str | None]:
        """Read the shard's done-record and check the tar and Parquet stats against it:
        (the record, its planning entry, why the shard is not done; None when it is)."""
        record = self.read_json(self.done_path(shard_id))
        entry = entry_of(shard_id, record)
        problem = "done-record unreadable" if entry is None else mismatch(entry, tar, parquet)
        return record, entry, problem

    def listing(self) -> Listing:
        """One listing each of ``shards/`` and ``records/``: basename → size and mtime/etag (None for
        files whose presence is all that matters: failure records, the caches, temp files)."""
        return (
            list_folder(self.fs, f"{self.root}/shards", _stat_in_shards),
            list_folder(self.fs, f"{self.root}/records", _stat_in_records),
        )

    # Planning and the readers (status, report, export) decide what is committed (docs/FORMAT.md,
    # "What done means", checks 1-3) from one listing each of shards/ and records/. Two caches spare
    # them a read per done-record: _done_index.json holds the fields planning needs, _done_records.json
    # whole done-records for the readers. A cache row is used only while the done-record file it was
    # taken from is listed with the same size and mtime/etag (``done_key``).
    @property
    def index_path(self) -> str:
        return f"{self.root}/records/_done_index.json"

    @property
    def records_cache_path(self) -> str:
        return f"{self.root}/records/_done_records.json"

    def committed_entries(
        self, shard_ids: Iterable[str], save_index: bool = False, listing: Listing | None = None
    ) -> tuple[dict[str, DoneEntry], dict[str, str]]:
        """What planning needs: ({shard: entry} of done-records the files still match, {shard: why
        not} for the others); a shard without a done-record is in neither.

        Costs one listing of ``shards/`` and ``records/``, one read of ``_done_index.json`` and one
        read per done-record that the index does not hold as listed; no tar or Parquet file is opened.
        ``save_index`` (lock holders only) rewrites the index when it was out of date. ``listing``: the
        one ``prepare`` just made (nothing was written to the two folders since), else one is made.
        """
        tars, records = listing or self.listing()
        index = self._read_cache(self.index_path, parse_index)
        at = 1 if self.local else 2  # the FileStat field a recorded change is in: mtime_ns or etag
        fresh: dict[str, tuple[Key, dict[str, Any]]] = {}  # done-records read: for both caches
        done: dict[str, DoneEntry] = {}
        damaged: dict[str, str] = {}
        for shard_id in shard_ids:
            stat = records.get(f"{shard_id}.done.json")
            if stat is None:
                continue
            tar, parquet = tars.get(f"{shard_id}.tar"), records.get(f"{shard_id}.parquet")
            row = index.get(shard_id)
            if row is not None and tar is not None and parquet is not None:
                # The common case, spelled out (it runs 10^5 times): the done-record, tar and Parquet
                # file are listed exactly as indexed, so checks 1-3 hold as they did then.
                (size, changed), entry = row
                if (
                    stat[0] == size
                    and stat[at] == changed
                    and tar[0] == entry[0]
                    and tar[at] == entry[1]
                    and parquet[0] == entry[2]
                    and parquet[at] == entry[3]
                ):
                    done[shard_id] = entry
                    continue
            # Not indexed as listed, or the files differ from the indexed row (a row of an older
            # version of the file, damage, a record older than format 2): the done-record decides.
            key = done_key(stat)
            if row is not None and key is not None and row[0] == key and not mismatch(row[1], tar, parquet):
                done[shard_id] = row[1]
                continue
            record, entry, problem = self._judge_done_record(shard_id, tar, parquet)
            if record is not None and entry is not None and key is not None and row != (key, entry):
                fresh[shard_id] = (key, record)
            if entry is not None and problem is None:
                done[shard_id] = entry
            else:
                damaged[shard_id] = str(problem)
        if save_index and fresh:
            self._save_caches(fresh, records, index=index)
        return done, damaged

    def committed(
        self, shard_ids: Iterable[str], save_index: bool = False
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """(whole done-records that the files on disk still match, {shard: why not} for the others).

        The readers' view (status, report, export): the same checks as ``committed_entries``, with
        ``_done_records.json`` in place of the planning index. ``save_index`` (lock holders only)
        rewrites both caches when either was out of date (a run calls it once, at its end).
        """
        tars, records = self.listing()
        cache = self._read_cache(self.records_cache_path, _parse_records_cache)
        fresh: dict[str, tuple[Key, dict[str, Any]]] = {}
        done: dict[str, dict[str, Any]] = {}
        damaged: dict[str, str] = {}
        for shard_id in shard_ids:
            stat = records.get(f"{shard_id}.done.json")
            if stat is None:
                continue
            key = done_key(stat)
            tar, parquet = tars.get(f"{shard_id}.tar"), records.get(f"{shard_id}.parquet")
            row = cache.get(shard_id)
            if row is not None and key is not None and row[0] == key:
                entry = entry_of(shard_id, row[1])
                if entry is not None and not mismatch(entry, tar, parquet):
                    done[shard_id] = row[1]
                    continue
            record, _, problem = self._judge_done_record(shard_id, tar, parquet)
            if isinstance(record, dict) and key is not None and row != (key, record):
                fresh[shard_id] = (key, record)
            if record is not None and problem is None:
                done[shard_id] = record
            else:
                damaged[shard_id] = str(problem)
        if save_index and fresh:
            self._save_caches(fresh, records, cache=cache)
        return done, damaged

    def _save_caches(
        self,
        fresh: dict[str, tuple[Key, dict[str, Any]]],
        listed: dict[str, FileStat | None],
        index: dict[str, tuple[Key, DoneEntry]] | None = None,
        cache: dict[str, tuple[Key, dict[str, Any]]] | None = None,
    ) -> None:
        """Add the done-records just read to both caches (rows of other listed shards are kept), so
        that whichever reads next, a planning run or ``status``, reads one file."""
        if index is None:
            index = self._read_cache(self.index_path, parse_index)
        if cache is None:
            cache = self._read_cache(self.records_cache_path, _parse_records_cache)
        entries = dict(index)
        for shard_id, (key, record) in fresh.items():
            entry = entry_of(shard_id, record)
            if entry is not None:
                entries[shard_id] = (key, entry)
        whole = _still_listed({**cache, **fresh}, listed)
        content = {
            "version": 1,
            "key": {shard: key for shard, (key, _) in whole.items()},
            "records": {shard: record for shard, (_, record) in whole.items()},
        }
        self._write_cache(self.records_cache_path, content)
        self._write_cache(self.index_path, encode_index(_still_listed(entries, listed)))

    def _read_cache(self, path: str, parse: Callable[[bytes | None], dict[str, Any]]) -> dict[str, Any]:
        try:
            if self.local:  # plain I/O: fsspec's per-call overhead is not worth paying here
                with open(path, "rb") as handle:
                    return parse(handle.read())
            return parse(self.fs.cat_file(path))
        except FileNotFoundError:
            return {}

    def _write_cache(self, path: str, content: dict[str, Any]) -> None:
        try:
            self.write_bytes_atomic(path, encode_json(content))
        except OSError as exc:  # only a cache: a full disk here must not fail the run
            logger.warning("could not update the done-record cache %s: %s", path, exc)

    def done_shards(self) -> dict[str, dict[str, Any]]:
        """Every done-record present (not checked against the tars; see ``done_record``)."""
        records = {}
        for path in self.fs.glob(f"{self.root}/records/*.done.json"):
            record = self.read_json(path)
            if record is not None:
                records[record["shard"]] = record
        return records

    def failed_shards(self) -> dict[str, dict[str, Any]]:
        records = {}
        for path in self.fs.glob(f"{self.root}/records/*.failed.json"):
            record = self.read_json(path)
            if record is not None:
                records[record["shard"]] = record
        return records

    # -- run manifest and lock -------------------------------------------------------------------
    def read_run(self) -> dict[str, Any] | None:
        return self.read_json(self.run_path)

    def write_run(self, run: dict[str, Any]) -> None:
        self.write_bytes_atomic(self.run_path, encode_json({**run, "format_version": FORMAT_VERSION}))

    def acquire_lock(self, force: bool = False) -> None:
        """Take the output root for this process, or raise ``OutputLocked`` naming the holder.

        Locally the lock is an ``flock`` on ``_lock``: the kernel drops it when its holder dies, so a
        lock file left by a killed run (empty, garbage or naming a dead pid) never wedges the output.
        Object stores have no lock primitive: there the holder's json names host and pid, a holder on
        another host is assumed alive, and ``force`` takes it over.
        """
        self.fs.makedirs(self.root, exist_ok=True)
        mine = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": utc_now(),
            "token": uuid.uuid4().hex,
        }
        if self.local:
            self._acquire_flock(mine, force)
        else:
            self._acquire_object_lock(mine, force)

    def _acquire_flock(self, mine: dict[str, Any], force: bool) -> None:
        if force and os.path.exists(self.lock_path):
            logger.warning("--force-unlock: removing the lock of %s (%s)", self.url, self._holder_text())
            self._remove_quietly(self.lock_path)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLocked(
                    f"{self.url} is being written by another run ({self._holder_text()}); wait for it, "
                    "or pass --force-unlock if you are sure that run is gone"
                ) from None
            if _same_file(fd, self.lock_path):
                break
            os.close(fd)  # the holder released (unlinked) it between our open and flock: retry
        previous = os.pread(fd, 4096, 0)
        if previous:
            logger.warning(
                "taking over the lock of %s left by a run that is gone: %s", self.url, _text(previous)
            )
        self._lock_handle = fd
        try:  # the holder's json is for people and for status; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, encode_json(mine), 0)
        except OSError as exc:
            logger.warning(
                "could not write the holder of %s (%s); the lock is held all the same", self.url, exc
            )

    def _acquire_object_lock(self, mine: dict[str, Any], force: bool) -> None:
        holder = self.read_json(self.lock_path)  # garbage or empty reads as None: stale
        if holder is not None and not force and _holder_alive(holder):
            raise OutputLocked(
                f"{self.url} is being written by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('since')}; wait for it, or pass --force-unlock if that run is gone"
            )
        if self.fs.exists(self.lock_path):
            logger.warning("taking over the lock of %s left by %s", self.url, holder)
        self.fs.pipe_file(self.lock_path, encode_json(mine))
        if (self.read_json(self.lock_path) or {}).get("token") != mine["token"]:
            raise OutputLocked(f"{self.url} was locked by another run just now")
        self._lock_handle = mine["token"]

    def held_by_live_run(self) -> bool:
        """True while another live run holds the lock (a lock file left by a dead run does not count)."""
        if self._lock_handle is not None:
            return True
        if not self.local:
            holder = self.read_json(self.lock_path)
            return isinstance(holder, dict) and _holder_alive(holder)
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken and dropped at once: a probe
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _holder_text(self) -> str:
        try:
            with open(self.lock_path, "rb") as handle:
                return _text(handle.read(4096)) or "holder unknown"
        except OSError:
            return "holder unknown"

    def release_lock(self) -> None:
        if self._lock_handle is None:
            return
        handle, self._lock_handle = self._lock_handle, None
        if isinstance(handle, int):
            if _same_file(handle, self.lock_path):  # not if --force-unlock replaced it meanwhile
                self._remove_quietly(self.lock_path)
            os.close(handle)  # closing drops the flock
        elif (self.read_json(self.lock_path) or {}).get("token") == handle:
            self._remove_quietly(self.lock_path)


# Which listed files planning needs the size and mtime of (C-level predicates: one call per file).
_stat_in_shards = methodcaller("endswith", ".tar")
_stat_in_records = methodcaller("endswith", (".parquet", ".done.json"))


def _still_listed(rows: dict[str, Any], records: dict[str, FileStat | None]) -> dict[str, Any]:
    """The cache rows whose done-record is still there (a deleted one must not linger)."""
    return {shard: row for shard, row in rows.items() if f"{shard}.done.json" in records}


def _parse_records_cache(raw: bytes | None) -> dict[str, tuple[Key, dict[str, Any]]]:
    """shard id → (key, whole done-record) of ``_done_records.json``; empty when it is not valid."""
    if not raw:
        return {}
    with gc_paused():
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {}
    if not isinstance(data, dict) or data.get("version") != 1:
        return {}
    keys, records = data.get("key"), data.get("records")
    if not isinstance(keys, dict) or not isinstance(records, dict):
        return {}
    return {
        shard: ((keys[shard][0], keys[shard][1]), record)  # JSON has no tuples: [size, change]
        for shard, record in records.items()
        if isinstance(keys.get(shard), list) and len(keys[shard]) == 2
    }


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # can't check another machine: assume it is alive
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
