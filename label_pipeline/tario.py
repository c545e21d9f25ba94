"""Byte-reproducible tar writing and sample-grouped tar reading.

Tars are GNU format with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the same
members in the same order always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

Member = tuple[str, bytes]


class HashingWriter(io.RawIOBase):
    """A write-only stream that forwards to ``target`` and keeps a running sha256 and size."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.target.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(target: BinaryIO, samples: Iterable[Iterable[Member]]) -> None:
    """Write samples (each a list of ``(member name, bytes)``) in order; members sorted per sample."""
    with tarfile.open(fileobj=target, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for members in samples:
            for name, data in sorted(members):
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


class HashingReader:
    """Wraps a binary file for reading; counts and hashes every byte read through it."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_tar_samples(
    source: BinaryIO, errors: list[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for consecutive members sharing a key (webdataset rule).

    A tar cut short is an error even where Python's tarfile would stop quietly (a cut inside a
    header): the end-of-archive blocks must be there. With ``errors`` given, a damaged tar ends the
    iteration after the last whole member (the sample being read is still yielded) and the problem
    is appended to ``errors``; without it a ``tarfile.ReadError`` propagates.
    """
    reader = source if isinstance(source, HashingReader) else HashingReader(source)
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if current is not None and key != current:
                    yield current, members
                    members = {}
                current = key
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle else b""
            end_of_members = tar.offset
        reader.drain()
        if reader.size < end_of_members + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(
                f"truncated tar: ends at byte {reader.size} without end-of-archive blocks"
            )
    except (tarfile.TarError, EOFError, OSError) as exc:
        if errors is None:
            raise
        errors.append(f"{type(exc).__name__}: {exc}")
    if current is not None:
        yield current, members


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = everything before the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext
