"""The one labelling loop: each expert's own batch size, dependency order, out-of-memory back-off.

Both runners go through ``Labeler``; here it runs with the in-process executor (the Ray runner's
executor is exercised by tests/test_ray_runner.py on the same expectations).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from expert_zoo.base import ExpertSpec, Label
from expert_zoo.canny import CannyEdge
from label_pipeline.config import manifest_from_dict
from label_pipeline.core.decode import DecodedImage
from label_pipeline.labeler import Labeler, LocalExecutor, WorkItem


class OutOfMemoryError(RuntimeError):
    """Named like torch's CUDA OOM error, which is how the labeler recognises one."""


class Recorder:
    """A fake expert noting the size of every batch it is called with; out of memory above ``limit``."""

    def __init__(self, task: str, batch_size: int, limit: int | None = None, requires: tuple = ()) -> None:
        self.spec = ExpertSpec(task, "recorder", "1", "L", batch_size=batch_size, requires=requires)
        self.limit, self.calls = limit, []

    def __call__(self, images: Sequence[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        self.calls.append((len(images), sorted(deps)))
        if self.limit is not None and len(images) > self.limit:
            raise OutOfMemoryError(f"CUDA out of memory on {len(images)} images (test)")
        return [Label(np.zeros(image.shape[:2], np.uint8)) for image in images]

    def encode(self, label: Label) -> dict[str, bytes]:
        return {"png": b"x"}

    def fingerprint(self) -> str:
        return f"{self.spec.task}-1"


def items(count: int) -> list[WorkItem]:
    return [
        WorkItem(
            f"{i:03d}",
            {},
            {"key": f"{i:03d}", "experts": {}},
            DecodedImage(np.zeros((4, 5, 3), np.uint8), (4, 5), "RGB", False),
        )
        for i in range(count)
    ]


def test_each_expert_runs_in_its_own_batch_size_not_the_smallest():
    small, large = Recorder("edge", 2), Recorder("depth", 5)
    labeler = Labeler({"edge": small, "depth": large})
    batch = items(10)
    labeler.label(batch)
    assert [size for size, _ in small.calls] == [2] * 5 and [size for size, _ in large.calls] == [5, 5]
    assert labeler.chunk_size == 5
    assert all(item.meta["status"] == "ok" for item in batch)


def test_an_expert_option_batch_size_is_its_forward_batch():
    assert LocalExecutor({"edge": CannyEdge({"batch_size": 3})}).batch_sizes == {"edge": 3}
    assert LocalExecutor({"edge": CannyEdge()}).batch_sizes == {"edge": CannyEdge.spec.batch_size}


def test_out_of_memory_halves_the_batch_and_the_later_batches(caplog):
    greedy = Recorder("depth", 4, limit=2)
    labeler = Labeler({"depth": greedy})
    first, second = items(4), items(3)
    with caplog.at_level(logging.WARNING, logger="label_pipeline"):
        labeler.label(first)
        labeler.label(second)
    # 4 runs out of memory, then its halves run; the next chunk starts at the halved size
    assert [size for size, _ in greedy.calls] == [4, 2, 2, 2, 1]
    assert labeler.batch_sizes == {"depth": 2}
    assert all(item.meta["status"] == "ok" for item in first + second)
    assert "out of memory on a batch of 4; batches of 2 from now on" in caplog.text


def test_out_of_memory_on_a_single_image_is_that_sample_s_error():
    labeler = Labeler({"depth": Recorder("depth", 2, limit=0)})
    batch = items(2)
    labeler.label(batch)
    assert labeler.batch_sizes == {"depth": 1}
    for item in batch:
        assert item.meta["status"] == "partial"
        assert item.meta["experts"]["depth"]["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_dependencies_run_first_and_are_handed_over():
    depth, detection = Recorder("depth", 3), Recorder("obj_detection", 3, requires=("depth",))
    labeler = Labeler({"obj_detection": detection, "depth": depth})
    assert list(labeler.specs) == ["depth", "obj_detection"]
    labeler.label(items(3))
    assert depth.calls == [(3, [])] and detection.calls == [(3, ["depth"])]


def test_a_manifest_wide_batch_size_is_deprecated_and_becomes_each_expert_s_option(caplog):
    data = {
        "name": "t",
        "source": {"format": "folder", "path": "/nowhere"},
        "output": "/tmp/out",
        "experts": ["edge:canny", {"name": "depth", "options": {"batch_size": 2}}],
        "batch_size": 6,
    }
    with caplog.at_level(logging.WARNING, logger="label_pipeline"):
        manifest = manifest_from_dict(data, env={})
    assert [request.options for request in manifest.experts] == [{}, {"batch_size": 2}]  # as written
    assert [request.options for request in manifest.runnable_experts()] == [
        {"batch_size": 6},
        {"batch_size": 2},
    ]
    assert "deprecated" in caplog.text
