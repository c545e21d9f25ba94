"""The CLIP-PCA class tables of an output root: ``OUT/embeddings/`` (docs/FORMAT.md).

A categorical label stores ids (seg classes, detection classes, word instances); Prismer's trainer
turns each id into a 64-d vector: the class name's CLIP text embedding reduced by the PCA that also
reduces the word features (expert_zoo.text_features), and one background vector for 255. A labelling
run writes the tables its categorical experts imply, so a label root describes itself:

    OUT/embeddings/index.json          what each table is (below), written last
    OUT/embeddings/seg_coco.npy        float32 (133, 64), row = seg_coco class id
    OUT/embeddings/obj_detection.npy   float32 (722, 64), row = detection class_id
    OUT/embeddings/seg_ade.npy         float32 (150, 64) (Prismer's import only)
    OUT/embeddings/background.npy      float32 (64,), for the value 255 of every categorical map
    OUT/embeddings/pca.npz             the PCA itself (Prismer's import and fit-pca)

``index.json``: ``{"format": 1, "dim": 64, "pca_digest": …, "tables": {name: {"file", "shape",
"source", "texts" | "text", "encoder", "encoder_digest"}}}``. Every table of one directory lives in the
space of the PCA ``pca_digest`` names; word features made with another PCA would not match them.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from label_pipeline.core.labelmaps import LABEL_MAPS, load_label_names

logger = logging.getLogger(__name__)

TABLES_DIR = "embeddings"
INDEX_FILE = "index.json"
TABLES_FORMAT = 1
EMBED_DIM = 64
BACKGROUND = "background"
# What Prismer's background vector encodes is not published; the word "background" is our choice.
BACKGROUND_TEXT = "background"
# Class tables a task implies: task -> (names file in label_pipeline/core/labelmaps, rows).
CLASS_TABLES: dict[str, tuple[str, int]] = LABEL_MAPS
CATEGORICAL_TASKS = ("seg_coco", "seg_ade", "obj_detection", "ocr_detection")
TEXT_FEATURES_TASK = "ocr_features"


@dataclass
class EmbeddingTables:
    """Tables by name (``seg_coco``, ``seg_ade``, ``obj_detection``, ``background``) and their index."""

    arrays: dict[str, np.ndarray]
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def pca_digest(self) -> str | None:
        return self.index.get("pca_digest")


def tables_dir(output_root: str) -> str:
    return f"{output_root.rstrip('/')}/{TABLES_DIR}"


def implied_tables(tasks: Iterable[str]) -> list[str]:
    """The tables a set of labelled tasks needs: each class table, plus the background vector."""
    tasks = set(tasks)
    wanted = [name for name in CLASS_TABLES if name in tasks]
    if tasks & set(CATEGORICAL_TASKS):
        wanted.append(BACKGROUND)
    return wanted


def table_texts(name: str) -> list[str]:
    """The texts a table embeds, row by row: the class names, or the background word."""
    if name == BACKGROUND:
        return [BACKGROUND_TEXT]
    filename, rows = CLASS_TABLES[name]
    return load_label_names(filename, rows)


# ================================================================================================
# Reading and writing a tables directory
# ================================================================================================
def read_tables(directory: str) -> EmbeddingTables | None:
    """The tables under ``directory`` (any fsspec URL), or None when it holds no ``index.json``."""
    fs, root = fsspec.core.url_to_fs(directory.rstrip("/"))
    try:
        index = json.loads(fs.cat_file(f"{root}/{INDEX_FILE}"))
    except FileNotFoundError:
        return None
    if not isinstance(index, dict) or index.get("format") != TABLES_FORMAT:
        raise ValueError(f"{directory}/{INDEX_FILE}: not a format-{TABLES_FORMAT} tables index")
    arrays = {}
    for name, entry in index.get("tables", {}).items():
        data = fs.cat_file(f"{root}/{entry['file']}")
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if list(array.shape) != list(entry["shape"]):
            raise ValueError(f"{directory}/{entry['file']}: shape {array.shape}, index says {entry['shape']}")
        arrays[name] = array.astype(np.float32, copy=False)
    return EmbeddingTables(arrays, index)


def write_tables(directory: str, tables: EmbeddingTables) -> None:
    """Write every array, then ``index.json`` (a reader never sees an index naming a missing file)."""
    fs, root = fsspec.core.url_to_fs(directory.rstrip("/"))
    fs.makedirs(root, exist_ok=True)
    index = dict(tables.index)
    entries = {}
    for name, array in sorted(tables.arrays.items()):
        array = np.asarray(array, dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        _write_atomic(fs, f"{root}/{name}.npy", buffer.getvalue())
        entry = dict(index.get("tables", {}).get(name, {}))
        entry.update(file=f"{name}.npy", shape=list(array.shape))
        entries[name] = entry
    index.update(format=TABLES_FORMAT, dim=EMBED_DIM, tables=entries)
    text = json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    _write_atomic(fs, f"{root}/{INDEX_FILE}", text.encode("utf-8"))


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def table_entry(name: str, source: str, **extra: Any) -> dict[str, Any]:
    """An index entry: where the table came from and what it embeds."""
    texts = table_texts(name) if name in CLASS_TABLES or name == BACKGROUND else None
    entry: dict[str, Any] = {"source": source, **extra}
    if name == BACKGROUND:
        entry["text"] = BACKGROUND_TEXT
    elif texts is not None:
        entry["texts"] = texts
    return entry
