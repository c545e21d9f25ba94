"""CLIP-PCA tables made outside a labelling run: ``import-prismer-tables`` and ``fit-pca``.

``import-prismer-tables PRISMER_CHECKOUT DIR`` converts Prismer's released ``dataset/clip_pca.pkl`` and
``dataset/{coco,ade,detection,background}_features.pt`` into a tables directory (docs/FORMAT.md) plus
``DIR/pca.npz``: exactly the vectors the released checkpoints were trained with, needed to fine-tune
them. Nothing pickled is executed: the ``.pt`` files go through ``torch.load(weights_only=True)``
(tensors, dicts, lists and strings only), and the scikit-learn pickle through :class:`PcaUnpickler`,
which rebuilds numpy arrays and scalars and records the PCA's attributes on an inert stand-in; any other
class in the file is refused. Prismer's files carry NVIDIA's non-commercial licence: they are read from
the user's checkout and never shipped here.

``fit-pca VOCAB.txt OUT.npz`` fits a new PCA-64 on the CLIP text embeddings of a word list (one per
line), for label spaces other than Prismer's.
"""

from __future__ import annotations

import codecs
import copyreg
import importlib
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from label_pipeline.core.embedding_tables import BACKGROUND, EmbeddingTables, write_tables

logger = logging.getLogger(__name__)

PRISMER_LICENCE = "NVIDIA Source Code License-NC (Prismer's dataset/ files): non-commercial use only"
# Prismer's dataset/ file → our table name.
PRISMER_FEATURE_FILES = {
    "coco_features.pt": "seg_coco",
    "ade_features.pt": "seg_ade",
    "detection_features.pt": "obj_detection",
    "background_features.pt": BACKGROUND,
}
OPTIONAL_FILES = {"ade_features.pt"}  # no expert here labels ADE20K
PCA_ATTRIBUTES = (
    "explained_variance_",
    "explained_variance_ratio_",
    "singular_values_",
    "noise_variance_",
    "n_samples_",
)


# ================================================================================================
# Prismer's scikit-learn PCA pickle, without executing it
# ================================================================================================
class PickledObject:
    """Stands in for any scikit-learn class in the pickle: keeps the state it is given, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _numpy_global(module: str, name: str) -> Any:
    """A numpy function named by a pickle, under numpy 2's ``numpy._core`` or numpy 1's ``numpy.core``."""
    candidates = (
        [module.replace("numpy.core", "numpy._core", 1), module] if "numpy.core" in module else [module]
    )
    for candidate in candidates:
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


# What pickled numpy arrays and scalars need; each builds data, none runs code from the file.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how pickle protocol 2 stores bytes (an array's buffer)
}


class PcaUnpickler(pickle.Unpickler):
    """Allows numpy arrays and scalars, and inert stand-ins for ``sklearn.*`` classes; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(module, name) if module.startswith("numpy") else codecs.encode
        if module == "sklearn" or module.startswith("sklearn."):
            return PickledObject
        if (module, name) == ("copyreg", "_reconstructor"):
            return copyreg._reconstructor  # type: ignore[attr-defined]  # private: typeshed omits it
        if (module, name) == ("builtins", "object"):
            return object
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a PCA pickle")


def read_prismer_pca(path: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
    """``dataset/clip_pca.pkl`` → (``PcaProjection``, its other fitted arrays), without sklearn."""
    from expert_zoo.text_features import PcaProjection

    with open(path, "rb") as handle:
        try:
            obj = PcaUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable scikit-learn PCA pickle ({exc})") from exc
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or "components_" not in state or "mean_" not in state:
        raise ValueError(f"{path}: the pickle holds no fitted PCA (no components_ / mean_)")
    if state.get("whiten"):
        raise ValueError(f"{path}: a whitened PCA; Prismer's is not, and only that transform is implemented")
    for key in ("components_", "mean_"):
        if not isinstance(state[key], np.ndarray) or state[key].dtype.kind != "f":
            raise ValueError(f"{path}: {key} is not a float array")
    pca = PcaProjection(state["components_"].astype(np.float64), state["mean_"].astype(np.float64))
    extra = {key.rstrip("_"): np.asarray(state[key]) for key in PCA_ATTRIBUTES if key in state}
    return pca, extra


def read_prismer_features(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """A ``dataset/*_features.pt``: ``{'labels': [...], 'features': Tensor}`` or a bare tensor."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; the restricted load refuses code
        raise ValueError(f"{path}: not a plain tensor file ({type(exc).__name__}: {exc})") from exc
    names = None
    if isinstance(data, dict):
        if "features" not in data:
            raise ValueError(f"{path}: a dict without 'features'")
        names = [str(n) for n in data.get("labels", [])] or None
        data = data["features"]
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise ValueError(f"{path}: the features are not a float tensor")
    array = data.numpy()
    if names is not None and len(names) != len(array):
        raise ValueError(f"{path}: {len(names)} labels for {len(array)} feature rows")
    return array, names


def import_prismer_tables(checkout: str | Path, out_dir: str) -> EmbeddingTables:
    """Convert a Prismer checkout's ``dataset/`` tables into ``out_dir`` (tables, index and ``pca.npz``)."""
    dataset = Path(checkout) / "dataset"
    if not dataset.is_dir():
        raise FileNotFoundError(f"{checkout}: no dataset/ folder (expected a clone of NVlabs/prismer)")
    pca_file = dataset / "clip_pca.pkl"
    if not pca_file.is_file():
        raise FileNotFoundError(f"{pca_file} is missing from the Prismer checkout")
    pca, extra = read_prismer_pca(pca_file)
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    for filename, table in PRISMER_FEATURE_FILES.items():
        path = dataset / filename
        if not path.is_file():
            if filename in OPTIONAL_FILES:
                logger.warning("%s not found: no %s table", path, table)
                continue
            raise FileNotFoundError(f"{path} is missing from the Prismer checkout")
        array, names = read_prismer_features(path)
        arrays[table] = array.reshape(-1) if table == BACKGROUND else array
        entries[table] = _prismer_entry(table, names, filename)
    index = {
        "pca_digest": pca.digest,
        "pca_file": "pca.npz",
        "source": f"prismer:{Path(checkout).resolve()}",
        "licence": PRISMER_LICENCE,
        "tables": entries,
    }
    tables = EmbeddingTables(arrays, index)
    _save_pca(out_dir, pca, extra)
    write_tables(out_dir, tables)
    return tables


def _prismer_entry(table: str, names: list[str] | None, filename: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": "prismer", "file_in_prismer": f"dataset/{filename}"}
    if names is not None:
        entry["texts"] = names
    elif table != BACKGROUND:
        logger.warning("dataset/%s has no labels: its rows are ids only", filename)
    return entry


def _save_pca(out_dir: str, pca: Any, extra: dict[str, np.ndarray]) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/pca.npz", "wb") as handle:
        # Numeric arrays only: TextFeatures reads them back with allow_pickle=False.
        np.savez(handle, allow_pickle=False, components=pca.components, mean=pca.mean, **extra)


# ================================================================================================
# A new PCA from a word list
# ================================================================================================
def read_vocabulary(path: str | Path) -> list[str]:
    """One word or phrase per line; blank lines dropped, repeats kept once (first occurrence)."""
    words = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(w for w in words if w))


def fit_vocabulary_pca(
    words: Sequence[str],
    out: str | Path,
    *,
    weights: str | None = None,
    sha256: str | None = None,
    device: str = "auto",
    dim: int = 64,
) -> dict[str, Any]:
    """CLIP text embeddings of ``words`` → a ``dim``-component PCA written to ``out``; returns a summary."""
    from expert_zoo._hf import resolve_model_dir
    from expert_zoo.text_features import DEFAULT_ENCODER, ClipPcaWordFeatures, ClipTextEncoder, fit_pca
    from expert_zoo.torch_utils import resolve_device
    from label_pipeline.core.weights import loading_weights

    expert = ClipPcaWordFeatures.spec.name
    model_dir = resolve_model_dir(
        {"weights": weights or DEFAULT_ENCODER, "sha256": sha256}, DEFAULT_ENCODER, expert
    )
    with loading_weights(expert, model_dir):
        encoder = ClipTextEncoder(model_dir, resolve_device(device))
    logger.info("encoding %d texts with %s", len(words), weights or DEFAULT_ENCODER)
    pca, stats = fit_pca(encoder(list(words)), dim)
    pca.save(out, **stats)
    return {
        "texts": len(words),
        "input_dim": pca.input_dim,
        "components": pca.dim,
        "explained_variance": float(stats["explained_variance_ratio"].sum()),
        "digest": pca.digest,
    }
