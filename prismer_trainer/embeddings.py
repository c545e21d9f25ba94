"""64-d embeddings for the categorical labels: class ids (segmentation, detection), OCR words, background.

Prismer feeds a categorical label as a map of CLIP-PCA vectors. The label shards store ids; the vectors
come from the CLIP-PCA class tables of the label root (``OUT/embeddings/``, docs/FORMAT.md) and, for OCR
words, from the features stored next to each word map. Only the ``tiny`` demo may use hashed stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from label_pipeline.core.embedding_tables import BACKGROUND as TABLE_BACKGROUND
from label_pipeline.core.embedding_tables import CLASS_TABLES, TABLES_DIR, read_tables, table_texts
from prismer_trainer.model_config import CATEGORICAL_EXPERTS

logger = logging.getLogger(__name__)

EMBED_DIM = 64
WORD_FEATURE_DTYPE = np.float16  # the stored per-word CLIP-PCA features (ocr_features.npy)
# Prismer's own tables as .npy files (its dataset/*.pt converted): expert -> file stem.
_PRISMER_TABLE_FILES = {
    "seg_coco": "coco_features",
    "seg_ade": "ade_features",
    "obj_detection": "detection_features",
}
TABLE_SIZES = {"seg_coco": 133, "seg_ade": 150, "obj_detection": 722}


def hashed_embedding(text: str, dim: int = EMBED_DIM, norm: float = 6.0) -> np.ndarray:
    """A fixed pseudo-random vector per (lower-cased) string, with Prismer's typical norm (≈6)."""
    seed = int.from_bytes(hashlib.sha256(text.lower().encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector * norm / np.linalg.norm(vector)).astype(np.float32)


class LabelEmbeddings:
    """64-d vectors for class ids (seg, detection), OCR words and the background.

    ``from_dir`` reads a tables directory (docs/FORMAT.md: ``OUT/embeddings`` of a label root, written by
    the labelling run or by ``label-pipeline import-prismer-tables``), a label root holding one, or
    Prismer's tables as ``*_features.npy`` (its ``dataset/*.pt`` converted). A word's vector is the CLIP-PCA
    feature stored next to the word map (``ocr_features.npy``); it reaches :meth:`vector` as a
    ``("vec", bytes)`` token. ``hashed`` is the tiny demo's stand-in: a fixed pseudo-random vector per class
    name and per word text, not CLIP-PCA.
    """

    def __init__(self, classes: Mapping[str, np.ndarray], background: np.ndarray, source: str) -> None:
        self.classes = {k: np.asarray(v, np.float32) for k, v in classes.items()}
        self.background = np.asarray(background, np.float32).reshape(EMBED_DIM)
        self.source = source

    @classmethod
    def find(cls, directory: str | Path) -> LabelEmbeddings | None:
        """The tables of a tables directory or of a label root (its ``embeddings/``); None if it has none."""
        url = str(directory).rstrip("/")
        for candidate in (url, f"{url}/{TABLES_DIR}"):
            tables = read_tables(candidate)
            if tables is not None and TABLE_BACKGROUND in tables.arrays:
                classes = {k: v for k, v in tables.arrays.items() if k != TABLE_BACKGROUND}
                return cls(classes, tables.arrays[TABLE_BACKGROUND], source=candidate)
        root = Path(url)
        if "://" in url or not (root / "background_features.npy").exists():
            return None
        classes = {
            expert: np.load(root / f"{name}.npy")
            for expert, name in _PRISMER_TABLE_FILES.items()
            if (root / f"{name}.npy").exists()
        }
        return cls(classes, np.load(root / "background_features.npy"), source=str(root))

    @classmethod
    def from_dir(cls, directory: str | Path) -> LabelEmbeddings:
        found = cls.find(directory)
        if found is None:
            raise FileNotFoundError(
                f"{directory}: no CLIP-PCA label tables. Expected a tables directory (index.json, see "
                "docs/FORMAT.md), a label root holding one in embeddings/, or Prismer's tables as .npy "
                f"({', '.join(f'{n}.npy' for n in _PRISMER_TABLE_FILES.values())}, background_features.npy)"
            )
        return found

    @classmethod
    def hashed(cls) -> LabelEmbeddings:
        classes = {expert: np.stack(_hashed_class_table(expert)) for expert in TABLE_SIZES}
        return cls(classes, hashed_embedding("<background>"), source="hashed")

    def save(self, path: Path) -> None:
        """One ``.npz`` of plain arrays (a checkpoint carries the tables it was trained with)."""
        arrays: dict[str, Any] = {f"class_{k}": v for k, v in self.classes.items()}
        np.savez(path, background=self.background, source=np.array(self.source), **arrays)

    @classmethod
    def load(cls, path: Path) -> LabelEmbeddings:
        with np.load(path) as data:
            classes = {k.removeprefix("class_"): data[k] for k in data.files if k.startswith("class_")}
            return cls(classes, data["background"], source=str(data["source"]))

    def class_vector(self, expert: str, class_id: int) -> np.ndarray:
        table = self.classes.get(expert)
        if table is None:
            raise KeyError(f"no embedding table for {expert}; source {self.source} lacks it")
        if not 0 <= class_id < len(table):
            return self.background  # an id outside the label space (never written by the experts)
        return table[class_id]

    def vector(self, token: tuple[str, Any]) -> np.ndarray:
        """The vector of an embedding token: ``("bg", _)``, ``("vec", feature bytes)``, ``("word", text)``
        or ``(expert, class id)``."""
        kind, value = token
        if kind == "bg":
            return self.background
        if kind == "vec":  # a stored word feature (ocr_features.npy row)
            return np.frombuffer(value, WORD_FEATURE_DTYPE).astype(np.float32)
        if kind == "word":  # the tiny demo's stand-in for a word without a stored feature
            return hashed_embedding(str(value))
        return self.class_vector(kind, int(value))


def _hashed_class_table(expert: str) -> list[np.ndarray]:
    """One hashed vector per class: from the class names the experts write, else ``expert:id``."""
    if expert in CLASS_TABLES:
        names = table_texts(expert)
    else:
        names = [f"{expert}:{i}" for i in range(TABLE_SIZES[expert])]
    # Names repeat in UniDet's list; the index keeps duplicates distinct, as Prismer's rows are.
    return [hashed_embedding(f"{name}#{i}") for i, name in enumerate(names)]


# ================================================================================================
# Which tables a run uses
# ================================================================================================
def label_root_of(shards: Sequence[str]) -> str | None:
    """The label root (``…/OUT``) of shards under ``OUT/shards/``; None for shards elsewhere."""
    base, sep, _ = shards[0].rpartition("/shards/") if shards else ("", "", "")
    return base if sep else None


def default_embeddings(root: str | None, experts: Sequence[str], model: str) -> LabelEmbeddings:
    """The label root's CLIP-PCA tables. Only the ``tiny`` demo may fall back to hashed stand-ins;
    ``prismer_base``/``prismer_large`` get an error that names the commands making the tables."""
    found = LabelEmbeddings.find(root) if root else None
    if found is not None:
        logger.info("label embeddings: CLIP-PCA tables from %s", found.source)
        return found
    categorical = [e for e in experts if e in CATEGORICAL_EXPERTS]
    if model == "tiny" or not categorical:
        if categorical:
            logger.info(
                "tiny demo: no CLIP-PCA tables in %s, so class and word embeddings are hashed stand-ins "
                "(fixed pseudo-random vectors per name), not Prismer's",
                root,
            )
        return LabelEmbeddings.hashed()
    where = f"{root}/embeddings" if root else "DIR"
    raise FileNotFoundError(
        f"no CLIP-PCA label tables in {where}: {model} embeds its {', '.join(categorical)} labels with them. "
        f"Import Prismer's (to fine-tune the released checkpoints): label-pipeline import-prismer-tables "
        f"PRISMER_CHECKOUT {where}; or label with the text-feature stage ocr_features (docs/EXPERTS.md), "
        "which writes them; or pass --label-embeddings DIR"
    )


def require_word_features(root: str | None, experts: Sequence[str], model: str) -> None:
    """``prismer_base``/``prismer_large`` read each OCR word's stored CLIP-PCA feature: refuse labels
    whose ``_run.json`` shows OCR without the text-feature stage (the tiny demo hashes the words)."""
    if model == "tiny" or "ocr_detection" not in experts or root is None:
        return
    try:
        with fsspec.open(f"{root}/_run.json", "r") as handle:
            labelled = json.load(handle).get("experts", {})
    except (OSError, ValueError, AttributeError):
        return  # no run record to tell: samples without features have their OCR masked
    if "ocr_detection" in labelled and "ocr_features" not in labelled:
        raise FileNotFoundError(
            f"{root} has OCR labels but no word features (ocr_features): {model} embeds each word with "
            "its CLIP-PCA feature. Add {name: ocr_features, options: {pca: PCA.npz}} to the dataset's "
            f"manifest and run `label-pipeline run MANIFEST --out {root}`: only that member is computed "
            "(docs/EXPERTS.md, text features)"
        )
