"""Byte-reproducible tar writing and sample-grouped tar reading.

Tars are GNU format with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the same
members in the same order always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO

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


def write_tar(target: IO[bytes] | HashingWriter, samples: Iterable[Iterable[Member]]) -> None:
    """Write samples (each a list of ``(member name, bytes)``) in order; members sorted per sample.

    The bytes are those of ``tarfile.open(mode="w|", format=GNU_FORMAT)`` adding the same members
    (tarfile's own headers), written one sample per call: tarfile's stream copies every member
    through 16 kB reads and a re-sliced buffer, which made it the slowest part of the writer.
    """
    offset = 0
    for members in samples:
        parts: list[bytes] = []
        for name, data in sorted(members):
            parts += (_member_header(name, len(data)), data, _padding(len(data), tarfile.BLOCKSIZE))
        chunk = b"".join(parts)
        target.write(chunk)
        offset += len(chunk)
    # The end-of-archive blocks, then zeros up to a whole record, as tarfile's close writes them.
    offset += 2 * tarfile.BLOCKSIZE
    target.write(bytes(2 * tarfile.BLOCKSIZE) + _padding(offset, tarfile.RECORDSIZE))


def _padding(size: int, unit: int) -> bytes:
    return bytes(-size % unit)


# The fixed fields of ``_tarinfo``'s GNU header around the name, size and checksum.
_IDS = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"00000000000\0"
_TAIL = b"0" + bytes(100) + tarfile.GNU_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)  # type … padding
_FIXED_SUM = sum(_IDS) + sum(_MTIME) + sum(b" " * 8) + sum(_TAIL)  # the checksum counts its field as spaces


def _member_header(name: str, size: int) -> bytes:
    """``_tarinfo(name, size).tobuf(GNU_FORMAT)``, built directly for names that fit the header
    (tarfile spends ~30 µs a member); long names and huge sizes go through tarfile itself."""
    encoded = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(encoded) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field)
    return b"".join((encoded.ljust(100, b"\0"), _IDS, size_field, _MTIME, b"%06o\0 " % checksum, _TAIL))


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


@dataclass
class TarSample:
    """One sample as read from a tar (docs/FORMAT.md, "How input tar members become samples").

    Either the consecutive regular-file members sharing a key (``members``: suffix → bytes), or one
    member that is not a regular file: then ``members`` is empty and ``unsupported`` says what it is.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    unsupported: str | None = None


def read_tar_entries(
    source: BinaryIO | HashingReader, errors: list[str] | None = None, names_only: bool = False
) -> Iterator[TarSample]:
    """Every sample of a tar, in order, each member accounted for exactly once.

    Consecutive regular files with the same key form one sample; a suffix already present in the
    sample being read (compared without case) starts a new sample with the same key, so no member
    overwrites another. Any other member (hard or symbolic link, directory, device, FIFO) is a sample
    of its own with ``unsupported`` set: it is reported, never skipped.

    A tar cut short is an error even where Python's tarfile would stop quietly (a cut inside a
    header): the end-of-archive blocks must be there. With ``errors`` given, a damaged tar ends the
    iteration after the last whole member (the sample being read is still yielded) and the problem
    is appended to ``errors``; without it a ``tarfile.ReadError`` propagates.

    ``names_only``: members are listed with empty bytes and no member data is read; a seekable source
    is read header to header (the trainer replays shards this way to resume its data stream).
    """
    # A HashingReader streams; a plain seekable source listed by names is read header to header.
    stream: BinaryIO | HashingReader = source
    if not isinstance(source, HashingReader) and not (names_only and _seekable(source)):
        stream = HashingReader(source)
    group: TarSample | None = None
    try:
        mode = "r|*" if isinstance(stream, HashingReader) else "r:*"
        with tarfile.open(fileobj=stream, mode=mode) as tar:  # type: ignore[call-overload]
            for info in tar:
                key, ext = split_member_name(info.name)
                if not info.isfile():
                    if group is not None:
                        yield group
                        group = None
                    yield TarSample(key, unsupported=f"{info.name!r} is {describe_member_type(info)}")
                    continue
                if group is None or group.key != key or _has_suffix(group.members, ext):
                    if group is not None:
                        yield group
                    group = TarSample(key)
                handle = None if names_only else tar.extractfile(info)
                group.members[ext] = handle.read() if handle else b""
            end_of_members = tar.offset
        size = _drained_size(stream) if isinstance(stream, HashingReader) else stream.seek(0, io.SEEK_END)
        if size < end_of_members + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"truncated tar: ends at byte {size} without end-of-archive blocks")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if errors is None:
            raise
        errors.append(f"{type(exc).__name__}: {exc}")
    if group is not None:
        yield group


def read_tar_samples(
    source: BinaryIO | HashingReader, errors: list[str] | None = None, names_only: bool = False
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` per sample of regular files (see ``read_tar_entries``).

    For reading tars this package wrote (only regular files, distinct keys). Members that are not
    regular files are left out here; input shards are read with ``read_tar_entries``, which
    reports them.
    """
    for sample in read_tar_entries(source, errors, names_only):
        if sample.unsupported is None:
            yield sample.key, sample.members


def describe_member_type(info: tarfile.TarInfo) -> str:
    """What a non-regular tar member is, in words, e.g. ``a hard link to 'a.jpg'``."""
    if info.islnk():
        return f"a hard link to {info.linkname!r}"
    if info.issym():
        return f"a symbolic link to {info.linkname!r}"
    if info.isdir():
        return "a directory entry"
    if info.ischr():
        return "a character device"
    if info.isblk():
        return "a block device"
    if info.isfifo():
        return "a FIFO"
    return f"a member of tar type {info.type!r}"


def _seekable(source: object) -> bool:
    seekable = getattr(source, "seekable", None)
    return bool(seekable and seekable())


def _drained_size(reader: HashingReader) -> int:
    reader.drain()
    return reader.size


def _has_suffix(members: dict[str, bytes], ext: str) -> bool:
    wanted = ext.lower()
    return any(existing.lower() == wanted for existing in members)


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = everything before the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext
