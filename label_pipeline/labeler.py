"""Turning samples into output samples: decode once, fan out to every expert, encode members.

This module owns the per-sample logic and the labelling loop shared by every runner. It knows
nothing about where experts run: it submits batches to an ``ExpertExecutor`` (``LocalExecutor``:
experts in this process; the Ray runner's executor: expert actors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Generator, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from expert_zoo.base import ExpertSpec, Label
from label_pipeline.budget import PixelBudget
from label_pipeline.config import DecodeConfig
from label_pipeline.core.decode import DecodedImage, DecodeError, decode_image
from label_pipeline.core.format import IMAGE_EXTENSIONS, decode_png, encode_json
from label_pipeline.core.tario import Member
from label_pipeline.sources.base import Sample

logger = logging.getLogger(__name__)
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


class ExpertHandle(Protocol):
    """An expert in this process, as ``LocalExecutor`` calls it (``expert_zoo.base.Expert``)."""

    spec: ExpertSpec

    def __call__(self, images: Sequence[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]: ...

    def encode(self, label: Label) -> dict[str, bytes]: ...

    def fingerprint(self) -> str: ...


@dataclass
class WorkItem:
    """A sample on its way to the output: its members (suffix → bytes) and its json metadata.

    ``encodes`` are its labels still being encoded in a pool (task → future members), ``pending_bytes``
    the bytes of those labels' arrays; ``to_members`` waits for them.
    """

    key: str
    members: dict[str, bytes]
    meta: dict[str, Any]
    image: DecodedImage | None = None
    labels: dict[str, Label] = field(default_factory=dict)
    encodes: list[tuple[str, Future[dict[str, bytes]]]] = field(default_factory=list)
    pending_bytes: int = 0

    @property
    def pixel_bytes(self) -> int:
        """Bytes of the decoded image this item holds (0 once labelled, or when it failed to decode)."""
        return self.image.array.nbytes if self.image is not None else 0

    def add_label_members(self, task: str, encoded: Mapping[str, bytes]) -> None:
        for ext, data in encoded.items():
            self.members[f"{task}.{ext}"] = data

    def to_members(self) -> list[Member]:
        """The sample's tar members, once every pending label encoding has finished."""
        for task, encoded in self.encodes:
            self.add_label_members(task, encoded.result())
        self.encodes.clear()
        self.pending_bytes = 0
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


class ExpertExecutor(Protocol):
    """Where expert calls run: in this process (``LocalExecutor``) or on Ray actors.

    The labeler decides *what* runs (batches, dependency order, retries); an executor only runs one
    batch of one expert and encodes its labels. ``batch_sizes`` holds each expert's forward batch
    (docs/ARCHITECTURE.md, "Batch sizes").
    """

    specs: dict[str, ExpertSpec]
    fingerprints: dict[str, str]
    batch_sizes: dict[str, int]

    def chunk(self, images: Sequence[np.ndarray]) -> AbstractContextManager[None]:
        """Scope of one chunk: every batch submitted inside it takes its images from ``images``."""
        ...

    def submit(
        self, task: str, images: list[np.ndarray], deps: dict[str, list[Label]]
    ) -> Future[list[Label]]: ...

    def encode(self, task: str, label: Label) -> dict[str, bytes]: ...


class LocalExecutor:
    """Experts in this process, called one batch at a time as they are submitted."""

    def __init__(self, experts: Mapping[str, ExpertHandle]) -> None:
        self.experts = dict(experts)
        self.specs = {task: expert.spec for task, expert in self.experts.items()}
        self.fingerprints = {task: expert.fingerprint() for task, expert in self.experts.items()}
        # An Expert's batch_size is its option, else its default for its device; plain handles have a spec.
        self.batch_sizes = {
            task: int(getattr(expert, "batch_size", None) or expert.spec.batch_size)
            for task, expert in self.experts.items()
        }

    def chunk(self, images: Sequence[np.ndarray]) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def submit(
        self, task: str, images: list[np.ndarray], deps: dict[str, list[Label]]
    ) -> Future[list[Label]]:
        future: Future[list[Label]] = Future()
        try:
            future.set_result(self.experts[task](images, deps))
        except Exception as exc:  # noqa: BLE001 - handed to the labeler, which isolates the sample(s)
            # Without its traceback: the frames of a failed forward would keep its tensors alive
            # while the labeler retries the batch in smaller parts.
            future.set_exception(exc.with_traceback(None))
        return future

    def encode(self, task: str, label: Label) -> dict[str, bytes]:
        return self.experts[task].encode(label)


@dataclass
class _Call:
    task: str
    items: list[WorkItem]
    result: Future[list[Label]]
    encoder: Executor | None  # where its labels are encoded (None: at once, in this thread)


class Labeler:
    """Runs experts over work items and records each expert's per-sample outcome.

    The one labelling loop of every runner: each expert gets the decoded chunk in its own forward
    batch, in dependency order (independent experts' batches are all submitted before any result is
    awaited, so an executor may run them at once); a batch that raises is retried one sample at a time
    (only the failing sample records the error), and one that runs out of memory in halves, with
    that expert's later batches halved too, down to 1.

    Labels are encoded as they arrive: in this thread, or, given an ``encoder`` pool, in the pool
    (``WorkItem.to_members`` collects them, in sample order), so encoding overlaps the next batches.
    """

    def __init__(self, experts: ExpertExecutor | Mapping[str, ExpertHandle]) -> None:
        self.executor = LocalExecutor(experts) if isinstance(experts, Mapping) else experts
        self.specs = {task: self.executor.specs[task] for task in order_by_dependencies(self.executor.specs)}
        self.fingerprints = {task: self.executor.fingerprints[task] for task in self.specs}
        self.batch_sizes = {task: self.executor.batch_sizes[task] for task in self.specs}

    @property
    def chunk_size(self) -> int:
        """Images decoded and labelled together: enough for the largest forward batch."""
        return max(self.batch_sizes.values())

    def label(
        self, items: Sequence[WorkItem], tasks: Sequence[str] | None = None, encoder: Executor | None = None
    ) -> None:
        """Compute ``tasks`` (default: all) for the decoded items, in dependency order; labels are
        encoded in ``encoder`` when given (see ``WorkItem.encodes``)."""
        wanted = [task for task in self.specs if tasks is None or task in tasks]
        with self.executor.chunk([item.image.array for item in items if item.image is not None]):
            for level in dependency_levels(wanted, self.specs):
                for task in level:
                    for item in items:
                        drop_task(item, task)
                ready = [item for item in items if item.image is not None]
                calls = [
                    self._submit(task, part, encoder)
                    for task in level
                    for part in _parts(ready, self.batch_sizes[task])
                ]
                for call in calls:
                    if call is not None:
                        self._settle(call)
        for item in items:
            self._finish(item)

    def _submit(self, task: str, batch: list[WorkItem], encoder: Executor | None) -> _Call | None:
        deps, runnable = self._dependencies(task, batch)
        if not runnable:
            return None
        images = [item.image.array for item in runnable if item.image is not None]
        return _Call(task, runnable, self.executor.submit(task, images, deps), encoder)

    def _settle(self, call: _Call) -> None:
        try:
            labels = call.result.result()
        except Exception as exc:  # noqa: BLE001 - isolate the sample(s) that break the expert
            self._retry(call, exc)
            return
        for item, label in zip(call.items, labels):
            self._store(call.task, item, label, call.encoder)

    def _retry(self, call: _Call, exc: Exception) -> None:
        if len(call.items) == 1:
            self._record_error(call.task, call.items[0], exc)
            return
        for part in _parts(call.items, self._retry_size(call.task, len(call.items), exc)):
            retry = self._submit(call.task, part, call.encoder)
            if retry is not None:
                self._settle(retry)

    def _retry_size(self, task: str, size: int, exc: Exception) -> int:
        """How to split a failed batch: in halves after out of memory (later batches too), else 1 by 1."""
        if not is_out_of_memory(exc):
            logger.warning("%s failed on a batch of %d (%s); retrying one by one", task, size, exc)
            return 1
        half = (size + 1) // 2
        self.batch_sizes[task] = min(self.batch_sizes[task], half)
        logger.warning("%s: out of memory on a batch of %d; batches of %d from now on", task, size, half)
        return half

    def _dependencies(
        self, task: str, batch: list[WorkItem]
    ) -> tuple[dict[str, list[Label]], list[WorkItem]]:
        """Labels of required tasks for each item; items whose dependency failed are marked failed."""
        requires = self.specs[task].requires
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

    def _store(self, task: str, item: WorkItem, label: Label, encoder: Executor | None) -> None:
        item.labels[task] = label
        if encoder is None:
            item.add_label_members(task, self.executor.encode(task, label))
        else:  # the future keeps the label's arrays alive until they are encoded
            item.encodes.append((task, encoder.submit(self.executor.encode, task, label)))
            item.pending_bytes += label_nbytes(label)
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


def label_nbytes(label: Label) -> int:
    """Bytes of a label's arrays (its map and, for array members, its array)."""
    return sum(array.nbytes for array in (label.map, label.array) if array is not None)


def _parts(items: list[WorkItem], size: int) -> list[list[WorkItem]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator (or host) out-of-memory error: torch's ``OutOfMemoryError`` or its message."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def order_by_dependencies(specs: Mapping[str, ExpertSpec]) -> list[str]:
    """Tasks in an order where every required task comes first (required tasks may be absent:
    they are then read from the existing shard)."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(task: str) -> None:
        if task in ordered or task not in specs:
            return
        if task in visiting:
            raise ValueError(f"expert dependency cycle through {task!r}")
        visiting.add(task)
        for dep in specs[task].requires:
            visit(dep)
        ordered.append(task)

    for task in sorted(specs):
        visit(task)
    return ordered


def dependency_levels(tasks: Sequence[str], specs: Mapping[str, ExpertSpec]) -> list[list[str]]:
    """``tasks`` grouped by dependency depth (within ``tasks``), keeping their order inside a level."""
    wanted = set(tasks)
    depth: dict[str, int] = {}

    def level_of(task: str) -> int:
        if task not in depth:
            requires = [dep for dep in specs[task].requires if dep in wanted]
            depth[task] = 1 + max((level_of(dep) for dep in requires), default=-1)
        return depth[task]

    levels: dict[int, list[str]] = {}
    for task in tasks:
        levels.setdefault(level_of(task), []).append(task)
    return [levels[key] for key in sorted(levels)]


def chunked(
    items: Iterable[Any], size: int, budget: PixelBudget | None = None
) -> Generator[list[Any], None, None]:
    """Lists of up to ``size`` items, in order.

    With a ``budget`` (items are ``WorkItem``s), each item's decoded bytes are taken from it as the
    item is read, and a chunk also ends where the next item would take it past
    ``budget.chunk_limit`` (an item larger than that is a chunk of its own). Before waiting for room
    to read the next item, the chunk being filled is handed over: labelling it is what gives bytes
    back. Where chunks end never changes what is written, only how much is held at once.
    """
    stream = iter(items)
    chunk: list[Any] = []
    chunk_bytes = 0  # taken from the budget for the items of ``chunk``, not handed over yet
    try:
        while True:
            if budget is not None and not budget.has_room():
                if chunk:
                    full, chunk, chunk_bytes = chunk, [], 0
                    yield full
                if not budget.wait_for_room():
                    return  # the consumer has stopped: decode nothing more
            try:
                item = next(stream)
            except StopIteration:
                break
            nbytes = 0
            if budget is not None:
                nbytes = item.pixel_bytes
                budget.take(nbytes)
            if budget is not None and chunk and chunk_bytes + nbytes > budget.chunk_limit:
                full, chunk, chunk_bytes = chunk, [item], nbytes
                yield full
            else:
                chunk.append(item)
                chunk_bytes += nbytes
            if len(chunk) >= size or (budget is not None and chunk_bytes >= budget.chunk_limit):
                full, chunk, chunk_bytes = chunk, [], 0
                yield full
        if chunk:
            full, chunk, chunk_bytes = chunk, [], 0
            yield full
    except BaseException:  # reading failed (or stopped): what was not handed over is given back
        if budget is not None:
            budget.release(chunk_bytes)
        raise
