"""``edge:canny``: OpenCV's Canny detector, an offline stand-in for DexiNed with Prismer's encoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from expert_zoo.base import Expert, ExpertSpec, Label


class CannyEdge(Expert):
    """Edges at the image's own resolution; stored inverted like Prismer (255 = no edge, 0 = edge)."""

    spec = ExpertSpec(task="edge", backend="canny", version="1", mode="L", batch_size=32)

    def __init__(self, config: Mapping | None = None, device: str = "cpu") -> None:
        config = {"low": 100, "high": 200, "blur_sigma": 1.0, **dict(config or {})}
        super().__init__(config, device)
        if not 0 <= config["low"] <= config["high"]:
            raise ValueError(f"edge:canny needs 0 <= low <= high, got {config['low']}, {config['high']}")

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        return [Label(self._edges(image)) for image in images]

    def _edges(self, image: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        sigma = float(self.config["blur_sigma"])
        if sigma > 0:
            grey = cv2.GaussianBlur(grey, (0, 0), sigma)
        edges = cv2.Canny(grey, float(self.config["low"]), float(self.config["high"]))
        return cv2.bitwise_not(edges)
