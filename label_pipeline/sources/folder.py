"""A folder tree of images; ``a/b.jpg`` takes its caption from ``a/b.txt`` when present."""

from __future__ import annotations

from typing import Any

import fsspec

from label_pipeline.core.format import IMAGE_EXTENSIONS
from label_pipeline.sources.chunked import ChunkedSource, Entry


class FolderSource(ChunkedSource):
    def __init__(self, path: str, shard_size: int = 1000) -> None:
        super().__init__(shard_size)
        self.path = path.rstrip("/")

    def describe(self) -> dict[str, Any]:
        return {"format": "folder", "path": self.path, "shard_size": self.shard_size}

    def list_entries(self) -> list[Entry]:
        fs, root = fsspec.core.url_to_fs(self.path)
        files = sorted(fs.find(root))
        present = set(files)
        protocol = self.path.split("://", 1)[0] + "://" if "://" in self.path else ""
        entries = []
        for file in files:
            stem, dot, ext = file.rpartition(".")
            if not dot or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            relative = file[len(root) :].lstrip("/")
            caption = None
            if f"{stem}.txt" in present:
                with fs.open(f"{stem}.txt", "rb") as handle:
                    caption = handle.read()
            entries.append(
                Entry(
                    raw_key=relative.rpartition(".")[0],
                    image_url=protocol + file,
                    caption=caption,
                    source={"dataset": "folder", "file": relative},
                )
            )
        return entries
