"""Checks of what a caller of the public API passes, done once at its edge (api.load, Pair's methods), so that
every wrong type or value is a one-line UsageError (or PromptError for text) and never a TypeError from deep
inside, nor a silently truncated float."""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import Sequence

from .errors import PromptError, UsageError


def integer(name: str, value, *, low: int | None = None, optional: bool = False) -> int | None:
    """An int (not a bool, not 2.5, not "8"), at least `low`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise UsageError(f"{name} must be an integer{' or None' if optional else ''}, got {value!r:.40}")
    value = int(value)
    if low is not None and value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")
    return value


def number(name: str, value) -> float:
    """A finite real number (an int is fine); ranges are SamplingParams' to check."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise UsageError(f"{name} must be a finite number, got {value!r:.40}")
    return float(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {value!r:.40}")
    return value


def text(name: str, value, *, optional: bool = False) -> str | None:
    """A str that is valid Unicode (a lone surrogate, "a\\ud800b", cannot be encoded, so no model can read it)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string{' or None' if optional else ''}, got {type(value).__name__}")
    return valid_unicode(name, value)


def valid_unicode(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{name} is not valid text: a lone surrogate {value[e.start]!r} at character {e.start}") from None
    return value


def model_ref(name: str, value, what: str = "a path or a model reference string") -> str | None:
    """A model reference: a str or a path (pathlib.Path and any os.PathLike), or None."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        if isinstance(value, bytes):
            value = os.fsdecode(value)
    if not isinstance(value, str):
        raise UsageError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def path(name: str, value) -> str | None:
    """A file path: a str or any os.PathLike, or None."""
    return model_ref(name, value, what="a path")


def stop_strings(value) -> tuple[str, ...]:
    """A stop string or a sequence of them (a lone string is one stop string, not its characters)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"stop must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise UsageError(f"stop[{i}] must be a string, got {s!r:.40}")
        out.append(valid_unicode(f"stop[{i}]", s))
    return tuple(s for s in out if s)


def messages(value: Sequence) -> list[dict]:
    """Chat messages: {'role': 'system' | 'user' | 'assistant', 'content': str}, at least one."""
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"the prompt must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise UsageError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": valid_unicode(f"message {i}'s content", m["content"])})
    if not out:
        raise UsageError("no messages")
    return out
