"""A budget in bytes for decoded images in flight within one shard (``decode.max_bytes_in_flight``).

Decoded pixels are held from the moment an image is decoded until the labeller has labelled the
chunk holding it; the label maps then wait for their PNG encoding. Counting chunks in samples does
not bound that memory: sixteen 60-MP images are 2.9 GB of pixels in one chunk. The budget counts
bytes instead and is shared by the threads of a shard: the reader takes an image's bytes when the
image is handed to it decoded (the decoders start an image only while ``has_room`` counts it), the
labeller gives a chunk's pixel bytes back once the chunk is labelled and takes its label maps' bytes,
and the writer gives those back once the labels are encoded.
"""

from __future__ import annotations

import threading

PARALLEL_SHARE = 8  # images decoded at once take at most 1/8 of the budget together


class PixelBudget:
    """Bytes of decoded pixels (and label maps awaiting encoding) held at once, for one shard.

    The next image is decoded only while nothing is held or the bytes held plus the largest image
    seen so far in the shard fit in ``limit``; with several decoders, every image being decoded
    counts as one more largest image. Images in a shard are usually alike, so the pixels held stay
    within the limit; an image's size is known only once it is decoded, so an image larger than
    every one before it can overshoot by the difference. An image larger than the whole
    limit still goes through (in a chunk of its own, see ``labeler.chunked``); once one has been seen
    the reader decodes only while nothing is held. ``close`` wakes a waiting reader for good (the
    labeller has stopped).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget must be >= 1, got {limit}")
        self.limit = limit
        self._held = 0
        self._largest = 0
        self._closed = False
        self._changed = threading.Condition()

    @property
    def chunk_limit(self) -> int:
        """Bytes at which a chunk closes: half the budget, so one chunk can be decoded while the
        previous one is labelled."""
        return max(self.limit // 2, 1)

    @property
    def held(self) -> int:
        with self._changed:
            return self._held

    def has_room(self, pending: int = 0) -> bool:
        """Whether one more image may be decoded while ``pending`` others are being decoded (or are
        decoded and not yet taken); each pending image is counted as the largest seen so far."""
        with self._changed:
            return self._has_room(pending)

    def wait_for_room(self) -> bool:
        """Block until the next image may be decoded; False once the budget is closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self._has_room())
            return not self._closed

    def take(self, nbytes: int) -> None:
        with self._changed:
            self._held += nbytes
            self._largest = max(self._largest, nbytes)

    def hold(self, nbytes: int) -> None:
        """Hold bytes that are not one decoded image (a chunk's label maps awaiting encoding): they
        count against the limit but say nothing about the size of the next image."""
        with self._changed:
            self._held += nbytes

    def release(self, nbytes: int) -> None:
        with self._changed:
            self._held -= nbytes
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _has_room(self, pending: int = 0) -> bool:
        if self._held == 0 and pending == 0:
            return True
        # Decodes run side by side only while together they are a small part of the budget: a
        # decoder briefly holds about twice its image (PIL's buffer and the array), which the budget
        # does not count; and while no image size is known yet, one at a time.
        if pending and (not self._largest or (pending + 1) * self._largest > self.limit // PARALLEL_SHARE):
            return False
        return self._held + (pending + 1) * self._largest <= self.limit
