"""What the inputs are before any work starts: which shards exist, their identity, and overlap checks.

Everything here costs one directory listing per input folder, never a read or a stat per shard, so a
rerun over a million shards plans in seconds locally and in O(listing pages) requests on object stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import fsspec

from label_pipeline.sources.base import InputShard, Source
from label_pipeline.sources.chunked import ChunkedSource

logger = logging.getLogger(__name__)
# Keys that object stores use for a content version in a listing, most specific first.
_ETAG_KEYS = ("ETag", "etag", "md5Hash", "generation", "version_id", "VersionId")


class FileStat(NamedTuple):
    """A cheap change detector for one file: its size plus mtime_ns (local) or etag (object stores).

    A tuple, not a dataclass: planning builds one per listed file, hundreds of thousands per rerun.
    """

    size: int
    mtime_ns: int | None = None
    etag: str | None = None

    def as_record(self) -> dict[str, Any]:
        if self.etag is not None:
            return {"size": self.size, "etag": self.etag}
        return {"size": self.size, "mtime_ns": self.mtime_ns}


# FileStat(...) goes through a Python-level __new__; a listing of 10^5 files builds them in C instead.
_new_stat = partial(tuple.__new__, FileStat)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def list_folder(
    fs: fsspec.AbstractFileSystem, folder: str, stat: Callable[[str], bool] | None = None
) -> dict[str, FileStat | None]:
    """Basename → stat of every plain file directly in ``folder`` (empty when it does not exist).

    Object stores return size and etag with the listing (one request per page of 1,000 names).
    Locally a stat costs a system call per file: ``stat`` (a predicate on the name) limits them to the
    files whose size and mtime matter; the others map to None (present, not stat-ed).
    """
    if is_local(fs):
        return _list_local(folder, stat)
    try:
        listing = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {
        str(info["name"]).rstrip("/").rsplit("/", 1)[-1]: remote_stat(info)
        for info in listing
        if info.get("type") == "file"
    }


def _list_local(folder: str, stat: Callable[[str], bool] | None) -> dict[str, FileStat | None]:
    try:
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    listed: dict[str, FileStat | None] = {}
    try:  # entries of a listing by descriptor are stat-ed relative to it: no path walk per file
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.is_file():
                    continue
                name = entry.name
                if stat is None or stat(name):
                    result = entry.stat()
                    listed[name] = _new_stat((result.st_size, result.st_mtime_ns, None))
                else:
                    listed[name] = None
    finally:
        os.close(directory)
    return listed


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> set[str]:
    """Names of the files and sub-folders directly in ``folder``: one listing, no stat."""
    if is_local(fs):
        try:
            return set(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return set()
    try:
        return {str(name).rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return set()


def remote_stat(info: Mapping[str, Any]) -> FileStat:
    etag = next((str(info[k]).strip('"') for k in _ETAG_KEYS if info.get(k) not in (None, "")), None)
    if etag is None:  # no content version in the listing: fall back to the modification time
        modified = info.get("mtime") or info.get("LastModified") or info.get("updated")
        etag = f"mtime:{modified}" if modified is not None else None
    return FileStat(int(info.get("size") or 0), etag=etag)


def stat_files(urls: Iterable[str]) -> dict[str, FileStat | None]:
    """URL → stat (None when missing), listing each distinct parent folder once.

    Only the files asked for are stat-ed: an img2dataset folder also holds a Parquet and a stats
    json per shard, and a stat costs a system call locally.
    """
    by_folder: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_folder[url.rpartition("/")[0]].append(url)
    stats: dict[str, FileStat | None] = {}
    for folder, members in by_folder.items():
        fs, path = fsspec.core.url_to_fs(folder or ".")  # resolved once per folder, not per file
        names = [url[len(folder) + 1 :] if folder else url for url in members]
        listing = list_folder(fs, path, set(names).__contains__)
        stats.update(zip(members, map(listing.get, names)))
    return stats


def reads_files(source: Source) -> bool:
    """True when each shard's ``location`` is a file URL (tar sources); False for chunked sources."""
    return not isinstance(source, ChunkedSource)


def input_identities(source: Source, shards: Sequence[InputShard]) -> dict[str, dict[str, Any] | None]:
    """shard id → what identifies its input now (None: the input shard is missing).

    A tar shard is identified by its size and mtime/etag; a shard cut from an annotation file by a
    digest of its entries (keys, image paths, captions, ids), so edited annotations are noticed.
    """
    if reads_files(source):
        stats = stat_files(shard.location for shard in shards)
        return {
            shard.shard_id: None if (stat := stats[shard.location]) is None else stat.as_record()
            for shard in shards
        }
    assert isinstance(source, ChunkedSource)
    return {shard.shard_id: {"entries_sha256": _entries_digest(source, shard)} for shard in shards}


def _entries_digest(source: ChunkedSource, shard: InputShard) -> str:
    entries, keys = source._listing()
    start = int(shard.location) * source.shard_size
    digest = hashlib.sha256()
    for entry, key in zip(
        entries[start : start + source.shard_size], keys[start : start + source.shard_size]
    ):
        caption = (
            entry.caption.decode("utf-8", "replace") if isinstance(entry.caption, bytes) else entry.caption
        )
        row = [key, entry.raw_key, entry.image_url, caption, entry.source]
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# -- overlap between the output root and the inputs ------------------------------------------------
def _normalised(url: str) -> tuple[str, str]:
    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if is_local(fs):
        return "file", os.path.realpath(path)
    return str(protocol), path.rstrip("/")


def _inside(child: tuple[str, str], parent: tuple[str, str]) -> bool:
    if child[0] != parent[0]:
        return False
    return child[1] == parent[1] or child[1].startswith(parent[1].rstrip("/") + "/")


def overlap(output: str, input_files: Iterable[str], input_trees: Iterable[str]) -> str | None:
    """The first input path that the output root would overwrite or be read back as, else None.

    ``input_files`` are read as they are (tars, annotation files): the output must not contain them.
    ``input_trees`` are folders whose whole content is input (a folder source): they must not contain
    the output either, or the next listing would read labels as images.
    """
    out = _normalised(output)
    files = list(input_files)
    # a file is inside the output iff its folder is: normalise each distinct folder once
    for folder in dict.fromkeys(url.rpartition("/")[0] for url in files):
        if _inside(_normalised(folder or "."), out):
            return next(url for url in files if url.rpartition("/")[0] == folder)
    for url in input_trees:
        tree = _normalised(url)
        if _inside(tree, out) or _inside(out, tree):
            return url
    return None


def input_paths(config: Any) -> tuple[list[str], list[str]]:
    """(files read as they are, folders read as a whole) of a manifest's ``source`` block."""
    from label_pipeline.sources.webdataset import expand_shard_urls

    if config.format == "webdataset":
        return expand_shard_urls(config.path), []
    if config.format in ("folder", "demo"):
        return [], [config.path]
    files = list(config.annotations) if config.format == "coco" else [config.image_data, config.captions]
    return [f for f in files if f], [config.images]
