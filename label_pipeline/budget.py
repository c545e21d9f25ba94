"""A budget in bytes for decoded images in flight within one shard (``decode.max_bytes_in_flight``).

Decoded pixels are held from the moment the read-ahead thread decodes an image until the labeller
has labelled the chunk holding it. Counting chunks in samples does not bound that memory: sixteen
60-MP images are 2.9 GB of pixels in one chunk. The budget counts bytes instead and is shared by
the two threads: the reader takes an image's bytes when it decodes it, the labeller gives a chunk's
bytes back once the chunk is labelled (its arrays are freed then).
"""

from __future__ import annotations

import threading


class PixelBudget:
    """Bytes of decoded pixels held between decoding and labelling, for one shard.

    The reader decodes the next image only while nothing is held or the bytes held plus the largest
    image seen so far in the shard fit in ``limit``. Images in a shard are usually alike, so the
    pixels held stay within the limit; an image's size is known only once it is decoded, so an image
    larger than every one before it can overshoot by the difference. An image larger than the whole
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

    def has_room(self) -> bool:
        with self._changed:
            return self._has_room()

    def wait_for_room(self) -> bool:
        """Block until the next image may be decoded; False once the budget is closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self._has_room())
            return not self._closed

    def take(self, nbytes: int) -> None:
        with self._changed:
            self._held += nbytes
            self._largest = max(self._largest, nbytes)

    def release(self, nbytes: int) -> None:
        with self._changed:
            self._held -= nbytes
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _has_room(self) -> bool:
        return self._held == 0 or self._held + self._largest <= self.limit
