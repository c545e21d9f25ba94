"""Run progress: a bar on a terminal, periodic log lines anywhere else.

Progress moves per chunk, not per shard: between shards it is estimated from the mean size of the
shards finished so far (or a hint, for sources cut into shards of a known size), which also gives
the ETA. On a terminal it is a tqdm bar on stderr; when stderr is not a terminal (a log file, a
batch job, CI) ``\\r`` bars would only garble the log, so a plain line is logged every
``log_interval`` seconds instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO

from tqdm import tqdm

logger = logging.getLogger(__name__)
LOG_INTERVAL_S = 30.0


class Progress:
    """Shards done (fractional within a shard), samples/s, per-expert images/s and the ETA."""

    def __init__(
        self,
        total_shards: int,
        enabled: bool = True,
        *,
        samples_per_shard: int | None = None,
        log_interval: float = LOG_INTERVAL_S,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total_shards
        self.hint = samples_per_shard
        self.clock, self.log_interval = clock, log_interval
        self.started = self.last_log = clock()
        self.shards = 0
        self.samples = 0  # committed in finished shards
        self.sized_shards, self.sized_samples = 0, 0  # shards that tell the mean shard size
        self.in_shard = 0  # images labelled in shards not finished yet
        self.running = 1  # shards being labelled at once
        self.experts: dict[str, tuple[float, float]] = {}  # task → (images/s while busy, busy share)
        stream = stream or sys.stderr
        active = enabled and total_shards > 0
        self.logging = active and not _is_tty(stream)
        self.bar = tqdm(
            total=total_shards,
            unit="shard",
            file=stream,
            disable=not active or self.logging,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} shards [{elapsed}{postfix}]",
        )

    # -- what the runner reports -----------------------------------------------------------------
    def chunk_done(self, images: int, experts: Mapping[str, tuple[float, float]] | None = None) -> None:
        """A chunk of ``images`` decoded images was labelled (its shard is not committed yet).

        ``experts`` maps a task to (its images/s while computing, the share of the run it computed).
        """
        self.in_shard += images
        if experts is not None:
            self.experts = dict(experts)
        self._refresh()

    def in_flight(self, images: int, shards: int) -> None:
        """``images`` labelled so far in the ``shards`` still running (runners with parallel shards)."""
        self.in_shard, self.running = images, max(shards, 1)
        self._refresh()

    def shard_done(self, samples: int) -> None:
        """A shard committed ``samples`` samples (0 for a shard that failed)."""
        self.shards += 1
        self.samples += samples
        if samples > 0:  # a failed or empty shard says nothing about the size of the others
            self.sized_shards += 1
            self.sized_samples += samples
        self.in_shard = 0
        self._refresh()

    def close(self) -> None:
        if self.logging:
            logger.info("%s", self.line(final=True))
        self.bar.close()

    # -- what is shown ---------------------------------------------------------------------------
    @property
    def samples_per_shard(self) -> float | None:
        if self.sized_shards:
            return self.sized_samples / self.sized_shards
        return float(self.hint) if self.hint else None

    @property
    def done_samples(self) -> int:
        return self.samples + self.in_shard

    def fraction_done(self) -> float:
        """Shards done, counting the shards in progress by their labelled images (never whole ones)."""
        per_shard = self.samples_per_shard
        partial = min(self.in_shard / per_shard, 0.99 * self.running) if per_shard and self.in_shard else 0.0
        return min(self.shards + partial, float(self.total))

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.done_samples / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the mean rate so far; None until the rate and the shard size are known."""
        per_shard, rate = self.samples_per_shard, self.rate()
        if self.shards >= self.total:
            return 0.0
        if not per_shard or rate <= 0:
            return None
        left = max(self.total * per_shard - self.done_samples, 0.0)
        return left / rate

    def postfix(self, eta: bool = True) -> str:
        parts = [f"{self.done_samples} samples", f"{self.rate():.1f}/s"]
        for task, (rate, busy) in sorted(self.experts.items()):
            parts.append(f"{task} {rate:.1f} img/s busy {busy:.0%}")
        if eta:
            parts.append(f"ETA {format_duration(self.eta_s())}")
        return ", ".join(parts)

    def line(self, final: bool = False) -> str:
        if final:
            took = format_duration(self.clock() - self.started)
            return f"shards {self.shards}/{self.total}: {self.postfix(eta=False)} in {took}"
        return f"shards {self.fraction_done():.1f}/{self.total}: {self.postfix()}"

    def _refresh(self) -> None:
        if self.logging:
            now = self.clock()
            if now - self.last_log >= self.log_interval:
                self.last_log = now
                logger.info("%s", self.line())
            return
        if self.bar.disable:
            return
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(self.fraction_done() - self.bar.n)  # tqdm redraws at most every 0.1 s


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without a terminal
        return False


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
