"""UTC timestamps for records that people read (never inside shards, which must be reproducible)."""

from __future__ import annotations

import datetime


def utc_now() -> str:
    """Now, in UTC, as ISO 8601 to the second: ``2026-12-01T12:00:00+00:00``."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
