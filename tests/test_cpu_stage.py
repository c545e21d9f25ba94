"""The pipelined CPU stage (``label_pipeline.cpu_stage``) and what a run keeps in memory.

Decoding ahead in a pool, labelling in its own thread, encoding in a pool and writing on the
caller's thread must write the bytes that labelling one sample after another writes; a shard that
fails anywhere in the pipeline fails alone; the byte budget bounds the decodes in flight; a run's
memory does not grow with its samples; outputs written with the previous PNG settings stay valid.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from builders import image_bytes, peak_rss_kib_of_run, photo_samples, write_manifest, write_wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import label_pipeline.core.format as label_format
from expert_zoo.base import Label
from expert_zoo.canny import CannyEdge
from label_pipeline.budget import PixelBudget
from label_pipeline.cli import main
from label_pipeline.config import DecodeConfig
from label_pipeline.core.decode import DecodedImage
from label_pipeline.core.format import decode_png
from label_pipeline.core.tario import _tarinfo, write_tar
from label_pipeline.cpu_stage import decode_ahead
from label_pipeline.labeler import Labeler, LocalExecutor, WorkItem, chunked, item_from_sample
from label_pipeline.output import FORMAT_VERSION, OutputStore
from label_pipeline.shard_job import ShardPlan, ShardResult, run_shards
from label_pipeline.sources.base import InputShard, Sample, ShardReadReport
from label_pipeline.sources.webdataset import WebDatasetSource


def shards_of_photos(folder: Path, sizes: Sequence[tuple[int, int]], per_shard: int = 7) -> str:
    """Input shards of photos, one image size per shard, with an undecodable and an imageless sample."""
    for index, size in enumerate(sizes):
        samples = photo_samples(per_shard, size=size, start=per_shard * index)
        samples[2]["jpg"] = b"not an image"
        samples[4] = {"txt": b"no image at all"}
        write_wds(folder / f"{index:05d}.tar", samples)
    return f"{folder}/{{00000..{len(sizes) - 1:05d}}}.tar"


# -- the bytes ---------------------------------------------------------------------------------------
def test_the_pipeline_writes_what_labelling_sample_by_sample_writes(tmp_path):
    pattern = shards_of_photos(tmp_path / "in", [(48, 64), (40, 56), (64, 48)], per_shard=40)
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": pattern}, out, ["edge:canny"]
    )
    assert main(["run", str(manifest), "--no-progress"]) == 1  # the bad samples are recorded failures

    source, decode = WebDatasetSource(pattern), DecodeConfig()
    for shard in source.shards():
        items = [item_from_sample(sample, decode) for sample in source.read(shard, ShardReadReport())]
        labeler = Labeler({"edge": CannyEdge()})
        for item in items:  # one sample at a time, encoded at once, in this thread
            labeler.label([item])
        reference = io.BytesIO()
        write_tar(reference, [item.to_members() for item in items])
        assert (out / "shards" / f"{shard.shard_id}.tar").read_bytes() == reference.getvalue()
        record = json.loads((out / "records" / f"{shard.shard_id}.done.json").read_text())
        assert record["samples"] == 40 and record["ok"] == 38
        assert record["format_version"] == FORMAT_VERSION


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.one_of(
                    st.text(min_size=0, max_size=120),
                    st.text(alphabet="aé/._-", min_size=95, max_size=105),
                ),
                st.binary(max_size=1500),
            ),
            max_size=4,
        ),
        max_size=5,
    )
)
def test_the_tar_writer_writes_tarfile_s_bytes(samples):
    """``write_tar`` builds headers itself; they must be exactly tarfile's (GNU format)."""
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for members in samples:
            for name, data in sorted(members):
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    written = io.BytesIO()
    write_tar(written, samples)
    assert written.getvalue() == reference.getvalue()


# -- failures stay in their shard ------------------------------------------------------------------
class FailingSource(WebDatasetSource):
    """Shard ``00001`` breaks off after ``after`` samples."""

    def __init__(self, path: str, after: int) -> None:
        super().__init__(path)
        self.after = after

    def read(self, shard: InputShard, report: ShardReadReport) -> Iterator[Sample]:
        for index, sample in enumerate(super().read(shard, report)):
            if shard.shard_id == "00001" and index == self.after:
                raise OSError("the input disappeared")
            yield sample


class NarrowFailsEncoding(CannyEdge):
    """Labels of 50-pixel-wide images cannot be encoded (raised in the encoder pool)."""

    def encode(self, label: Label) -> dict[str, bytes]:
        if label.map is not None and label.map.shape[1] == 50:
            raise ValueError("cannot encode this label")
        return super().encode(label)


class NarrowFailsChunk(LocalExecutor):
    """A chunk of 50-pixel-wide images fails as a whole (outside the per-sample isolation), as a Ray
    executor's chunk can when the object store refuses it."""

    def chunk(self, images: Sequence[np.ndarray]) -> contextlib.AbstractContextManager[None]:
        if any(image.shape[1] == 50 for image in images):
            raise RuntimeError("the chunk could not be shared")
        return super().chunk(images)


@pytest.mark.timeout(120)  # a byte budget not given back would make the next shard wait forever
@pytest.mark.parametrize("budget", [1, 40_000])  # one image at a time; a few
@pytest.mark.parametrize("where", ["opening", "reading", "labelling", "encoding"])
def test_a_shard_that_fails_in_the_pipeline_fails_alone(tmp_path, where, budget):
    sizes = [(48, 64), (48, 50), (48, 64)] if where in ("labelling", "encoding") else [(48, 64)] * 3
    pattern = shards_of_photos(tmp_path / "in", sizes, per_shard=20)
    source = {"opening": FailingSource(pattern, 0), "reading": FailingSource(pattern, 13)}.get(where)
    source = source or WebDatasetSource(pattern)
    experts = {"edge": NarrowFailsEncoding() if where == "encoding" else CannyEdge()}
    labeler = Labeler(NarrowFailsChunk(experts) if where == "labelling" else experts)
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    plans = [ShardPlan(shard, "fresh", ["edge"]) for shard in source.shards()]

    outcomes = list(run_shards(plans, source, store, labeler, DecodeConfig(max_bytes_in_flight=budget)))

    assert [plan.shard.shard_id for plan, _ in outcomes] == ["00000", "00001", "00002"]
    assert isinstance(outcomes[0][1], ShardResult) and isinstance(outcomes[2][1], ShardResult)
    assert isinstance(outcomes[1][1], {"labelling": RuntimeError, "encoding": ValueError}.get(where, OSError))
    assert sorted(path.name for path in (tmp_path / "out" / "shards").iterdir()) == ["00000.tar", "00002.tar"]
    assert not (tmp_path / "out" / "records" / "00001.done.json").exists()
    assert outcomes[2][1].record["samples"] == 20
    assert not [t for t in threading.enumerate() if t.name.startswith(("decode", "encode", "labelling"))]


# -- the byte budget bounds the decodes in flight ---------------------------------------------------
class CountingBudget(PixelBudget):
    taken = 0

    def take(self, nbytes: int) -> None:
        self.taken += 1
        super().take(nbytes)


def decode_through_budget(limit: int, size: tuple[int, int], count: int = 40) -> tuple[int, int]:
    """Decode ``count`` images of ``size`` ahead of a labeller under a budget of ``limit`` bytes;
    returns the most bytes ever held or pending at a decode's start, and the most pending decodes."""
    nbytes = size[0] * size[1] * 3
    budget = CountingBudget(limit)
    started = 0
    seen: list[tuple[int, int]] = []  # (bytes held plus pending, decodes pending) at each decode's start
    lock = threading.Lock()

    def deferred(key: str):
        def decode() -> WorkItem:
            nonlocal started
            with lock:
                started += 1
                pending = started - budget.taken  # decoding, or decoded and not yet taken
                seen.append((budget.held + pending * nbytes, pending))
            time.sleep(0.002)  # long enough for the next decodes to start beside this one
            image = DecodedImage(np.zeros((*size, 3), np.uint8), size, "RGB", False)
            return WorkItem(key, {}, {"key": key, "experts": {}}, image)

        return decode

    labeler = Labeler({"edge": CannyEdge()})
    keys = []
    with ThreadPoolExecutor(3) as pool:
        items = decode_ahead((deferred(f"{i:03d}") for i in range(count)), pool, budget, depth=16)
        for chunk in chunked(items, 4, budget):
            held = sum(item.pixel_bytes for item in chunk)
            labeler.label(chunk)
            budget.release(held)
            keys += [item.key for item in chunk]
    assert keys == [f"{i:03d}" for i in range(count)]
    return max(b for b, _ in seen), max(p for _, p in seen)


def test_small_images_decode_side_by_side_within_the_budget():
    image = 30 * 40 * 3
    most_bytes, most_pending = decode_through_budget(64 * image, (30, 40))
    assert most_bytes <= 64 * image
    assert most_pending >= 2  # decoded in parallel
    assert most_pending * image <= 64 * image // 8  # together at most an eighth of the budget


def test_large_images_decode_one_at_a_time_within_the_budget():
    image = 30 * 40 * 3
    most_bytes, most_pending = decode_through_budget(5 * image, (30, 40))
    assert most_bytes <= 5 * image
    assert most_pending == 1  # a decoder briefly holds twice its image: one at a time


def test_a_reader_failing_mid_chunk_gives_its_bytes_back():
    budget = PixelBudget(100 * 30 * 40 * 3)

    def items() -> Iterator[WorkItem]:
        for index in range(3):
            image = DecodedImage(np.zeros((30, 40, 3), np.uint8), (30, 40), "RGB", False)
            yield WorkItem(f"{index}", {}, {"key": f"{index}", "experts": {}}, image)
        raise OSError("the input disappeared")

    with pytest.raises(OSError):
        list(chunked(items(), 8, budget))  # the three images never made a chunk
    assert budget.held == 0


# -- outputs of the previous PNG settings ------------------------------------------------------------
def run(manifest: Path) -> int:
    return main(["run", str(manifest), "--no-progress"])


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}  # type: ignore[union-attr]


def test_outputs_written_with_the_previous_png_settings_stay_done_and_can_be_extended(tmp_path, monkeypatch):
    pattern = shards_of_photos(tmp_path / "in", [(48, 64), (40, 56)], per_shard=6)
    out = tmp_path / "out"
    source = {"format": "webdataset", "path": pattern}
    with monkeypatch.context() as old:  # format version 2: zlib's default strategy, no version per shard
        old.setattr(label_format, "PNG_STRATEGY", zlib.Z_DEFAULT_STRATEGY)
        assert run(write_manifest(tmp_path / "a.yaml", source, out, ["edge:canny"])) == 1
    for done in (out / "records").glob("*.done.json"):
        record = json.loads(done.read_text())
        del record["format_version"]
        done.write_text(json.dumps(record))
    old_tars = {path.name: tar_members(path.read_bytes()) for path in (out / "shards").glob("*.tar")}
    old_edge = next(data for name, data in old_tars["00000.tar"].items() if name.endswith(".edge.png"))
    assert label_format.encode_png(decode_png(old_edge), "L") != old_edge  # the settings did change

    # A rerun leaves them as they are: the encoding is not part of any expert's fingerprint.
    assert run(write_manifest(tmp_path / "b.yaml", source, out, ["edge:canny"])) == 1
    assert {path.name: tar_members(path.read_bytes()) for path in (out / "shards").glob("*.tar")} == old_tars

    # Adding an expert extends them: old members are carried over byte for byte, new ones use RLE.
    depth = {"name": "depth:brightness", "class": "experts_for_tests:BrightnessDepth"}
    assert run(write_manifest(tmp_path / "c.yaml", source, out, ["edge:canny", depth])) == 1
    assert main(["verify", str(out)]) == 0  # sample failures are recorded, not damage
    for name, old_members in old_tars.items():
        new_members = tar_members((out / "shards" / name).read_bytes())
        for member, data in old_members.items():
            if not member.endswith(".json"):  # the json gains the new expert's status
                assert new_members[member] == data
        depth_maps = [data for member, data in new_members.items() if member.endswith(".depth.png")]
        assert depth_maps and all(label_format.encode_png(decode_png(d), "L") == d for d in depth_maps)
        record = json.loads((out / "records" / name.replace(".tar", ".done.json")).read_text())
        assert record["format_version"] == FORMAT_VERSION and set(record["experts"]) == {"depth", "edge"}


def test_label_pngs_use_the_run_length_strategy():
    array = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
    rle = io.BytesIO()
    Image.fromarray(array, "L").save(rle, format="PNG", compress_level=3, compress_type=zlib.Z_RLE)
    assert label_format.encode_png(array, "L") == rle.getvalue()


# -- flat memory ---------------------------------------------------------------------------------------
SHARD = 2000


def tiny_run(folder: Path, samples: int) -> int:
    """Peak RSS (KiB) of labelling ``samples`` 8×8 images with canny, in shards of ``SHARD``."""
    png = image_bytes(np.full((8, 8, 3), 120, np.uint8), "PNG")  # PNG: the cheapest to open
    shards = samples // SHARD
    for shard in range(shards):
        keys = [f"{shard:05d}{index:05d}" for index in range(SHARD)]
        write_wds(folder / "in" / f"{shard:05d}.tar", [{"png": png}] * SHARD, keys)
    source = {"format": "webdataset", "path": f"{folder}/in/{{00000..{shards - 1:05d}}}.tar"}
    edge = {"name": "edge:canny", "options": {"batch_size": 256}}
    manifest = write_manifest(folder / "m.yaml", source, folder / "out", [edge])
    return peak_rss_kib_of_run(manifest)


@pytest.mark.slow
def test_a_run_s_memory_stays_flat_from_10k_to_100k_samples(tmp_path):
    """A run used to keep every sample's record row (~466 B each) until it ended."""
    small = tiny_run(tmp_path / "10k", 10_000)
    large = tiny_run(tmp_path / "100k", 100_000)
    assert abs(large - small) <= 0.10 * small, f"peak RSS {small} KiB at 10k samples, {large} KiB at 100k"
