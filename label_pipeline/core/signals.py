"""SIGTERM handled like Ctrl-C: a scheduler stopping a container gets a clean, resumable output.

The handler raises ``Terminated`` (a ``KeyboardInterrupt``), so every ``finally`` and every
``except KeyboardInterrupt`` that already makes Ctrl-C safe (temp files removed, lock released,
nothing half-committed) runs for SIGTERM too. Only process entry points install it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


# Signals are process-wide: so is the record of one. Some libraries (Ray's blocking calls) turn the
# exception raised by the handler into a plain KeyboardInterrupt; this flag keeps the real cause.
_received: list[int] = []


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Terminated(f"received signal {signum}")


def sigterm_received() -> bool:
    """True once SIGTERM arrived within the current ``sigterm_as_interrupt`` block."""
    return bool(_received)


def install_sigterm_handler() -> None:
    """(Re-)install the handler; libraries such as Ray replace it with their own on start-up."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises ``Terminated``; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _received.clear()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
