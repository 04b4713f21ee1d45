"""Reading a child's output in two parts without losing bytes in between."""

from __future__ import annotations

import os


def read_first(pipe, n: int) -> bytes:
    """The first n bytes from a child's stdout (fewer at its end), read from the file descriptor itself.
    `pipe.read(n)` would read ahead into the pipe object's buffer, and Popen.communicate() reads the descriptor
    directly: the bytes read ahead would be lost between the two parts (a character cut in half, once)."""
    got = b""
    while len(got) < n:
        chunk = os.read(pipe.fileno(), n - len(got))
        if not chunk:
            break
        got += chunk
    return got
