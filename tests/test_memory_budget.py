"""Decoded pixels in flight are bounded in bytes (``decode.max_bytes_in_flight``), not in samples.

A shard of 60-MP images labelled with the default budget stays under 2 GB RSS (the same shard held
~2.7 GB when chunks were counted in samples: edge:canny's batch of 32 put every image of the shard in
one chunk). The budget decides only where chunks end and how far the reader runs ahead: the bytes
written are the same under any budget.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
from builders import peak_rss_kib_of_run, photo_samples, write_manifest, write_wds
from PIL import Image

from expert_zoo.canny import CannyEdge
from label_pipeline.budget import PixelBudget
from label_pipeline.cli import main
from label_pipeline.config import ConfigError, DecodeConfig
from label_pipeline.core.decode import DecodedImage
from label_pipeline.labeler import Labeler, WorkItem, chunked
from label_pipeline.shard_job import _labelled_members, read_ahead

IMAGES = 10  # 10 × 180 MB of pixels: far over 2 GB when all are held, as chunking by count did


@pytest.mark.slow
def test_shard_of_60_megapixel_images_stays_under_2_gb(tmp_path):
    buffer = io.BytesIO()
    # 7800×7700 = 60 MP, under the 64-MP pixel guard; one flat colour keeps the PNG at ~200 kB.
    Image.new("RGB", (7800, 7700), (90, 140, 200)).save(buffer, format="PNG")
    shard = write_wds(tmp_path / "in" / "00000.tar", [{"png": buffer.getvalue()}] * IMAGES)
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": str(shard)}, tmp_path / "out", ["edge:canny"]
    )
    peak_gb = peak_rss_kib_of_run(manifest) * 1024 / 1e9
    assert peak_gb < 2.0, f"peak RSS {peak_gb:.2f} GB"
    record = json.loads((tmp_path / "out" / "records" / "00000.done.json").read_text())
    assert record["samples"] == record["ok"] == IMAGES


def test_the_budget_never_changes_the_bytes_written(tmp_path):
    samples = photo_samples(7, size=(48, 64)) + [{"jpg": b"not an image"}, {"txt": b"no image"}]
    shard = write_wds(tmp_path / "in" / "00000.tar", samples)
    digests = []
    for budget in (1, 20_000, 1 << 30):  # one image per chunk, a few, everything in one chunk
        out = tmp_path / f"out{budget}"
        manifest = write_manifest(
            tmp_path / f"m{budget}.yaml",
            {"format": "webdataset", "path": str(shard)},
            out,
            ["edge:canny"],
            decode={"max_bytes_in_flight": budget},
        )
        assert main(["run", str(manifest), "--no-progress"]) == 1  # two samples fail to decode
        digests.append(
            [
                hashlib.sha256((out / relative).read_bytes()).hexdigest()
                for relative in ("shards/00000.tar", "records/00000.parquet")
            ]
        )
    assert digests[0] == digests[1] == digests[2]


def decoded_item(key: str, height: int, width: int) -> WorkItem:
    array = np.zeros((height, width, 3), np.uint8)
    return WorkItem(key, {}, {"key": key, "experts": {}}, DecodedImage(array, (height, width), "RGB", False))


def watched_items(sizes: list[tuple[int, int]], budget: PixelBudget, seen: list[tuple[int, int]]):
    """Work items as a reader would decode them, noting (bytes held, bytes of the new image) each time."""
    for index, (height, width) in enumerate(sizes):
        seen.append((budget.held, height * width * 3))
        yield decoded_item(f"{index:03d}", height, width)


def label_all(sizes: list[tuple[int, int]], limit: int) -> tuple[list[list[str]], list[tuple[int, int]]]:
    """Chunks (keys) labelled through the read-ahead under a budget, and what was held at each decode."""
    budget = PixelBudget(limit)
    seen: list[tuple[int, int]] = []
    labeler = Labeler({"edge": CannyEdge()})
    chunks = []
    for chunk in read_ahead(chunked(watched_items(sizes, budget, seen), 4, budget), 2, budget.close):
        held = sum(item.pixel_bytes for item in chunk)
        labeler.label(chunk)
        budget.release(held)
        chunks.append([item.key for item in chunk])
    return chunks, seen


def test_pixels_held_stay_within_the_budget():
    image = 20 * 30 * 3
    chunks, seen = label_all([(20, 30)] * 12, limit=5 * image)
    assert all(held + new <= 5 * image for held, new in seen)
    assert max(held for held, _ in seen) >= 3 * image  # it does read ahead
    # A chunk holds at most half the budget (2 images of 2.5) and at most the batch size (4).
    assert all(1 <= len(chunk) <= 2 for chunk in chunks)
    assert [key for chunk in chunks for key in chunk] == [f"{i:03d}" for i in range(12)]


def test_an_image_larger_than_the_budget_goes_through_alone():
    small, big = (10, 10), (100, 100)
    chunks, seen = label_all([small, small, big, small, big, small], limit=big[0] * big[1] * 3 // 2)
    # Each big image is labelled in a chunk of its own; once one has been seen, the reader waits
    # until nothing is held before decoding (it cannot know the next image's size beforehand).
    assert ["002"] in chunks and ["004"] in chunks
    assert all(held == 0 for held, _ in seen[3:])
    assert [key for chunk in chunks for key in chunk] == ["000", "001", "002", "003", "004", "005"]


def test_a_reader_waiting_for_room_stops_when_the_consumer_does():
    third_read = threading.Event()

    def items():
        for index in range(50):
            if index == 2:
                third_read.set()
            yield decoded_item(f"{index:03d}", 64, 64)

    labeler = Labeler({"edge": CannyEdge()})
    members = _labelled_members(items(), labeler, ["edge"], [], max_bytes_in_flight=64 * 64 * 3 * 2)
    next(members)  # the first image is labelled; the reader has two more and waits for room
    assert third_read.wait(timeout=10)
    time.sleep(0.3)  # let it reach the wait (were it not there yet, closing would be trivially quick)
    closer = threading.Thread(target=members.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "closing the labelling left the reader waiting forever"
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())


def test_the_budget_is_a_manifest_setting_with_a_default():
    assert DecodeConfig().max_bytes_in_flight == 1 << 30
    with pytest.raises(ConfigError, match="max_bytes_in_flight"):
        DecodeConfig(max_bytes_in_flight=0)
    with pytest.raises(ValueError):
        PixelBudget(0)
