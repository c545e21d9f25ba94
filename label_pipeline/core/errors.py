"""The two expected failures every layer can raise; the CLI turns each into one line and exit 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A manifest, command-line or expert option is wrong; the message names the bad key."""


class ExpertUnavailable(RuntimeError):
    """A requested expert cannot run here (unknown, a package or its weights missing or unreadable);
    the message says what to do about it."""
