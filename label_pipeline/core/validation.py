"""Typed values for manifests and expert options: checks with a YAML user's words and a did-you-mean."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

from label_pipeline.core.errors import ConfigError

# -- typed values ------------------------------------------------------------------------------------
_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}


def describe_type(hint: Any) -> str:
    """A YAML user's name for a type: ``bool`` → ``true/false``, ``str | None`` → ``a string or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a) for a in present)
        return f"{text} or null" if len(present) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence):
        item = _PLURALS.get(args[0]) if args else None
        return f"a list of {item}" if item else "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    return "anything" if hint is Any else getattr(hint, "__name__", str(hint))


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def type_mismatch(value: Any, hint: Any, where: str) -> str | None:
    """None when ``value`` has type ``hint``, else a one-line error naming the innermost bad key.

    YAML types only: an int is a number but a bool is neither; a list is what YAML gives for a tuple.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        ok = any(type_mismatch(value, a, where) is None for a in args)
    elif origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
    elif origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            ok = False
        else:
            item = args[0] if args else Any
            errors = (type_mismatch(v, item, f"{where}[{i}]") for i, v in enumerate(value))
            return next((e for e in errors if e is not None), None)
    elif origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            ok = False
        else:
            item = args[1] if len(args) == 2 else Any
            errors = (type_mismatch(v, item, f"{where}.{k}") for k, v in value.items())
            return next((e for e in errors if e is not None), None)
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is Any:
        ok = True
    elif hint is type(None) or hint is None:
        ok = value is None
    else:
        ok = isinstance(value, hint)
    return None if ok else f"{where}: expected {describe_type(hint)}, got {short_repr(value)}"


def check_type(value: Any, hint: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming ``where`` unless ``value`` has type ``hint``."""
    error = type_mismatch(value, hint, where)
    if error is not None:
        raise ConfigError(error)


def did_you_mean(word: str, choices: Collection[str]) -> str:
    """``"; did you mean 'low'?"`` for a near miss among ``choices``, else an empty string.

    A near miss is a close spelling (difflib) or, failing that, the one choice ``word`` begins
    (``blur`` → ``blur_sigma``).
    """
    word = str(word)
    close = difflib.get_close_matches(word, list(choices), n=1)
    if not close and word:
        extended = [c for c in choices if c.startswith(word)]
        close = extended if len(extended) == 1 else []
    return f"; did you mean {close[0]!r}?" if close else ""


# -- expert options ----------------------------------------------------------------------------------
