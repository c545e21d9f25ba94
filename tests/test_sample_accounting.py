"""Every input sample is accounted for: rows in the records == samples read, for every shard.

An adversarial tar (duplicate keys, repeated suffixes, links, a directory, devices, dotted names,
empty and broken images, odd characters) is labelled through the CLI; a property test checks the
reader and the WebDataset source over random member sequences; a run twice over broken images gives
the same bytes (no memory address or other run-dependent text in any member or record).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from builders import gradient, image_bytes, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_zoo.base import ExpertSpec, Label
from label_pipeline.cli import main
from label_pipeline.config import DecodeConfig
from label_pipeline.core.tario import read_tar_entries
from label_pipeline.labeler import Labeler, item_from_sample, stable_error_text
from label_pipeline.shard_job import _labelled_members
from label_pipeline.sources.base import InputShard, Sample, ShardReadReport
from label_pipeline.sources.webdataset import WebDatasetSource

JPG = image_bytes(gradient(20, 30))
SPECIAL_TYPES = {
    "hard link": tarfile.LNKTYPE,
    "symbolic link": tarfile.SYMTYPE,
    "directory entry": tarfile.DIRTYPE,
    "character device": tarfile.CHRTYPE,
    "block device": tarfile.BLKTYPE,
    "FIFO": tarfile.FIFOTYPE,
}


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: str, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = SPECIAL_TYPES[kind]
    info.linkname = target
    return info, None


def tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def renamed(key: str) -> str:
    """The key a second sample with the same original key gets (docs/FORMAT.md)."""
    return f"{key}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


# (members, then the samples they must become: output key, status, a fragment of the error)
ADVERSARIAL = [
    regular("k0.jpg", JPG),
    regular("k0.txt", b"first"),
    regular("dup.jpg", JPG),  # the same key twice in a row: two samples
    regular("dup.txt", b"one"),
    regular("dup.jpg", JPG),
    regular("dup.txt", b"two"),
    regular("rep.jpg", JPG),
    regular("rep.JPG", JPG),  # a repeated suffix (whatever its case) starts a new sample
    special("hl.jpg", "hard link", "k0.jpg"),
    special("sl.jpg", "symbolic link", "k0.jpg"),
    special("subdir/", "directory entry"),
    special("pipe.jpg", "FIFO"),
    special("tty.jpg", "character device"),
    special("disk.jpg", "block device"),
    regular("photo.v2.jpg", JPG),  # key "photo", suffix "v2.jpg": not an image suffix
    regular("empty.jpg", b""),
    regular("we ird+key#1.jpg", JPG),
    regular("junk.jpg", b"this is not an image"),
    regular("trunc.jpg", JPG[: len(JPG) // 2]),
    regular("README", b"no suffix at all"),
    regular("k0.jpg", JPG),  # a key seen before, not consecutive: another sample, renamed
]
EXPECTED = [
    ("k0", "ok", None),
    ("dup", "ok", None),
    (renamed("dup"), "ok", None),
    ("rep", "ok", None),
    (renamed("rep"), "ok", None),
    ("hl", "unsupported_member", "'hl.jpg' is a hard link to 'k0.jpg'"),
    ("sl", "unsupported_member", "'sl.jpg' is a symbolic link to 'k0.jpg'"),
    ("subdir", "unsupported_member", "'subdir' is a directory entry"),  # tarfile drops the "/"
    ("pipe", "unsupported_member", "'pipe.jpg' is a FIFO"),
    ("tty", "unsupported_member", "'tty.jpg' is a character device"),
    ("disk", "unsupported_member", "'disk.jpg' is a block device"),
    ("photo", "no_image", None),
    ("empty", "empty_image", None),
    ("we_ird_key_1", "ok", None),
    ("junk", "undecodable", "UnidentifiedImageError"),
    ("trunc", "undecodable", None),
    ("README", "no_image", None),
    (renamed("k0"), "ok", None),
]


def label(tmp_path: Path, tar: bytes, out_name: str) -> tuple[int, Path]:
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir(exist_ok=True)
    shard.write_bytes(tar)
    out = tmp_path / out_name
    manifest = write_manifest(
        tmp_path / f"{out_name}.yaml", {"format": "webdataset", "path": str(shard)}, out, ["edge:canny"]
    )
    return main(["run", str(manifest), "--no-progress"]), out


def json_members(tar_path: Path) -> list[dict]:
    with tarfile.open(tar_path) as tar:
        return [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]


def test_adversarial_tar_every_sample_is_a_row(tmp_path):
    tar = tar_bytes(ADVERSARIAL)
    read = list(read_tar_entries(io.BytesIO(tar)))
    assert len(read) == len(EXPECTED)

    code, out = label(tmp_path, tar, "out")
    assert code == 1  # failed samples are in the output
    rows = pq.read_table(out / "records" / "00000.parquet").to_pylist()
    assert len(rows) == len(read)
    assert [(r["key"], r["status"]) for r in rows] == [(key, status) for key, status, _ in EXPECTED]
    for row, (_, _, fragment) in zip(rows, EXPECTED):
        if fragment is not None:
            assert fragment in row["error"]
    metas = json_members(out / "shards" / "00000.tar")
    assert [(m["key"], m["status"], m.get("error")) for m in metas] == [
        (r["key"], r["status"], r["error"]) for r in rows
    ]
    by_key = {m["key"]: m for m in metas}
    assert by_key["we_ird_key_1"]["source"]["key"] == "we ird+key#1"
    assert by_key["hl"]["error"].endswith("only regular files are read as sample members")
    done = json.loads((out / "records" / "00000.done.json").read_text())
    assert done["samples"] == len(read) and done["ok"] == sum(s == "ok" for _, s, _ in EXPECTED)
    assert main(["verify", str(out)]) == 0


def test_broken_images_label_to_the_same_bytes_twice(tmp_path):
    code_a, first = label(tmp_path, tar_bytes(ADVERSARIAL), "first")
    code_b, second = label(tmp_path, tar_bytes(ADVERSARIAL), "second")
    assert code_a == code_b == 1
    compared = 0
    for relative in ("shards/00000.tar", "records/00000.parquet"):
        digest_a = hashlib.sha256((first / relative).read_bytes()).hexdigest()
        assert digest_a == hashlib.sha256((second / relative).read_bytes()).hexdigest(), relative
        compared += 1
    assert compared == 2
    # The same allocation pattern could give equal addresses in both runs: look for any at all.
    for meta in json_members(first / "shards" / "00000.tar"):
        assert not re.search(r"0x[0-9a-fA-F]{6,}", json.dumps(meta)), meta


class RaisingExpert:
    """An expert whose exception text holds an object's repr (a memory address)."""

    spec = ExpertSpec(task="edge", backend="raising", version="1", mode="L", batch_size=2)

    def __call__(self, images: Sequence[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        raise RuntimeError(f"cannot use {object()!r}")

    def encode(self, label: Label) -> dict[str, bytes]:
        raise AssertionError("never reached")

    def fingerprint(self) -> str:
        return "raising-1"


def test_expert_errors_are_recorded_without_addresses():
    assert stable_error_text("cannot identify <_io.BytesIO object at 0x7f3a2c1d9e40>") == (
        "cannot identify <_io.BytesIO object>"
    )
    item = item_from_sample(Sample("a", JPG, "jpg", None, {"key": "a"}), DecodeConfig())
    Labeler({"edge": RaisingExpert()}).label([item])
    error = item.meta["experts"]["edge"]["error"]
    assert error == "RuntimeError: cannot use <object object>"


# --- property: random member sequences -------------------------------------------------------------

PNG = image_bytes(gradient(6, 5), fmt="PNG")
KEYS = ["a", "b", "A", "a b", "x.y", "dir/a", "_"]
SUFFIXES = ["jpg", "JPG", "png", "txt", "json", "seg.png", "dat", ""]
member_strategy = st.one_of(
    st.tuples(
        st.just("file"),
        st.sampled_from(KEYS),
        st.sampled_from(SUFFIXES),
        st.sampled_from([PNG, b"", b"garbage"]),
    ),
    st.tuples(st.sampled_from(sorted(SPECIAL_TYPES)), st.sampled_from(KEYS), st.sampled_from(SUFFIXES)),
)


def build_random_tar(spec: list[tuple]) -> tuple[bytes, list[tuple[str, str, bytes | None]]]:
    """The tar, and its members as ``(kind, name, data)`` in order."""
    members, flat = [], []
    for entry in spec:
        kind, key, suffix = entry[:3]
        name = f"{key}.{suffix}" if suffix else key
        if kind == "directory entry":
            name = f"{key}/"
        if kind == "file":
            members.append(regular(name, entry[3]))
            flat.append(("file", name, entry[3]))
        else:
            members.append(special(name, kind, "a.jpg" if kind.endswith("link") else ""))
            flat.append((kind, name, None))
    return tar_bytes(members), flat


class FakeEdge:
    """A cheap expert: an all-255 map per image."""

    spec = ExpertSpec(task="edge", backend="fake", version="1", mode="L", batch_size=3)

    def __call__(self, images: Sequence[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        return [Label(np.full(image.shape[:2], 255, np.uint8)) for image in images]

    def encode(self, label: Label) -> dict[str, bytes]:
        return {"png": b"edge"}

    def fingerprint(self) -> str:
        return "fake-1"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(member_strategy, min_size=0, max_size=14),
    budget=st.sampled_from([1, 150, 1 << 30]),
)
def test_every_member_lands_in_exactly_one_sample(spec, budget):
    tar, flat = build_random_tar(spec)
    entries = list(read_tar_entries(io.BytesIO(tar)))

    # 1. Reading back, in order, every member once: nothing dropped, nothing overwritten.
    read_back = []
    for entry in entries:
        if entry.unsupported is not None:
            assert entry.members == {}
            read_back.append(("special", entry.key))
        else:
            assert entry.members, "a sample of regular files has at least one member"
            read_back.extend(("file", entry.key, ext, data) for ext, data in entry.members.items())
    expected_back = []
    for kind, name, data in flat:
        name = name.rstrip("/")  # tarfile reads a directory entry's name without its "/"
        key, _, ext = name.rpartition("/")[2].partition(".")
        full_key = f"{name.rpartition('/')[0]}/{key}" if "/" in name else key
        expected_back.append(("file", full_key, ext, data) if kind == "file" else ("special", full_key))
    assert read_back == expected_back

    # 2. Groups are maximal: a sample ends only at a new key, a repeated suffix or a special member.
    for before, after in zip(entries, entries[1:]):
        if before.unsupported is None and after.unsupported is None and before.key == after.key:
            first_suffix = next(iter(after.members)).lower()
            assert first_suffix in {ext.lower() for ext in before.members}
    for entry in entries:
        suffixes = [ext.lower() for ext in entry.members]
        assert len(suffixes) == len(set(suffixes))

    # 3. The source yields one sample per entry, with distinct webdataset-safe keys, deterministically,
    # and labelling under any byte budget writes one row per sample, in order.
    url = f"memory://accounting/{hashlib.sha1(tar).hexdigest()}/00000.tar"
    with fsspec.open(url, "wb") as handle:
        handle.write(tar)
    shard = InputShard("00000", url)
    samples = list(WebDatasetSource(url).read(shard, ShardReadReport()))
    again = list(WebDatasetSource(url).read(shard, ShardReadReport()))
    assert len(samples) == len(entries)
    assert [s.key for s in samples] == [s.key for s in again]
    assert len({s.key for s in samples}) == len(samples)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", s.key) for s in samples)
    for sample, entry in zip(samples, entries):
        assert (sample.error == "unsupported_member") == (entry.unsupported is not None)

    rows: list[dict] = []
    decode = DecodeConfig()
    items = (item_from_sample(sample, decode) for sample in samples)
    written = list(_labelled_members(items, Labeler({"edge": FakeEdge()}), ["edge"], rows, budget))
    assert len(rows) == len(written) == len(samples)
    assert [row["key"] for row in rows] == [s.key for s in samples]
    fsspec.filesystem("memory").rm(url.rpartition("/")[0].removeprefix("memory://"), recursive=True)
