"""The resumable stream of batches over a dataset's label shards, split by rank and loader worker.

Each stream (one per rank × worker) reads its shards in a fresh order every pass ("resampled epochs",
infinite when training) through a shuffle buffer. Everything random is a pure function of
``(seed, stream, position)``, so a stream can be restarted at any batch: that is the loader position a
checkpoint records (:class:`BatchStream`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prismer_trainer.batches import collate
from prismer_trainer.embeddings import LabelEmbeddings
from prismer_trainer.samples import Example, SampleDecoder
from prismer_trainer.shards import read_shard


@dataclass
class _Ref:
    """A sample of a stream: where it is (pass, shard index in that pass, shard url, ordinal among the
    shard's usable samples) and its members once read (``None`` while fast-forwarding)."""

    epoch: int
    shard: int
    url: str
    ordinal: int
    key: str
    members: dict[str, bytes] | None


class BatchStream(IterableDataset):
    """Batches from label shards, split by rank and worker; resumable at any batch.

    Training (``train=True``): each stream (one per rank × worker) makes passes ("epochs") forever; pass
    ``e`` shuffles the shard list with ``(seed, e)`` and takes every ``streams``-th shard (or one shard, drawn
    round-robin, when there are fewer shards than streams). Samples go through a shuffle buffer. The
    augmentation of the ``n``-th sample of a stream uses ``default_rng([seed, stream, n])``. The buffer's
    choices depend only on sample counts, so restarting at batch ``k`` replays the stream on names only
    (no image bytes read) and then reads just the buffered samples: exact and cheap.

    Evaluation: one in-order pass over this rank/worker's share of the shards, last batch partial.

    Batches are collated in the worker; with ``DataLoader(batch_size=None)`` the loader takes its batches
    from the workers round-robin, which is how :meth:`_stream` maps a loader position to a stream. (The
    position counts samples: it stays exact unless an image that the label pipeline decoded fails to
    decode here.)
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: SampleDecoder,
        embeddings: LabelEmbeddings,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
        keys: set[str] | None = None,
        collate_fn: Callable[[Sequence[Example], LabelEmbeddings, int], Any] | None = None,
    ) -> None:
        super().__init__()
        self.collate_fn = collate_fn or collate
        if not shards:
            raise ValueError("no shards")
        self.shards, self.decoder, self.embeddings = list(shards), decoder, embeddings
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.start_batch = start_batch
        self.keys = keys

    # -- stream layout -------------------------------------------------------------------------------
    def _stream(self) -> tuple[int, int, int]:
        """(stream id, number of streams, batches this stream already gave before ``start_batch``).

        The DataLoader takes batch ``j`` of this run from worker ``j % W``; that is global batch
        ``start_batch + j``, which the uninterrupted run took from stream ``(start_batch + j) % W``. So
        worker ``w`` plays stream ``(start_batch + w) % W`` of its rank."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        local = (self.start_batch + worker) % workers
        skip = len(range(local, self.start_batch, workers))
        return self.rank * workers + local, self.world_size * workers, skip

    def epoch_shards(self, epoch: int, stream: int, streams: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return [order[i % len(order)] for i in range(stream, max(len(order), streams), streams)]

    def _wants(self, key: str, members: Mapping[str, Any]) -> bool:
        return (self.keys is None or key in self.keys) and self.decoder.wants(key, members)

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream, streams, skip_batches = self._stream()
        if self.train:
            examples = self._train_examples(stream, streams, skip_batches * self.batch_size)
        else:
            examples = self._eval_examples(stream, streams)
        pending: list[Example] = []
        for example in examples:
            pending.append(example)
            if len(pending) == self.batch_size:
                yield self.collate_fn(pending, self.embeddings, self.decoder.tokenizer.pad_id)
                pending = []
        if pending:  # evaluation's last, partial batch (training never ends)
            yield self.collate_fn(pending, self.embeddings, self.decoder.tokenizer.pad_id)

    def _train_examples(self, stream: int, streams: int, skip: int) -> Iterator[Example]:
        for ordinal, ref in self._shuffled(stream, streams, skip):
            rng = np.random.default_rng([self.seed, stream, ordinal])
            yield from self.decoder(ref.key, ref.members or {}, rng)

    def _eval_examples(self, stream: int, streams: int) -> Iterator[Example]:
        """One in-order pass over this stream's shards, resize only."""
        for url in self.shards[stream::streams]:
            samples = read_shard(url, self._wants, self.decoder.members_to_read)
            for ordinal, (key, members) in enumerate(samples):
                yield from self.decoder(key, members, np.random.default_rng([self.seed, ordinal]))

    def _incoming(
        self, stream: int, streams: int, start: tuple[int, int, int] = (0, 0, 0), with_data: bool = True
    ) -> Iterator[_Ref]:
        """Every usable sample of this stream's passes from ``start`` = (pass, shard index, ordinal),
        forever; names only (no bytes read) when ``with_data`` is false."""
        for epoch in range(start[0], 1 << 62):
            found = False
            shards = self.epoch_shards(epoch, stream, streams)
            for index in range(start[1] if epoch == start[0] else 0, len(shards)):
                first = start[2] if (epoch, index) == start[:2] else 0
                samples = read_shard(shards[index], self._wants, self.decoder.members_to_read, with_data)
                for ordinal, (key, members) in enumerate(samples):
                    found = True
                    if ordinal >= first:
                        yield _Ref(epoch, index, shards[index], ordinal, key, members if with_data else None)
            if not found and epoch > start[0]:
                raise RuntimeError(f"stream {stream}: its shards hold no usable samples ({shards[:3]}…)")

    def _shuffled(self, stream: int, streams: int, skip: int) -> Iterator[tuple[int, _Ref]]:
        """The shuffle buffer over :meth:`_incoming`, yielding ``(ordinal in stream, sample)`` from ``skip``
        on. The buffer's random choices depend only on counts, so the first ``skip`` samples are replayed
        on names only; then the buffered samples are read back and the stream goes on with data."""
        rng = random.Random(f"{self.seed}:buffer:{stream}")
        fast_forward = skip > 0
        incoming = self._incoming(stream, streams, with_data=not fast_forward)
        buffer: list[_Ref] = []
        produced = 0
        while (ref := next(incoming, None)) is not None:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(ref)
                continue
            j = rng.randrange(len(buffer))
            out, buffer[j] = buffer[j], ref
            if not fast_forward:
                yield produced, out
            produced += 1
            if fast_forward and produced >= skip:
                fast_forward = False
                buffer = self._materialise(buffer)
                incoming = self._incoming(stream, streams, (ref.epoch, ref.shard, ref.ordinal + 1))

    def _materialise(self, buffer: list[_Ref]) -> list[_Ref]:
        """Read the members of buffered name-only samples, one pass per shard involved."""
        needed: dict[str, dict[int, list[int]]] = {}
        for position, ref in enumerate(buffer):
            if ref.members is None:  # (a shard can be buffered from two passes: same bytes)
                needed.setdefault(ref.url, {}).setdefault(ref.ordinal, []).append(position)
        for url, wanted in needed.items():
            samples = read_shard(url, self._wants, self.decoder.members_to_read)
            for ordinal, (_, members) in enumerate(samples):
                for position in wanted.get(ordinal, []):
                    old = buffer[position]
                    buffer[position] = _Ref(old.epoch, old.shard, url, ordinal, old.key, members)
        return buffer


def make_loader(
    stream: BatchStream, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2
) -> DataLoader:
    """A DataLoader over a :class:`BatchStream` (batches are collated in the workers)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
