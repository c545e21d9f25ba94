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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from label_pipeline.core.format import encode_json
from label_pipeline.core.tario import HashingWriter, Member, write_tar
from label_pipeline.core.timestamps import utc_now
from label_pipeline.inputs import FileStat, is_local, list_folder, remote_stat

logger = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: done-records carry tar/records stats and the input's identity
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

    def prepare(self) -> None:
        """Create the layout and delete temp files of runs that died (safe: we hold the lock)."""
        for sub in ("shards", "records", "stats"):
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)
            for leftover in self.fs.glob(f"{self.root}/{sub}/*.tmp-*"):
                logger.info("removing %s left by an interrupted run", leftover)
                self.fs.rm(leftover)

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

    def done_record(self, shard_id: str) -> dict[str, Any] | None:
        """The shard's done-record if the tar and records on disk still match it, else None."""
        record = self.read_json(self.done_path(shard_id))
        tar, records = self._stat(self.shard_path(shard_id)), self._stat(self.records_path(shard_id))
        return record if _commit_mismatch(shard_id, record, tar, records) is None else None

    def _stat(self, path: str) -> FileStat | None:
        try:
            if self.local:
                result = os.stat(path)
                return FileStat(result.st_size, mtime_ns=result.st_mtime_ns)
            return remote_stat(self.fs.info(path))
        except FileNotFoundError:
            return None

    def listing(self) -> tuple[dict[str, FileStat | None], dict[str, FileStat | None]]:
        """One listing each of ``shards/`` and ``records/``: basename → size and mtime/etag
        (None for files whose presence is all that matters: done-records, failure records)."""
        return (
            list_folder(self.fs, f"{self.root}/shards", lambda name: name.endswith(".tar")),
            list_folder(self.fs, f"{self.root}/records", _stat_in_records),
        )

    def committed(
        self, shard_ids: Iterable[str], save_index: bool = False
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """(done-records that the files on disk still match, {shard: why not} for the others).

        Costs one listing of ``shards/`` and ``records/``, one read of the done-record index, and a
        read of each done-record the index does not hold as it is on disk; no tar or Parquet file is
        opened. A shard without a done-record is in neither result. ``save_index`` (lock holders
        only) rewrites the index when it was out of date.
        """
        tars, records = self.listing()
        index = self._read_index()
        fresh: dict[str, Any] = {}
        done: dict[str, dict[str, Any]] = {}
        damaged: dict[str, str] = {}
        for shard_id in shard_ids:
            name = f"{shard_id}.done.json"
            if name not in records:
                continue
            record = self._indexed_record(index, shard_id, records[name], fresh)
            problem = _commit_mismatch(
                shard_id, record, tars.get(f"{shard_id}.tar"), records.get(f"{shard_id}.parquet")
            )
            if problem is None:
                done[shard_id] = record
            else:
                damaged[shard_id] = problem
        if save_index and fresh:
            self._write_index(index, fresh, records)
        return done, damaged

    # The index is a cache of done-records, each entry valid only while its done-record file has
    # the size and mtime/etag stored with it: a rerun over 100k done shards reads one file, not 100k.
    @property
    def index_path(self) -> str:
        return f"{self.root}/records/_done_index.json"

    def _read_index(self) -> dict[str, Any]:
        index = self.read_json(self.index_path)
        entries = index.get("entries") if isinstance(index, dict) and index.get("version") == 1 else None
        return entries if isinstance(entries, dict) else {}

    def _indexed_record(
        self, index: dict[str, Any], shard_id: str, stat: FileStat | None, fresh: dict[str, Any]
    ) -> Any:
        entry = index.get(shard_id)
        key = stat.as_record() if stat is not None else None
        if isinstance(entry, dict) and key is not None and entry.get("stat") == key:
            return entry.get("record")
        record = self.read_json(self.done_path(shard_id))
        if key is not None and isinstance(record, dict):
            fresh[shard_id] = {"stat": key, "record": record}
        return record

    def _write_index(
        self, index: dict[str, Any], fresh: dict[str, Any], records: dict[str, FileStat | None]
    ) -> None:
        entries = {sid: e for sid, e in index.items() if f"{sid}.done.json" in records}
        entries.update(fresh)
        try:
            self.write_bytes_atomic(self.index_path, encode_json({"version": 1, "entries": entries}))
        except OSError as exc:  # only a cache: a full disk here must not fail the run
            logger.warning("could not update the done-record index %s: %s", self.index_path, exc)

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


def _stat_in_records(name: str) -> bool:
    """Which files of ``records/`` planning needs the size and mtime of."""
    return name.endswith((".parquet", ".done.json"))


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


def _commit_mismatch(
    shard_id: str, record: Any, tar: FileStat | None, records: FileStat | None
) -> str | None:
    """Why the files on disk are not what the done-record vouches for (None: they are)."""
    if not isinstance(record, dict) or record.get("shard") != shard_id or "bytes" not in record:
        return "done-record unreadable"
    problem = _stat_mismatch("tar", tar, {"bytes": record["bytes"], **record.get("tar_stat", {})})
    if problem is None and "records" in record:
        problem = _stat_mismatch("records", records, record["records"])
    return problem


def _stat_mismatch(what: str, stat: FileStat | None, expected: dict[str, Any]) -> str | None:
    if stat is None:
        return f"{what} missing"
    if stat.size != expected.get("bytes"):
        return f"{what} has {stat.size} bytes, the done-record says {expected.get('bytes')}"
    if "mtime_ns" in expected and stat.mtime_ns is not None and stat.mtime_ns != expected["mtime_ns"]:
        return f"{what} was modified after it was committed"
    if "etag" in expected and stat.etag is not None and stat.etag != expected["etag"]:
        return f"{what} was replaced after it was committed"
    return None


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
