"""Writing to the terminal's two streams safely: stderr lines that never raise, and a stdout that can be
silenced after the reader went away (`dspark run ... | head`)."""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """One status line on stderr, prefixed like every dspark message."""
    try:
        sys.stderr.write(f"dspark: {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass


def quiet_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush does not raise a
    second BrokenPipeError at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
