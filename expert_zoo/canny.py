"""``edge:canny``: OpenCV's Canny detector, an offline stand-in for DexiNed with Prismer's encoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from expert_zoo.base import ConfigError, Expert, ExpertOptions, ExpertSpec, Label


@dataclass(frozen=True)
class CannyOptions(ExpertOptions):
    low: float = 100  # hysteresis thresholds on the gradient magnitude (OpenCV's Canny)
    high: float = 200
    blur_sigma: float = 1.0  # Gaussian blur before Canny; 0 = none

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.low <= self.high:
            raise ConfigError(f"low: edge:canny needs 0 <= low <= high, got low={self.low}, high={self.high}")
        if self.blur_sigma < 0:
            raise ConfigError(f"blur_sigma: must be >= 0, got {self.blur_sigma}")


class CannyEdge(Expert):
    """Edges at the image's own resolution; stored inverted like Prismer (255 = no edge, 0 = edge)."""

    LICENCE = "Apache-2.0 (OpenCV), no weights"
    spec = ExpertSpec(task="edge", backend="canny", version="1", mode="L", batch_size=32)
    Options = CannyOptions
    opts: CannyOptions
    FINGERPRINTED_DEFAULTS = ("low", "high", "blur_sigma")

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        return [Label(self._edges(image)) for image in images]

    def _edges(self, image: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        sigma = float(self.opts.blur_sigma)
        if sigma > 0:
            grey = cv2.GaussianBlur(grey, (0, 0), sigma)
        edges = cv2.Canny(grey, float(self.opts.low), float(self.opts.high))
        return cv2.bitwise_not(edges)
