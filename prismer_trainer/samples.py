"""One label-shard sample → model-ready :class:`Example`: decode only what the model uses.

The image with :func:`label_pipeline.core.decode.decode_image` (the exact pixels the labels were aligned to,
EXIF included), the caption (or the VQA rows of the image), the PNG/JSON members of the model's experts
and the OCR words' stored CLIP-PCA features (``ocr_features.npy``). A missing, undecodable or misaligned
expert member masks that expert for that sample instead of failing. Then one joint geometry for RGB and
labels (:mod:`prismer_trainer.augment`). RGB and dense labels stay uint8; categorical labels stay uint8
id maps plus, per sample, what each id's embedding is (``tokens``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from label_pipeline.core.decode import DecodeError, decode_image
from label_pipeline.core.format import IMAGE_EXTENSIONS, decode_npy, decode_png, sanitize_key
from prismer_trainer.augment import BACKGROUND, LABEL_RESOLUTION, AugmentConfig, joint_transform
from prismer_trainer.embeddings import EMBED_DIM, TABLE_SIZES, WORD_FEATURE_DTYPE
from prismer_trainer.model_config import DENSE_EXPERTS
from prismer_trainer.text import (
    Tokenizer,
    caption_tokens,
    pre_question,
    question_answer_tokens,
    training_text,
)

logger = logging.getLogger(__name__)

WORD_FEATURES = "ocr_features.npy"  # per-word CLIP-PCA features, row i = word i of ocr_detection.json


@dataclass
class Example:
    """One decoded, transformed training/eval example (numpy, uint8 where possible)."""

    key: str
    rgb: np.ndarray  # 3×R×R uint8
    dense: dict[str, np.ndarray]  # name → C×L×L uint8
    ids: dict[str, np.ndarray]  # categorical name → L×L uint8
    tokens: dict[str, dict[int, tuple[str, Any]]]  # categorical name → {map value: embedding token}
    present: dict[str, bool]
    input_ids: list[int]
    targets: list[int]
    text: str
    references: list[str] = field(default_factory=list)
    weight: float = 1.0
    question: str | None = None
    question_id: Any = None
    answers: list[str] = field(default_factory=list)


@dataclass
class QaIndex:
    """VQA rows keyed by image stem: ``[{image, question, answer (str | list), weight?, question_id?}]``."""

    rows: dict[str, list[dict[str, Any]]]

    @classmethod
    def from_files(cls, paths: Sequence[str]) -> QaIndex:
        rows: dict[str, list[dict[str, Any]]] = {}
        for path in paths:
            with fsspec.open(path, "r", encoding="utf-8") as handle:
                for row in json.load(handle):
                    rows.setdefault(image_key(row["image"]), []).append(row)
        return cls(rows)


def image_key(image_path: str) -> str:
    """The shard key of an image path (the label pipeline keys samples by the sanitised file stem)."""
    return sanitize_key(image_path.rsplit("/", 1)[-1].rsplit(".", 1)[0])


@dataclass
class SampleDecoder:
    """Members of one shard sample → :class:`Example` (or several, one per question, when evaluating VQA)."""

    experts: tuple[str, ...]
    tokenizer: Tokenizer
    resolution: int
    augment: AugmentConfig | None  # None = evaluation (resize only)
    task: str = "caption"  # caption | vqa
    prefix: str = ""
    max_words: int = 30
    max_tokens: int = 30
    label_resolution: int = LABEL_RESOLUTION
    qa: QaIndex | None = None
    # A word without a stored feature: True (the tiny demo) gives it a hashed stand-in vector; False
    # masks the OCR label of that sample, as for any missing expert.
    hashed_words: bool = True

    def wants(self, key: str, members: Mapping[str, Any]) -> bool:
        """Cheap filter on member names: an image, and a caption (captioning) or questions (VQA)."""
        if not any(ext in members for ext in IMAGE_EXTENSIONS):
            return False
        if self.task == "vqa":
            return self.qa is not None and key in self.qa.rows
        return "txt" in members

    def members_to_read(self, name: str) -> bool:
        """Only these members' bytes are read from the tar."""
        if name in IMAGE_EXTENSIONS or name in ("txt", "json"):
            return True
        expert, _, ext = name.partition(".")
        if name == WORD_FEATURES:
            return "ocr_detection" in self.experts
        return expert in self.experts and ext in ("png", "json")

    def __call__(self, key: str, members: Mapping[str, bytes], rng: np.random.Generator) -> list[Example]:
        image = next(members[ext] for ext in IMAGE_EXTENSIONS if ext in members)
        try:
            rgb = decode_image(image).array
        except DecodeError as exc:
            logger.warning("sample %s: image not decodable (%s); skipped", key, exc)
            return []
        labels, side = self._labels(key, members, rgb.shape[:2])
        rgb_out, labels_out = joint_transform(
            rgb, labels, self.resolution, rng, self.augment, self.label_resolution
        )
        base = self._visual(key, rgb_out, labels_out, side)
        return self._with_text(key, members, base, rng)

    def _labels(
        self, key: str, members: Mapping[str, bytes], size: tuple[int, int]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        labels, side = {}, {}
        for expert in self.experts:
            data = members.get(f"{expert}.png")
            if data is None:
                continue  # not labelled (expert failed or never ran): masked
            try:
                label = decode_png(data)
                if expert in ("obj_detection", "ocr_detection"):
                    side[expert] = json.loads(members.get(f"{expert}.json", b"[]"))
            except (OSError, ValueError) as exc:
                logger.warning("sample %s: %s label unreadable (%s); masked", key, expert, exc)
                continue
            want_ndim = 3 if DENSE_EXPERTS.get(expert) == 3 else 2
            if label.shape[:2] != size or label.ndim != want_ndim:
                logger.warning("sample %s: %s label %s != image %s; masked", key, expert, label.shape, size)
                continue
            if expert == "ocr_detection":
                side["ocr_features"] = self._word_features(key, members, side[expert])
                if side["ocr_features"] is None and not self.hashed_words:
                    logger.warning("sample %s: OCR words without their %s; masked", key, WORD_FEATURES)
                    continue
            labels[expert] = label
        return labels, side

    @staticmethod
    def _word_features(key: str, members: Mapping[str, bytes], words: Any) -> np.ndarray | None:
        """The stored (N, 64) word features, row i for word i of the json; None if absent or unusable."""
        data = members.get(WORD_FEATURES)
        if data is None:
            return None
        try:
            features = decode_npy(data)
        except (OSError, ValueError) as exc:
            logger.warning("sample %s: %s unreadable (%s)", key, WORD_FEATURES, exc)
            return None
        count = len(words) if isinstance(words, list) else -1
        if features.shape != (count, EMBED_DIM) or features.dtype != WORD_FEATURE_DTYPE:
            logger.warning(
                "sample %s: %s is %s %s for %d words",
                key,
                WORD_FEATURES,
                features.dtype,
                features.shape,
                count,
            )
            return None
        return features

    def _visual(
        self, key: str, rgb: np.ndarray, labels: dict[str, np.ndarray], side: dict[str, Any]
    ) -> Example:
        size = self.label_resolution
        dense, ids, tokens, present = {}, {}, {}, {}
        for expert in self.experts:
            present[expert] = expert in labels
            if expert in DENSE_EXPERTS:
                label = labels.get(expert)
                if label is None:
                    label = np.zeros((size, size, DENSE_EXPERTS[expert]), np.uint8)
                dense[expert] = label.reshape(size, size, -1).transpose(2, 0, 1)
            else:
                ids[expert] = labels.get(expert, np.full((size, size), BACKGROUND, np.uint8))
                tokens[expert] = self._tokens(expert, side.get(expert, []), side.get("ocr_features"))
        return Example(key, rgb.transpose(2, 0, 1), dense, ids, tokens, present, [], [], "")

    @staticmethod
    def _tokens(expert: str, side: Any, features: np.ndarray | None = None) -> dict[int, tuple[str, Any]]:
        """Map value → what its embedding is: a class id (seg: the value itself), or an OCR word (its
        stored feature, row = position in the json; without one, its text for the hashed stand-in)."""
        if expert.startswith("seg"):
            return {v: (expert, v) for v in range(TABLE_SIZES[expert])}
        tokens: dict[int, tuple[str, Any]] = {}
        for row, item in enumerate(side if isinstance(side, list) else []):
            instance = int(item.get("instance", -1))
            if not 0 <= instance < BACKGROUND:
                continue
            if expert == "obj_detection":
                tokens[instance] = (expert, int(item["class_id"]))
            elif features is not None:
                tokens[instance] = ("vec", features[row].tobytes())
            else:
                tokens[instance] = ("word", str(item.get("text", "")).lower())
        return tokens

    def _with_text(
        self, key: str, members: Mapping[str, bytes], base: Example, rng: np.random.Generator
    ) -> list[Example]:
        if self.task == "vqa":
            return self._questions(key, base, rng)
        captions = captions_of(members)
        caption = captions[int(rng.integers(len(captions)))] if self.augment is not None else captions[0]
        text = training_text(caption, self.prefix, self.max_words)
        base.input_ids, base.targets = caption_tokens(self.tokenizer, text, self.prefix, self.max_tokens)
        base.text, base.references = text, captions
        return [base]

    def _questions(self, key: str, base: Example, rng: np.random.Generator) -> list[Example]:
        rows = self.qa.rows[key] if self.qa else []
        if self.augment is not None:  # training: one (question, answer) per visit, like one dataset row
            rows = [rows[int(rng.integers(len(rows)))]]
        out = []
        for row in rows:
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            question = pre_question(row["question"], self.max_words)
            answer = answers[int(rng.integers(len(answers)))] if self.augment is not None else None
            ids, targets = question_answer_tokens(self.tokenizer, question, answer)
            example = Example(**{**base.__dict__})
            example.input_ids, example.targets, example.text = ids, targets, question
            example.weight, example.question = float(row.get("weight", 1.0)), question
            example.question_id, example.answers = row.get("question_id"), answers
            out.append(example)
        return out


def captions_of(members: Mapping[str, bytes]) -> list[str]:
    """The sample's captions: all of them from the json (COCO/VG keep several), else the ``txt``."""
    captions: list[str] = []
    if "json" in members:
        try:
            source = json.loads(members["json"]).get("source", {})
            captions = [c for c in source.get("captions", []) if isinstance(c, str) and c.strip()]
        except (ValueError, AttributeError):
            captions = []
    if not captions:
        captions = [members["txt"].decode("utf-8", errors="replace").strip()]
    return captions
