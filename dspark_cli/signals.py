"""SIGTERM and SIGHUP (a closed terminal, `kill`, a supervisor stopping dspark) end a command the way Ctrl-C
does, so what was generated is kept (printed, in the transcript) and caches are left consistent, with the
signal's own exit status (128 + its number) instead of dying mid-write."""

from __future__ import annotations

import signal

received: int | None = None  # the SIGTERM/SIGHUP that is ending this process, if one did


def install() -> None:
    def stop(signum, frame):
        global received
        received = signum
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), stop)
            except (ValueError, OSError):  # not the main thread, or not allowed here
                pass


def exit_code() -> int:
    """The exit status for an interrupted command: 130 for Ctrl-C, 128 + n for signal n."""
    return 128 + received if received is not None else 130
