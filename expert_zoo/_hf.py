"""Helpers shared by the experts that load a transformers model directory (Mask2Former, OWLv2)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Files that decide what a model directory computes: its config, tokenizer and weights. READMEs,
# ``.gitattributes`` and weights in other frameworks (``tf_model.h5``, ``flax_model.msgpack``) do not.
_CONFIG_SUFFIXES = (".json", ".txt", ".model")


def resolve_model_dir(config: Mapping[str, Any], default: str, expert: str) -> Path:
    """The local model directory named by ``config["weights"]`` (a hub repo, a local dir or a file in one)."""
    from expert_zoo.weights import resolve_weights

    source = config.get("weights", default)
    path = resolve_weights(source, expert=expert, sha256=config.get("sha256"))
    # A single file (e.g. ``.../model.safetensors``) stands for the directory that holds it.
    return path if path.is_dir() else path.parent


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files ``from_pretrained`` loads: safetensors when present, else PyTorch ``.bin``."""
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {model_dir}")


def model_dir_digest(model_dir: Path) -> str:
    """sha256 over the names and contents of the config, tokenizer and weight files of a model dir."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in _CONFIG_SUFFIXES)
    files += weight_files(model_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:  # resolves the hub cache's symlinks to blobs
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_label_names(filename: str, expected: int) -> list[str]:
    """A JSON list of class names shipped in ``expert_zoo/labelmaps``; its length is checked."""
    text = resources.files("expert_zoo").joinpath("labelmaps", filename).read_text(encoding="utf-8")
    names = json.loads(text)
    if not isinstance(names, list) or len(names) != expected:
        raise RuntimeError(f"expert_zoo/labelmaps/{filename} should list {expected} names")
    return [str(n) for n in names]
