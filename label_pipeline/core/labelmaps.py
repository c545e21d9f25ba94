"""The class names behind categorical labels: one reader for the zoo, ``inspect`` and the trainer.

A label value ``i`` of a task is row ``i`` of its names file in ``label_pipeline/core/labelmaps``.
"""

from __future__ import annotations

import json
from importlib import resources

# task -> (names file, number of classes)
LABEL_MAPS: dict[str, tuple[str, int]] = {
    "seg_coco": ("coco_panoptic_133_names.json", 133),
    "obj_detection": ("unidet_722_names.json", 722),
}


def load_label_names(filename: str, expected: int) -> list[str]:
    """A JSON list of class names shipped in ``labelmaps/``; its length is checked."""
    text = resources.files(__package__).joinpath("labelmaps", filename).read_text(encoding="utf-8")
    names = json.loads(text)
    if not isinstance(names, list) or len(names) != expected:
        raise RuntimeError(f"label_pipeline/core/labelmaps/{filename} should list {expected} names")
    return [str(name) for name in names]


def class_names(task: str) -> list[str] | None:
    """The names of a categorical task's label values, or None for a task without classes."""
    if task not in LABEL_MAPS:
        return None
    return load_label_names(*LABEL_MAPS[task])
