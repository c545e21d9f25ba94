"""The output root: atomic shard commits, per-shard records, the run manifest and the run lock.

A shard is committed in this order (docs/FORMAT.md): tar to a temp name → fsync → rename; parquet
records; done-record last. Only a done-record whose size matches the tar marks a shard as done, so a
run killed at any point leaves nothing that looks finished but isn't.
"""

from __future__ import annotations

import datetime
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

from label_pipeline.format import encode_json
from label_pipeline.tario import HashingWriter, Member, write_tar

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
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
    sha256: str
    size: int


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


class OutputStore:
    """Everything the pipeline reads and writes under one output root (any fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.url = root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = _is_local(self.fs)

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
        return ShardWrite(sha256=hashing.sha256.hexdigest(), size=hashing.size)

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

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    # -- records ---------------------------------------------------------------------------------
    def write_records(self, shard_id: str, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes_atomic(self.records_path(shard_id), buffer.getvalue())

    def read_records(self, shard_id: str) -> pa.Table:
        with self.fs.open(self.records_path(shard_id), "rb") as handle:
            return pq.read_table(handle)

    def write_done(self, shard_id: str, record: dict[str, Any]) -> None:
        self.write_bytes_atomic(self.done_path(shard_id), encode_json(record))
        if self.fs.exists(self.failed_path(shard_id)):
            self.fs.rm(self.failed_path(shard_id))

    def write_failed(self, shard_id: str, error: str, attempts: int = 1) -> None:
        record = {"shard": shard_id, "error": error, "attempts": attempts, "time": _now()}
        self.write_bytes_atomic(self.failed_path(shard_id), encode_json(record))

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:
            logger.warning("%s is not valid JSON; treating it as absent", path)
            return None

    def done_record(self, shard_id: str) -> dict[str, Any] | None:
        """The shard's done-record if the tar on disk agrees with it (exists, same size), else None."""
        record = self.read_json(self.done_path(shard_id))
        if record is None:
            return None
        try:
            size = self.fs.size(self.shard_path(shard_id))
        except FileNotFoundError:
            return None
        return record if size == record.get("bytes") else None

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
        """Take the output root for this process; a lock left by a dead process on this host is stale."""
        self.fs.makedirs(self.root, exist_ok=True)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        holder = self.read_json(self.lock_path)
        if holder is not None and not force and _holder_alive(holder):
            raise OutputLocked(
                f"{self.url} is being written by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('since')}; wait for it, or pass --force-unlock if that run is gone"
            )
        if holder is not None:
            logger.warning("taking over the lock of %s left by %s", self.url, holder)
            self.fs.rm(self.lock_path)
        if self.local:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError as exc:  # lost a race with another starting run
                raise OutputLocked(f"{self.url} was locked by another run just now") from exc
            with os.fdopen(fd, "wb") as handle:
                handle.write(encode_json(mine))
        else:  # object stores have no exclusive create; last writer wins, documented in README
            self.fs.pipe_file(self.lock_path, encode_json(mine))

    def release_lock(self) -> None:
        holder = self.read_json(self.lock_path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.fs.rm(self.lock_path)


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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
