"""Real experts with test-only behaviour, registered by the tests that use them."""

from __future__ import annotations

import os
import time

import numpy as np

from expert_zoo.base import ExpertSpec, Label
from expert_zoo.canny import CannyEdge
from expert_zoo.registry import register


class FlakyEdge(CannyEdge):
    """Canny that raises on any image exactly 13 pixels wide (the test's poisoned sample)."""

    spec = ExpertSpec(task="edge", backend="flaky", version="1", mode="L", batch_size=4)

    def predict(self, images, deps):
        if any(image.shape[1] == 13 for image in images):
            raise RuntimeError("poisoned sample")
        return super().predict(images, deps)


class SlowEdge(CannyEdge):
    """Canny that sleeps per batch, so a test can kill a run in the middle of a shard."""

    spec = ExpertSpec(task="edge", backend="slow", version="1", mode="L", batch_size=2)

    def predict(self, images, deps):
        time.sleep(float(os.environ.get("SLOW_EDGE_SECONDS", "0.3")))
        return super().predict(images, deps)


class OverheadEdge(CannyEdge):
    """Canny with a large fixed cost per batch (0.05 s + 0.002 s per image): bigger batches are faster."""

    spec = ExpertSpec(task="edge", backend="overhead", version="1", mode="L", batch_size=2)

    def predict(self, images, deps):
        time.sleep(0.05 + 0.002 * len(images))
        return super().predict(images, deps)


class BrightnessDepth(CannyEdge):
    """A stand-in 'depth' (brightness as nearness) to exercise the depth → detection dependency."""

    spec = ExpertSpec(task="depth", backend="brightness", version="1", mode="L", batch_size=4)

    def predict(self, images, deps):
        return [Label(image.mean(axis=2).astype(np.uint8)) for image in images]


class DepthBoxes(CannyEdge):
    """Needs depth: one box over the image, scored by the mean depth label it was handed."""

    spec = ExpertSpec(
        task="obj_detection",
        backend="depthboxes",
        version="1",
        mode="L",
        has_json=True,
        batch_size=4,
        requires=("depth",),
    )

    def predict(self, images, deps):
        labels = []
        for image, depth in zip(images, deps["depth"]):
            height, width = image.shape[:2]
            instance = np.full((height, width), 255, np.uint8)
            instance[: height // 2, : width // 2] = 0
            det = [
                {
                    "instance": 0,
                    "class_id": 1,
                    "score": round(float(depth.map.mean()) / 255, 4),
                    "box": [0, 0, width // 2, height // 2],
                }
            ]
            labels.append(Label(instance, det))
        return labels


def register_test_experts() -> None:
    for name, cls in [
        ("edge:flaky", "FlakyEdge"),
        ("edge:slow", "SlowEdge"),
        ("edge:overhead", "OverheadEdge"),
        ("depth:brightness", "BrightnessDepth"),
        ("obj_detection:depthboxes", "DepthBoxes"),
    ]:
        register(name, f"experts_for_tests:{cls}")
