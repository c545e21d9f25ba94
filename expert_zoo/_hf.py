"""Helpers shared by the experts that load a transformers model directory (DPT, Mask2Former, OWLv2, CLIP)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def resolve_model_dir(config: Mapping[str, Any], default: str, expert: str) -> Path:
    """The local model directory named by ``config["weights"]`` (a hub repo, a local dir or a file in one)."""
    from label_pipeline.core.weights import resolve_weights

    source = config.get("weights", default)
    return model_directory(resolve_weights(source, expert=expert, sha256=config.get("sha256")))


def model_directory(path: Path) -> Path:
    """A resolved weights path as a model directory: a single file (e.g. ``.../model.safetensors``)
    stands for the directory that holds it."""
    return path if path.is_dir() else path.parent


def load_pretrained(model_cls: Any, model_dir: Path) -> Any:
    """``model_cls.from_pretrained(model_dir)`` in float32, refusing files that do not fit the model.

    transformers fills weights missing from the files with random values and only warns (with a table
    of every key), so a file with the wrong keys would label with a random network. Released checkpoints
    can lack a few entries the model never uses (DPT-Hybrid's first fusion residual), so a handful
    missing is one warning line; most of them missing, or any shape mismatch, is an error.
    """
    # Its key-by-key report is replaced by the checks below. A filter, not a level: transformers runs
    # extra checks (and warns from another logger) when this logger's level is WARNING or above.
    quiet = logging.getLogger("transformers.modeling_utils")
    quiet.addFilter(_errors_only)
    try:
        # Mismatched shapes are let through so that they can be reported here, in one line.
        model, info = model_cls.from_pretrained(
            str(model_dir), output_loading_info=True, ignore_mismatched_sizes=True
        )
    finally:
        quiet.removeFilter(_errors_only)
    name, total = type(model).__name__, len(model.state_dict())
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, found, expected = mismatched[0]
        raise ValueError(
            f"{len(mismatched)} weights have the wrong shape for {name} "
            f"(e.g. {key}: {tuple(found)} in the file, {tuple(expected)} in the model)"
        )
    missing = sorted(info.get("missing_keys") or [])
    if len(missing) * 2 > total:
        raise ValueError(
            f"{len(missing)} of the {total} weights of {name} are missing from the files "
            f"(e.g. {', '.join(missing[:3])}): not weights for this model"
        )
    if missing:
        logger.warning(
            "%s: %d weights missing from %s keep their initial values: %s",
            name,
            len(missing),
            model_dir,
            ", ".join(missing[:5]),
        )
    # .float() rather than a dtype argument: its name changed across transformers versions.
    return model.float()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
