"""A progress bar over shards that also shows samples/s and the ETA (stderr, via tqdm)."""

from __future__ import annotations

import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_shards: int, enabled: bool = True) -> None:
        self.bar = tqdm(
            total=total_shards, unit="shard", disable=not enabled or total_shards == 0, dynamic_ncols=True
        )
        self.samples = 0
        self.started = time.monotonic()

    def shard_done(self, samples: int) -> None:
        self.samples += samples
        elapsed = max(time.monotonic() - self.started, 1e-6)
        self.bar.set_postfix(samples=self.samples, rate=f"{self.samples / elapsed:.1f}/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
