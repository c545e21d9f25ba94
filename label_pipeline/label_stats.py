"""Per-expert statistics of decoded labels, for ``label-pipeline report``.

One ``TaskStats`` per task accumulates what a person checks to trust an expert over a dataset: the
value histogram of its maps, the share of empty and of constant maps, per-image counts (edge density,
classes, instances, words) and class frequencies with names. ``flags`` turns them into warnings about
suspicious distributions: a depth expert that returns constant maps, a detector that finds nothing.
Members follow docs/FORMAT.md ("Members of a sample").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from label_pipeline.core.format import ARRAY_ROWS_FOLLOW, decode_npy
from label_pipeline.core.labelmaps import class_names

EMPTY_FLAG_SHARE = 0.95  # an expert empty on more than this share of samples is flagged
CONSTANT_FLAG_SHARE = 0.5  # dense maps (depth, normal, edge) constant on more than this share
FAILURE_FLAG_SHARE = 0.05  # an expert failing on more than this share of its samples (records)
NORMAL_BINS = 24  # bins per axis of the normal-direction histogram
EDGE_THRESHOLD = 128  # an edge pixel: value below this (0 = strongest edge, 255 = none)
BACKGROUND = 255  # "nothing" in every L8 map: no edge, no class, no instance, no word

# How each task's labels are read and summarised; tasks not named here are plugin maps ("map").
KINDS = {
    "depth": "depth",
    "normal": "normal",
    "edge": "edge",
    "obj_detection": "instances",
    "ocr_detection": "words",
}
PER_IMAGE = {
    "edge": "edge density (share of pixels < 128)",
    "classes": "classes per image",
    "instances": "instances per image",
    "words": "words per image",
    "array": "rows per image",
    "depth": "mean value per image",
}


def task_kind(task: str) -> str:
    """depth, normal, edge, classes (segmentation), instances, words, array (``.npy``) or map."""
    if task in ARRAY_ROWS_FOLLOW:
        return "array"
    if task.startswith("seg"):
        return "classes"
    return KINDS.get(task, "map")


@dataclass
class TaskStats:
    """What the sampled labels of one task look like."""

    task: str
    kind: str
    samples: int = 0  # labels read (the expert said ok and its member decoded)
    empty: int = 0  # all background (edge/classes/map) or an empty json list (instances/words)
    constant: int = 0  # dense maps with one value everywhere that are not empty
    unreadable: list[str] = field(default_factory=list)  # "KEY: why" for ok labels that did not decode
    values: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    per_image: list[float] = field(default_factory=list)
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    class_images: Counter = field(default_factory=Counter)  # class id → images containing it
    class_instances: Counter = field(default_factory=Counter)  # detection: class id → instances
    normal_xy: np.ndarray = field(default_factory=lambda: np.zeros((NORMAL_BINS, NORMAL_BINS), np.int64))
    normal_z: np.ndarray = field(default_factory=lambda: np.zeros(NORMAL_BINS, dtype=np.int64))
    words: Counter = field(default_factory=Counter)

    @property
    def empty_share(self) -> float:
        return self.empty / self.samples if self.samples else 0.0

    @property
    def constant_share(self) -> float:
        return self.constant / self.samples if self.samples else 0.0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Count one sample's label; a label that does not decode is noted, not raised."""
        try:
            if self.kind == "array":
                self._add_rows(decode_npy(members[f"{self.task}.npy"]))
            else:
                side = members.get(f"{self.task}.json")
                self._add_map(self._decode(members[f"{self.task}.png"]), json.loads(side) if side else None)
        except Exception as exc:  # noqa: BLE001 - a damaged member is a finding of the report, not a crash
            self.unreadable.append(f"{key}: {type(exc).__name__}: {exc}")
            return
        self.samples += 1

    def _decode(self, data: bytes) -> np.ndarray:
        """The label map as uint8 (RGB for normals): OpenCV decodes PNG about twice as fast as PIL,
        which matters when a report reads thousands of labels; ``verify`` checks modes strictly."""
        label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if label is None or label.dtype != np.uint8:
            raise ValueError("not an 8-bit PNG")
        channels = 3 if self.kind == "normal" else 1
        if (label.shape[2] if label.ndim == 3 else 1) != channels:
            raise ValueError(f"a {self.task} map has {channels} channel(s), this one has shape {label.shape}")
        return cv2.cvtColor(label, cv2.COLOR_BGR2RGB) if channels == 3 else label

    def _add_rows(self, array: np.ndarray) -> None:
        rows = int(array.shape[0]) if array.ndim else 0
        self.per_image.append(rows)
        self.empty += int(rows == 0)

    def _add_map(self, label: np.ndarray, side: Any) -> None:
        if self.kind == "normal":
            self._add_normals(label)
            return
        # Smooth maps are summarised from every other row and column (a quarter of the pixels:
        # decoding is then most of the cost); edge and segmentation maps keep every pixel, so that
        # a 1-px line or a small class counts as it is. Empty and constant are exact: checked on
        # the whole map when the view has one value.
        view = label if self.kind in ("classes", "edge") else label[::2, ::2]
        histogram = np.bincount(view.ravel(), minlength=256)
        self.values += histogram
        uniform = np.count_nonzero(histogram) == 1 and bool((label == label.flat[0]).all())
        empty = self._is_empty(uniform and int(label.flat[0]) == BACKGROUND, side)
        self.empty += int(empty)
        self.constant += int(uniform and not empty and self.kind in ("depth", "edge", "map"))
        if self.kind in ("classes", "instances", "words"):
            self._add_categories(histogram, side)
        elif self.kind == "edge":
            self.per_image.append(float(histogram[:EDGE_THRESHOLD].sum()) / max(view.size, 1))
        elif self.kind == "depth":
            self.per_image.append(float(histogram @ np.arange(256)) / max(view.size, 1))

    def _is_empty(self, all_background: bool, side: Any) -> bool:
        if self.kind in ("instances", "words") and isinstance(side, list):
            return not side
        if self.kind == "depth":
            return False  # every value means something: a flat map is "constant", not "empty"
        return all_background

    def _add_normals(self, label: np.ndarray) -> None:
        # RGB8 of (n + 1) / 2 is linear in n, so bins of the bytes are bins of the direction; a
        # quarter of the pixels is plenty for a direction histogram.
        pixels = label[::2, ::2].reshape(-1, 3)
        bins = (pixels.astype(np.uint16) * NORMAL_BINS) >> 8
        xy = np.bincount(bins[:, 1] * NORMAL_BINS + bins[:, 0], minlength=NORMAL_BINS * NORMAL_BINS)
        self.normal_xy += xy.reshape(NORMAL_BINS, NORMAL_BINS)
        self.normal_z += np.bincount(bins[:, 2], minlength=NORMAL_BINS)
        if np.count_nonzero(xy) == 1 and bool((pixels == pixels[0]).all()):
            self.constant += int((label == label[0, 0]).all())

    def _add_categories(self, histogram: np.ndarray, side: Any) -> None:
        present = np.flatnonzero(histogram[:BACKGROUND])
        if self.kind == "classes":
            self.class_pixels += histogram
            self.class_images.update(present.tolist())
            self.per_image.append(len(present))
        elif self.kind == "instances" and isinstance(side, list):
            classes = [d.get("class_id") for d in side if isinstance(d, dict)]
            self.class_instances.update(c for c in classes if isinstance(c, int))
            self.class_images.update({c for c in classes if isinstance(c, int)})
            self.per_image.append(len(side))
        elif self.kind == "words" and isinstance(side, list):
            self.words.update(str(w.get("text", "")).lower() for w in side if isinstance(w, dict))
            self.per_image.append(len(side))
        else:  # no json beside the map: count the instance ids drawn in it
            self.per_image.append(len(present))

    def merge(self, other: TaskStats) -> None:
        """Add ``other``'s counts (the same task, e.g. one sample's, counted in another thread)."""
        self.samples += other.samples
        self.empty += other.empty
        self.constant += other.constant
        self.unreadable += other.unreadable
        self.per_image += other.per_image
        for name in ("values", "class_pixels", "normal_xy", "normal_z"):
            getattr(self, name).__iadd__(getattr(other, name))
        for name in ("class_images", "class_instances", "words"):
            getattr(self, name).update(getattr(other, name))

    def top_classes(self, limit: int = 15) -> list[tuple[int, str, float]]:
        """(class id, name, share) by pixel share (segmentation) or instance share (detection)."""
        names = class_names(self.task) or []
        if self.kind == "classes":
            counts = {i: int(c) for i, c in enumerate(self.class_pixels[:BACKGROUND]) if c}
        else:
            counts = dict(self.class_instances)
        total = sum(counts.values()) or 1
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return [(i, names[i] if i < len(names) else f"class {i}", c / total) for i, c in ranked]


def collect(stats: dict[str, TaskStats], key: str, members: dict[str, bytes]) -> None:
    """Add one sample's labels: every expert its json marks ok (failed experts have no members)."""
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        return
    experts = meta.get("experts") if isinstance(meta, dict) else None
    for task, info in (experts if isinstance(experts, dict) else {}).items():
        if isinstance(info, dict) and info.get("status") == "ok":
            if task not in stats:
                stats[task] = TaskStats(task, task_kind(task))
            stats[task].add(key, members)


def sample_stats(key: str, members: dict[str, bytes]) -> dict[str, TaskStats]:
    """One sample's statistics, to ``merge`` into the totals (safe to compute in a worker thread)."""
    stats: dict[str, TaskStats] = {}
    collect(stats, key, members)
    return stats


def merge_into(totals: dict[str, TaskStats], part: dict[str, TaskStats]) -> None:
    for task, stats in part.items():
        totals.setdefault(task, TaskStats(task, stats.kind)).merge(stats)


def flags(stats: TaskStats, failed: int = 0, labelled: int = 0) -> list[str]:
    """Warnings about a task's distribution; ``failed``/``labelled`` come from the records."""
    found = []
    if labelled and failed / labelled > FAILURE_FLAG_SHARE:
        found.append(f"fails on {failed / labelled:.1%} of its samples ({failed} of {labelled})")
    if stats.samples and stats.empty_share > EMPTY_FLAG_SHARE and stats.kind != "array":
        found.append(
            f"empty on {stats.empty_share:.1%} of the sampled labels (over {EMPTY_FLAG_SHARE:.0%}): "
            "is the expert finding anything?"
        )
    if stats.samples and stats.constant_share > CONSTANT_FLAG_SHARE:
        found.append(
            f"constant maps (one value everywhere) on {stats.constant_share:.1%} of the sampled labels"
        )
    if stats.unreadable:
        found.append(f"{len(stats.unreadable)} labels marked ok do not decode (first: {stats.unreadable[0]})")
    return found
