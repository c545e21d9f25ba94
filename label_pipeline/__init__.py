"""Prismer expert labels at dataset scale (``label-pipeline``); ``read_labels`` reads them back.

Importing the package stays light (the ground floor, ``label_pipeline.core``, is imported by the
expert zoo and the trainer): ``read_labels`` and its ``webdataset`` import load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from label_pipeline.reader import read_labels

__all__ = ["read_labels"]


def __getattr__(name: str) -> Any:
    if name == "read_labels":
        from label_pipeline.reader import read_labels

        return read_labels
    raise AttributeError(f"module 'label_pipeline' has no attribute {name!r}")
