"""The labelling run's embedding-table stage: the CLIP-PCA tables a run's experts imply, computed with
the run's text encoder and PCA and written into the output root (format: ``core.embedding_tables``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from label_pipeline.core.embedding_tables import (
    BACKGROUND,
    BACKGROUND_TEXT,
    CLASS_TABLES,
    TEXT_FEATURES_TASK,
    EmbeddingTables,
    implied_tables,
    read_tables,
    table_entry,
    table_texts,
    tables_dir,
    write_tables,
)

logger = logging.getLogger(__name__)


def compute_tables(
    features: Callable[[Sequence[str]], np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Each table's texts → features (``TextFeatures``): float32 (rows, 64), background (64,)."""
    arrays = {}
    for name in names:
        vectors = np.asarray(features(table_texts(name)), dtype=np.float32)
        arrays[name] = vectors[0] if name == BACKGROUND else vectors
    return arrays


def write_run_tables(
    output_root: str, requests: Sequence[Any], tasks: Iterable[str], device: str = "cpu"
) -> None:
    """Called once per labelling run (``label_pipeline.run.prepare_run``, under the output lock).

    ``tasks``: every task the output holds after this run; ``requests``: the run's expert requests,
    whose ``ocr_features`` options name the text encoder and PCA. Tables already there and still right
    are kept: Prismer's imported tables in the same PCA space, or ours made with the same encoder.
    """
    wanted = implied_tables(tasks)
    if not wanted:
        return
    directory = tables_dir(output_root)
    existing = read_tables(directory)
    # Only the CLIP-PCA backend (the task's default) names an encoder and a PCA; another backend of
    # the task (a plugin, a test stand-in) makes no tables.
    request = next(
        (r for r in requests if r.task == TEXT_FEATURES_TASK and r.backend in (None, "clip_pca")), None
    )
    if request is None:
        missing = [n for n in wanted if existing is None or n not in existing.arrays]
        if missing:
            logger.warning(
                "no CLIP-PCA tables for %s in %s: add the text-feature stage (ocr_features, with its `pca` "
                "option) to the run, or import Prismer's: label-pipeline import-prismer-tables "
                "PRISMER_CHECKOUT %s. The trainer's prismer_base/large configs need them.",
                ", ".join(missing),
                directory,
                directory,
            )
        return
    features = _text_features(request, device)
    tables = updated_tables(existing, features, wanted)
    if tables is not None:
        write_tables(directory, tables)
        logger.info("CLIP-PCA tables %s written to %s", ", ".join(sorted(tables.arrays)), directory)


def _text_features(request: Any, device: str) -> Any:
    from expert_zoo.base import validate_options
    from expert_zoo.text_features import ClipPcaWordFeatures, TextFeatures
    from expert_zoo.torch_utils import resolve_device

    expert = ClipPcaWordFeatures
    options = validate_options(expert.Options, request.options, request.options_where, owner=expert.spec.name)
    return TextFeatures.from_options(options, resolve_device(device), ClipPcaWordFeatures.spec.name)


def updated_tables(
    existing: EmbeddingTables | None, features: Any, wanted: Sequence[str]
) -> EmbeddingTables | None:
    """The tables to write for ``wanted`` with ``features`` (a ``TextFeatures``), or None if nothing changes.

    In the same PCA space, a table is kept when it is Prismer's (what the released checkpoints saw) or was
    made by the same encoder for the same texts. A new PCA invalidates every table.
    """
    keep: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    if existing is not None and existing.pca_digest == features.pca.digest:  # the same PCA space
        for name, array in existing.arrays.items():
            entry = existing.index["tables"][name]
            current = entry.get("source") == "prismer" or (
                entry.get("encoder_digest") == features.encoder_digest
                and entry.get("texts", entry.get("text")) == _texts_of(name)
            )
            if current or name not in wanted:
                keep[name], entries[name] = array, entry
    elif existing is not None:
        logger.warning(
            "the PCA changed: the CLIP-PCA tables %s are recomputed", ", ".join(sorted(existing.arrays))
        )
    todo = [name for name in wanted if name not in keep]
    if not todo:
        return None
    computed = compute_tables(features, todo)
    for name in todo:
        entries[name] = table_entry(
            name, "clip_pca", encoder=features.encoder_source, encoder_digest=features.encoder_digest
        )
    index = {"pca_digest": features.pca.digest, "tables": entries}
    return EmbeddingTables({**keep, **computed}, index)


def _texts_of(name: str) -> Any:
    if name == BACKGROUND:
        return BACKGROUND_TEXT
    return table_texts(name) if name in CLASS_TABLES else None
