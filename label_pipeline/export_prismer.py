"""``label-pipeline export-prismer OUT DEST``: a label output → Prismer's own folders and file formats.

Prismer's ``dataset/utils.py:get_expert_labels`` reads, for an image
``{data_path}/{dataset}/{sub}/{stem}.jpg``,

* ``{DEST}/{expert}/{dataset}/{sub}/{stem}.png`` for depth, normal, edge, seg_coco (and seg_ade),
* ``{DEST}/obj_detection/{dataset}/{sub}/{stem}.png`` plus ``.json``: ``{"<instance>": <UniDet class id>}``,
* ``{DEST}/ocr_detection/{dataset}/{sub}/{stem}.png`` plus ``.pt``: ``torch.save`` of
  ``{instance: {"features": float32 tensor [64], "text": str}}``; for an image without words nothing at
  all (its generator ``continue``s; the reader then takes "no text").

Our PNG members already have Prismer's encodings and are copied byte for byte; the detection json is
reduced to the instance → class map, and the OCR side file is built from ``ocr_detection.json`` and the
``ocr_features.npy`` rows (row i = word i of the json list). ``sub/stem`` is the source's relative file
path where the source has one (COCO ``train2014/COCO_train2014_….jpg``, VG, folders), else
``{shard}/{key}``: img2dataset's folder layout, which Prismer globbed for CC3M/CC12M. ``--images DIR``
also writes each exported sample's original image bytes (and caption ``.txt``) to
``DIR/{dataset}/{sub}/{stem}.{ext}``, only for samples whose every exported label exists, so that
Prismer's loaders, which fail on a missing label, can glob that folder.

Skipped, and counted: samples that failed labelling, samples missing a member, and samples whose image
was EXIF-rotated (our labels follow the rotated image; Prismer reads the stored pixels).
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from label_pipeline.config import ConfigError
from label_pipeline.core.format import IMAGE_EXTENSIONS, decode_npy
from label_pipeline.core.tario import read_tar_samples
from label_pipeline.output import OutputStore

logger = logging.getLogger(__name__)

# Our manifest names → the dataset keys Prismer's loaders pass to get_expert_labels.
PRISMER_DATASET_KEYS = {"coco": "vqav2", "cc3m": "cc3m_sgu", "sbu": "cc3m_sgu", "demo": "helpers"}
MAP_TASKS = ("depth", "normal", "edge", "seg_coco", "seg_ade")  # a PNG and nothing else
DETECTION, OCR, WORD_FEATURES = "obj_detection", "ocr_detection", "ocr_features"
FEATURE_DIM = 64
LABELLED_STATUSES = ("ok", "partial")


@dataclass
class ExportSummary:
    """What an export wrote and what it left out (counts of samples)."""

    dest: str
    dataset: str
    shards: int = 0
    samples: int = 0
    written: Counter = field(default_factory=Counter)  # task → samples whose label files were written
    no_words: int = 0  # OCR ran and found nothing: no file, as Prismer
    images: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason → samples
    missing: Counter = field(default_factory=Counter)  # task → samples without that task's member
    tasks: tuple[str, ...] = ()
    left_out_tasks: dict[str, str] = field(default_factory=dict)  # task → why it is not exported

    @property
    def incomplete(self) -> bool:
        return bool(sum(self.skipped.values()) or sum(self.missing.values()))


def export_prismer(
    output: str, dest: str, dataset: str | None = None, images: str | None = None
) -> ExportSummary:
    """Write the committed shards of the label output ``output`` in Prismer's layout under ``dest``."""
    store = OutputStore(output)
    run = _read_run(store, output)
    dest_path = _local_folder_outside(store, dest, "DEST")
    images_path = _local_folder_outside(store, images, "--images") if images else None
    name = dataset or PRISMER_DATASET_KEYS.get(str(run.get("dataset")), str(run.get("dataset")))
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"--dataset must be one folder name (Prismer's dataset key), got {name!r}")
    summary = ExportSummary(dest=str(dest_path), dataset=name)
    summary.tasks, summary.left_out_tasks = _exported_tasks(set(run.get("experts") or {}))
    done, damaged = store.committed(sorted(store.done_shards()))
    for shard_id, problem in sorted(damaged.items()):
        logger.warning("shard %s is not exported: %s", shard_id, problem)
    if not done:
        raise ConfigError(f"{output} has no finished shard to export (run `label-pipeline status {output}`)")
    writer = _SampleWriter(dest_path, images_path, name, summary)
    for shard_id in sorted(done):
        with store.fs.open(store.shard_path(shard_id), "rb") as handle:
            for key, members in read_tar_samples(handle):
                writer.sample(shard_id, key, members)
        summary.shards += 1
    return summary


def _read_run(store: OutputStore, output: str) -> dict[str, Any]:
    run = store.read_run()
    if not isinstance(run, dict) or not isinstance(run.get("experts"), dict):
        raise ConfigError(
            f"{output} is not a label output (no readable _run.json): give the output root of "
            "`label-pipeline run`"
        )
    return run


def _local_folder_outside(store: OutputStore, folder: str, what: str) -> Path:
    """``folder`` as a local path, refused when it is (inside) the output root."""
    if "://" in folder and not folder.startswith("file://"):
        raise ConfigError(f"{what} must be a local folder (Prismer reads it with os and PIL), got {folder}")
    path = Path(folder.removeprefix("file://")).expanduser().resolve()
    if store.local:
        root = Path(store.root).resolve()
        if path == root or root in path.parents:
            raise ConfigError(f"{what} {path} is inside the label output {root}: choose a folder outside it")
    return path


def _exported_tasks(labelled: set[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    tasks = [t for t in (*MAP_TASKS, DETECTION) if t in labelled]
    left_out: dict[str, str] = {}
    if OCR in labelled and WORD_FEATURES in labelled:
        tasks.append(OCR)
    elif OCR in labelled:
        # Prismer's reader ignores a word map without its .pt, and the .pt needs the word features.
        left_out[OCR] = "no word features: label with the ocr_features expert too (docs/EXPERTS.md)"
    for task in sorted(labelled - {*tasks, WORD_FEATURES, *left_out}):
        left_out[task] = "not one of Prismer's experts"
    return tuple(tasks), left_out


def prismer_relative_stem(meta: dict[str, Any], key: str, shard_id: str) -> PurePosixPath:
    """``sub/stem`` of a sample: the source's relative file path without extension (a file at the top
    level goes under the shard id, since Prismer's generators expect one folder level), else
    ``{shard}/{key}``."""
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    file = source.get("file") if isinstance(source, dict) else None
    if isinstance(file, str) and file.strip("/"):
        path = PurePosixPath(file.strip("/"))
        if ".." not in path.parts:
            stem = path.with_suffix("") if path.suffix else path
            return stem if len(stem.parts) > 1 else PurePosixPath(shard_id) / stem
    return PurePosixPath(shard_id) / key


class _SampleWriter:
    """Writes one sample's Prismer files (and image) and counts what it wrote or left out."""

    def __init__(self, dest: Path, images: Path | None, dataset: str, summary: ExportSummary) -> None:
        self.dest, self.images, self.dataset, self.summary = dest, images, dataset, summary
        self.seen: set[PurePosixPath] = set()

    def sample(self, shard_id: str, key: str, members: dict[str, bytes]) -> None:
        self.summary.samples += 1
        meta = _json_or_none(members.get("json"))
        if not isinstance(meta, dict) or meta.get("status") not in LABELLED_STATUSES:
            self.summary.skipped["not labelled (failed sample)"] += 1
            return
        if meta.get("exif_transposed"):
            self.summary.skipped["EXIF-rotated image (labels follow the rotated image)"] += 1
            return
        rel = prismer_relative_stem(meta, key, shard_id)
        if rel in self.seen:
            self.summary.skipped["same Prismer path as an earlier sample"] += 1
            logger.warning(
                "sample %s of shard %s maps to %s like an earlier one; left out", key, shard_id, rel
            )
            return
        self.seen.add(rel)
        files = self._label_files(members)
        if files is None:
            return
        for path, data in files:
            _write_file(self.dest / path.format(dataset=self.dataset, rel=rel), data)
        if self.images is not None:
            self._write_image(rel, members)

    def _label_files(self, members: dict[str, bytes]) -> list[tuple[str, bytes]] | None:
        """(path template, bytes) of every label file, or None (counted) when a member is missing."""
        per_task = {task: self._task_files(task, members) for task in self.summary.tasks}
        missing = [task for task, files in per_task.items() if files is None]
        if missing:
            self.summary.missing.update(missing)
            return None
        for task, files in per_task.items():
            if files:
                self.summary.written[task] += 1
            else:  # OCR that found no word: Prismer writes neither the map nor the .pt
                self.summary.no_words += 1
        return [file for files in per_task.values() for file in files or []]

    def _task_files(self, task: str, members: dict[str, bytes]) -> list[tuple[str, bytes]] | None:
        png = members.get(f"{task}.png")
        if png is None:
            return None
        files = [(f"{task}/{{dataset}}/{{rel}}.png", png)]
        if task == DETECTION:
            records = _json_or_none(members.get(f"{DETECTION}.json"))
            if not isinstance(records, list):
                return None
            files.append((f"{task}/{{dataset}}/{{rel}}.json", detection_json(records)))
        elif task == OCR:
            words = _json_or_none(members.get(f"{OCR}.json"))
            if not isinstance(words, list):
                return None
            if not words:
                return []
            features = self._word_features(members, len(words))
            if features is None:
                return None
            files.append((f"{task}/{{dataset}}/{{rel}}.pt", word_side_file(words, features)))
        return files

    @staticmethod
    def _word_features(members: dict[str, bytes], words: int) -> np.ndarray | None:
        data = members.get(f"{WORD_FEATURES}.npy")
        if data is None:
            return None
        features = decode_npy(data)
        if features.shape != (words, FEATURE_DIM):
            logger.warning("ocr_features of shape %s for %d words; sample left out", features.shape, words)
            return None
        return features

    def _write_image(self, rel: PurePosixPath, members: dict[str, bytes]) -> None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            return
        folder = self.images / self.dataset  # type: ignore[operator]
        _write_file(folder / f"{rel}.{ext}", members[ext])
        if "txt" in members:  # Prismer's CC3M/CC12M loaders read the caption beside the image
            _write_file(folder / f"{rel}.txt", members["txt"])
        self.summary.images += 1


def detection_json(records: list[dict[str, Any]]) -> bytes:
    """Our detection records → Prismer's ``{"<instance>": class_id}`` (``json.dump`` of an int-keyed dict)."""
    mapping = {str(int(r["instance"])): int(r["class_id"]) for r in records}
    return json.dumps(mapping).encode("utf-8")


def word_side_file(words: list[dict[str, Any]], features: np.ndarray) -> bytes:
    """Prismer's OCR ``.pt``: ``{instance: {"features": float32 tensor [64], "text": str}}``.

    Row i of ``features`` belongs to word i of the json list, whose pixel value is its ``instance``.
    Plain tensors, ints and strings only, so ``torch.load(..., weights_only=True)`` reads it.
    """
    import torch

    side = {
        int(word["instance"]): {
            "features": torch.from_numpy(np.array(features[row], dtype=np.float32)),
            "text": str(word.get("text", "")),
        }
        for row, word in enumerate(words)
    }
    buffer = io.BytesIO()
    torch.save(side, buffer)
    return buffer.getvalue()


def _json_or_none(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _write_file(path: Path, data: bytes) -> None:
    """Write through a temp file and rename, so an interrupted export leaves no truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_summary(summary: ExportSummary) -> str:
    """The lines ``export-prismer`` prints."""
    written = ", ".join(f"{t} {summary.written[t]}" for t in summary.tasks)
    lines = [
        f"exported {summary.shards} shards ({summary.samples} samples) to {summary.dest} as Prismer's "
        f"{{expert}}/{summary.dataset}/{{sub}}/{{stem}}.png layout",
        f"labels written: {written or 'none'}",
    ]
    if summary.no_words:
        lines.append(f"ocr_detection: {summary.no_words} images without words, no file (as Prismer)")
    if summary.images:
        lines.append(f"images written: {summary.images}")
    for task, why in sorted(summary.left_out_tasks.items()):
        lines.append(f"not exported: {task} ({why})")
    for reason, count in sorted(summary.skipped.items()):
        lines.append(f"left out: {count} samples, {reason}")
    for task, count in sorted(summary.missing.items()):
        lines.append(f"left out: {count} samples without a {task} label")
    return "\n".join(lines)
