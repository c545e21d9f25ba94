"""``ocr_detection:ppocr``: PP-OCR text detection (+ recognition for the json) through rapidocr.

rapidocr ships the PP-OCR ONNX weights inside its wheel, so this expert runs offline anywhere. The
label follows Prismer's OCR encoding: an L8 map of word ids (255 = background) and a json list of
``{instance, text, score, polygon}`` in image pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, Protocol, cast

import cv2
import numpy as np

from expert_zoo.base import BACKGROUND, ConfigError, Expert, ExpertOptions, ExpertSpec, Label

logger = logging.getLogger(__name__)
MAX_WORDS = 254  # ids 0..253; 255 is background


@dataclass(frozen=True)
class PPOCROptions(ExpertOptions):
    recognize: bool = True  # fill "text"; detection alone is ~30% faster
    limit_side_len: int = 736  # rapidocr's Det.limit_side_len
    limit_type: Literal["min", "max"] = "min"  # whether limit_side_len bounds the short or the long side
    box_thresh: float = 0.5
    text_score: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit_side_len < 1:
            raise ConfigError(f"limit_side_len: must be >= 1, got {self.limit_side_len}")
        for name in ("box_thresh", "text_score"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be between 0 and 1, got {getattr(self, name)}")


class _Detected(Protocol):
    """What rapidocr returns with detection on (its ``__call__`` is typed as any step's output)."""

    boxes: np.ndarray | None
    scores: Sequence[float] | None


class PPOCRDetection(Expert):
    LICENCE = "Apache-2.0 (in the rapidocr wheel)"
    spec = ExpertSpec(
        task="ocr_detection", backend="ppocr", version="1", mode="L", has_json=True, batch_size=8
    )
    Options = PPOCROptions
    opts: PPOCROptions
    FINGERPRINTED_DEFAULTS = ("recognize", "limit_side_len", "limit_type", "box_thresh", "text_score")

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(config, device)
        options = self.opts
        try:
            from rapidocr import RapidOCR
        except ImportError as exc:  # the error names the fix
            raise ImportError("ocr_detection:ppocr needs rapidocr: pip install rapidocr onnxruntime") from exc
        self.engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.text_score": float(options.text_score),
                "Det.limit_side_len": int(options.limit_side_len),
                "Det.limit_type": str(options.limit_type),
                "Det.box_thresh": float(options.box_thresh),
            }
        )
        # The weights ship in the wheel: its version identifies them.
        self.weights_digest = f"rapidocr=={metadata.version('rapidocr')}"

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        return [self._label(image) for image in images]

    def _label(self, image: np.ndarray) -> Label:
        recognize = self.opts.recognize
        raw = self.engine(np.ascontiguousarray(image[:, :, ::-1]), use_cls=False, use_rec=recognize)
        result = cast(_Detected, raw)
        boxes = [] if result.boxes is None else list(result.boxes)
        texts = list(getattr(result, "txts", None) or []) if recognize else []
        scores = list(result.scores or [])
        words = [
            {
                "instance": index,
                "text": texts[index] if index < len(texts) else "",
                "score": round(float(scores[index]), 4) if index < len(scores) else None,
                "polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in box],
            }
            for index, box in enumerate(boxes[:MAX_WORDS])
        ]
        if len(boxes) > MAX_WORDS:
            logger.warning("ocr_detection:ppocr kept %d of %d words", MAX_WORDS, len(boxes))
        return Label(word_map(image.shape[:2], words), words)


def word_map(size: tuple[int, int], words: list[dict[str, Any]]) -> np.ndarray:
    """Fill word polygons with their ids, last to first, so a lower id wins an overlap (as Prismer)."""
    label = np.full(size, BACKGROUND, dtype=np.uint8)
    for word in reversed(words):
        polygon = np.round(np.asarray(word["polygon"], dtype=np.float64)).astype(np.int32)
        cv2.fillPoly(label, [polygon], int(word["instance"]))
    return label
