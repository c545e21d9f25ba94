"""Turning samples into output samples: decode once, fan out to every expert, encode members.

This module owns the per-sample logic shared by every runner. It knows nothing about where experts
run: it calls ``ExpertHandle`` objects, which are experts in this process or proxies to Ray actors.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from expert_zoo.base import ExpertSpec, Label
from label_pipeline.budget import PixelBudget
from label_pipeline.config import DecodeConfig
from label_pipeline.decode import DecodedImage, DecodeError, decode_image
from label_pipeline.format import IMAGE_EXTENSIONS, decode_png, encode_json
from label_pipeline.sources.base import Sample
from label_pipeline.tario import Member

logger = logging.getLogger(__name__)
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


class ExpertHandle(Protocol):
    """What the labeler needs from an expert, wherever it runs."""

    spec: ExpertSpec

    def __call__(self, images: Sequence[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]: ...

    def encode(self, label: Label) -> dict[str, bytes]: ...

    def fingerprint(self) -> str: ...


@dataclass
class WorkItem:
    """A sample on its way to the output: its members (suffix → bytes) and its json metadata."""

    key: str
    members: dict[str, bytes]
    meta: dict[str, Any]
    image: DecodedImage | None = None
    labels: dict[str, Label] = field(default_factory=dict)

    @property
    def pixel_bytes(self) -> int:
        """Bytes of the decoded image this item holds (0 once labelled, or when it failed to decode)."""
        return self.image.array.nbytes if self.image is not None else 0

    def to_members(self) -> list[Member]:
        self.members["json"] = encode_json(self.meta)
        return [(f"{self.key}.{suffix}", data) for suffix, data in self.members.items()]

    def record(self) -> dict[str, Any]:
        image_ext = _image_ext(self.members)
        experts = self.meta.get("experts", {})
        return {
            "key": self.key,
            "status": self.meta["status"],
            "error": self.meta.get("error"),
            "expert_status": json.dumps({t: e["status"] for t, e in sorted(experts.items())}),
            "image_bytes": len(self.members[image_ext]) if image_ext else 0,
            "label_bytes": sum(len(v) for s, v in self.members.items() if s.split(".")[0] in experts),
        }


def _image_ext(members: Mapping[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def decode_caption(caption: bytes | str | None) -> tuple[str | None, bool]:
    """Caption → (text, was_replaced). Invalid UTF-8 is replaced, never dropped."""
    if caption is None or isinstance(caption, str):
        return caption, False
    try:
        return caption.decode("utf-8"), False
    except UnicodeDecodeError:
        return caption.decode("utf-8", errors="replace"), True


def stable_error_text(text: str) -> str:
    """An error message without memory addresses (``<… object at 0x7f…>`` → ``<… object>``).

    Per-sample errors go into the tar's json and the records, which must be the same bytes on every
    run; an object's repr in an exception message is the usual run-dependent part.
    """
    return _ADDRESS.sub("", text)


def item_from_sample(sample: Sample, decode: DecodeConfig) -> WorkItem:
    """A fresh input sample: keep the original bytes, decode the image once."""
    meta: dict[str, Any] = {"key": sample.key, "source": sample.source, "experts": {}}
    members: dict[str, bytes] = {}
    if sample.image is not None and sample.image_ext:
        members[sample.image_ext] = sample.image
    text, replaced = decode_caption(sample.caption)
    if text is not None:
        members["txt"] = text.encode("utf-8")
    if replaced:
        meta["caption_status"] = "replaced"
    item = WorkItem(sample.key, members, meta)
    if sample.error:
        _fail_sample(item, sample.error, sample.error_message or "the input sample has no usable image")
    else:
        _decode_into(item, sample.image, decode)
    return item


def item_from_output(key: str, members: dict[str, bytes], decode: DecodeConfig) -> WorkItem:
    """A sample of an existing output shard, for incremental relabelling: decode the stored image."""
    meta = json.loads(members["json"])
    item = WorkItem(key, {s: d for s, d in members.items() if s != "json"}, meta)
    if meta.get("status") in ("ok", "partial"):
        image_ext = _image_ext(item.members)
        _decode_into(item, item.members.get(image_ext) if image_ext else None, decode)
    return item


def _decode_into(item: WorkItem, data: bytes | None, decode: DecodeConfig) -> None:
    try:
        image = decode_image(data, max_pixels=decode.max_pixels, min_side=decode.min_side)
    except DecodeError as exc:
        _fail_sample(item, exc.status, str(exc))
        return
    item.image = image
    item.meta.update(
        size=list(image.size),
        orig_size=list(image.orig_size),
        mode=image.mode,
        exif_transposed=image.exif_transposed,
    )
    item.meta.setdefault("status", "ok")


def _fail_sample(item: WorkItem, status: str, error: str) -> None:
    item.meta["status"] = status
    item.meta["error"] = stable_error_text(error)
    item.meta["experts"] = {}


def drop_task(item: WorkItem, task: str) -> None:
    """Forget an expert's members and status before recomputing it."""
    for suffix in [s for s in item.members if s.split(".")[0] == task]:
        del item.members[suffix]
    item.meta.get("experts", {}).pop(task, None)


def stored_label(item: WorkItem, task: str) -> Label | None:
    """An expert label already in the shard (a dependency computed by an earlier run)."""
    png = item.members.get(f"{task}.png")
    if png is None:
        return None
    data = item.members.get(f"{task}.json")
    return Label(decode_png(png), json.loads(data) if data is not None else None)


class Labeler:
    """Runs experts over work items in batches and records each expert's per-sample outcome."""

    def __init__(self, experts: Mapping[str, ExpertHandle], batch_size: int | None = None) -> None:
        self.experts = order_by_dependencies(experts)
        self.fingerprints = {task: handle.fingerprint() for task, handle in self.experts.items()}
        self.batch_sizes = {t: batch_size or h.spec.batch_size for t, h in self.experts.items()}

    @property
    def chunk_size(self) -> int:
        return max(self.batch_sizes.values())

    def label(self, items: Sequence[WorkItem], tasks: Sequence[str] | None = None) -> None:
        """Compute ``tasks`` (default: all) for the decoded items, in dependency order."""
        for task in tasks or list(self.experts):
            for item in items:
                drop_task(item, task)
            ready = [item for item in items if item.image is not None]
            for start in range(0, len(ready), self.batch_sizes[task]):
                self._run_batch(task, ready[start : start + self.batch_sizes[task]])
        for item in items:
            self._finish(item)

    def _run_batch(self, task: str, batch: list[WorkItem]) -> None:
        handle = self.experts[task]
        deps, runnable = self._dependencies(task, batch)
        if not runnable:
            return
        images = [item.image.array for item in runnable]
        try:
            labels = handle(images, deps)
        except Exception as exc:  # noqa: BLE001 - isolate the sample(s) that break the expert
            if len(runnable) == 1:
                self._record_error(task, runnable[0], exc)
                return
            logger.warning("%s failed on a batch of %d (%s); retrying one by one", task, len(runnable), exc)
            for item in runnable:
                self._run_batch(task, [item])
            return
        for item, label in zip(runnable, labels):
            self._store(task, item, label)

    def _dependencies(
        self, task: str, batch: list[WorkItem]
    ) -> tuple[dict[str, list[Label]], list[WorkItem]]:
        """Labels of required tasks for each item; items whose dependency failed are marked failed."""
        requires = self.experts[task].spec.requires
        runnable = []
        for item in batch:
            for dep in requires:  # a dependency from an earlier run is decoded once, then kept
                if dep not in item.labels and (label := stored_label(item, dep)) is not None:
                    item.labels[dep] = label
            missing = [dep for dep in requires if dep not in item.labels]
            if missing:
                self._record_error(task, item, RuntimeError(f"no {missing} label for this sample"))
            else:
                runnable.append(item)
        deps = {dep: [item.labels[dep] for item in runnable] for dep in requires}
        return deps, runnable

    def _store(self, task: str, item: WorkItem, label: Label) -> None:
        item.labels[task] = label
        for ext, data in self.experts[task].encode(label).items():
            item.members[f"{task}.{ext}"] = data
        item.meta["experts"][task] = {"status": "ok", "fingerprint": self.fingerprints[task]}

    def _record_error(self, task: str, item: WorkItem, exc: BaseException) -> None:
        logger.warning("%s failed on sample %s: %s", task, item.key, exc)
        item.meta["experts"][task] = {
            "status": "error",
            "fingerprint": self.fingerprints[task],
            "error": stable_error_text(f"{type(exc).__name__}: {exc}"),
        }

    @staticmethod
    def _finish(item: WorkItem) -> None:
        if item.image is None:
            return
        failed = any(e["status"] != "ok" for e in item.meta["experts"].values())
        item.meta["status"] = "partial" if failed else "ok"
        item.labels.clear()  # labels are encoded; free the arrays
        item.image = None


def order_by_dependencies(experts: Mapping[str, ExpertHandle]) -> dict[str, ExpertHandle]:
    """Experts in an order where every required task comes first (required tasks may be absent:
    they are then read from the existing shard)."""
    ordered: dict[str, ExpertHandle] = {}
    visiting: set[str] = set()

    def visit(task: str) -> None:
        if task in ordered or task not in experts:
            return
        if task in visiting:
            raise ValueError(f"expert dependency cycle through {task!r}")
        visiting.add(task)
        for dep in experts[task].spec.requires:
            visit(dep)
        ordered[task] = experts[task]

    for task in sorted(experts):
        visit(task)
    return ordered


def chunked(items: Iterable[Any], size: int, budget: PixelBudget | None = None) -> Iterator[list[Any]]:
    """Lists of up to ``size`` items, in order.

    With a ``budget`` (items are ``WorkItem``s), each item's decoded bytes are taken from it as the
    item is read, and a chunk also ends where the next item would take it past
    ``budget.chunk_limit`` (an item larger than that is a chunk of its own). Before waiting for room
    to read the next item, the chunk being filled is handed over: labelling it is what gives bytes
    back. Where chunks end never changes what is written, only how much is held at once.
    """
    stream = iter(items)
    chunk: list[Any] = []
    chunk_bytes = 0
    while True:
        if budget is not None and not budget.has_room():
            if chunk:
                yield chunk
                chunk, chunk_bytes = [], 0
            if not budget.wait_for_room():
                return  # the consumer has stopped: decode nothing more
        item = next(stream, _END)
        if item is _END:
            break
        nbytes = 0
        if budget is not None:
            nbytes = item.pixel_bytes
            budget.take(nbytes)
            if chunk and chunk_bytes + nbytes > budget.chunk_limit:
                yield chunk
                chunk, chunk_bytes = [], 0
        chunk.append(item)
        chunk_bytes += nbytes
        if len(chunk) >= size or (budget is not None and chunk_bytes >= budget.chunk_limit):
            yield chunk
            chunk, chunk_bytes = [], 0
    if chunk:
        yield chunk


_END = object()
