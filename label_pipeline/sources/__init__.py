"""Input sources: each lists deterministic shards and reads one shard at a time."""

from __future__ import annotations

from label_pipeline.config import SourceConfig
from label_pipeline.sources.base import InputShard, Sample, ShardReadReport, Source


def build_source(config: SourceConfig) -> Source:
    """The source a manifest's ``source:`` block describes (imports only the one needed)."""
    if config.format == "webdataset":
        from label_pipeline.sources.webdataset import WebDatasetSource

        return WebDatasetSource(config.required("path"), skip_missing=config.skip_missing)
    if config.format == "demo":
        from label_pipeline.sources.demo import DemoSource

        return DemoSource(config.required("path"))
    if config.format == "folder":
        from label_pipeline.sources.folder import FolderSource

        return FolderSource(config.required("path"), shard_size=config.shard_size)
    if config.format == "coco":
        from label_pipeline.sources.coco import CocoSource

        return CocoSource(config.required("images"), config.annotations, shard_size=config.shard_size)
    from label_pipeline.sources.vg import VisualGenomeSource

    return VisualGenomeSource(
        config.required("images"),
        config.required("image_data"),
        config.captions,
        shard_size=config.shard_size,
    )


__all__ = ["build_source", "InputShard", "Sample", "ShardReadReport", "Source"]
