"""The process's standard streams, made safe once, and the only writers the commands use.

Whatever state the streams are in, dspark ends in one clear line and a documented exit code, never a traceback:
- a stream closed at start (`>&-`, `2>&-`, `<&-`): its descriptor is pointed at /dev/null first, so no file
  llama.cpp opens later can take descriptor 1 or 2 (its log would then be written into a model file);
  `cli.main` refuses a closed stdout (nothing could be written) and `chat` a closed stdin;
- a reader that went away (`| head`): BrokenPipeError reaches `cli.main`, which exits 0 quietly;
- a full disk or an I/O error on stdout: OutputError (exit 8);
- an encoding that cannot show the text (PYTHONIOENCODING=latin-1): those characters are written as `?`,
  with one warning on stderr; JSON is written with \\u escapes instead, so it stays lossless;
- stderr is best effort: a status line that cannot be written is dropped, the answer is not.
"""

from __future__ import annotations

import codecs
import json
import os
import sys

from .errors import OutputError

closed_at_start: set[str] = set()  # "stdin", "stdout", "stderr": descriptors that were closed when dspark started
_STREAMS = ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w"))
_warned_encoding = False


def prepare_streams() -> None:
    """Called once, first thing, by the console script."""
    for fd, name, mode in _STREAMS:
        try:
            os.fstat(fd)
        except OSError:
            closed_at_start.add(name)
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            if getattr(sys, name) is None:  # Python leaves None for a descriptor closed at start
                setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False))
    try:
        # Text typed or piped in that is not valid UTF-8 becomes U+FFFD instead of an exception.
        sys.stdin.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass


def say(message: str) -> None:
    """One status line on stderr, prefixed like every dspark message. Never raises."""
    err_text(f"dspark: {message}\n")


def err_text(text: str) -> None:
    """Text on stderr (a block of lines, an input prompt). Never raises: stderr is for status, and losing
    a status line must not cost the answer on stdout."""
    status_stream.write(text)
    status_stream.flush()


def quiet_stdout() -> None:
    """After a closed pipe or a failed write, point stdout at /dev/null so the interpreter's final flush
    does not raise a second error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _encoding(stream) -> str:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name
    except LookupError:
        return "utf-8"


def _is_unicode(encoding: str) -> bool:
    return encoding.startswith(("utf-8", "utf-16", "utf-32"))


class SafeOutput:
    """stdout for dspark's output: every write and flush either works, or raises BrokenPipeError (the reader
    left: a quiet exit) or OutputError (anything else). Rich consoles write through it too."""

    @property
    def _raw(self):
        return sys.stdout

    def write(self, text: str) -> int:
        try:
            try:
                return self._raw.write(text)
            except UnicodeEncodeError:
                encoding = _encoding(self._raw)
                _warn_encoding(encoding)
                return self._raw.write(text.encode(encoding, "replace").decode(encoding))
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:
            raise _output_error(e) from None

    def flush(self) -> None:
        try:
            self._raw.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:
            raise _output_error(e) from None

    @property
    def encoding(self) -> str:
        return _encoding(self._raw)

    def isatty(self) -> bool:
        try:
            return self._raw.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._raw.fileno()

    def __getattr__(self, name):  # anything else a caller (Rich) asks of a text stream
        return getattr(self._raw, name)


class SafeStatus(SafeOutput):
    """stderr for Rich consoles (progress bars, tables sent to stderr): best effort, never raises."""

    @property
    def _raw(self):
        return sys.stderr

    def write(self, text: str) -> int:
        try:
            return self._raw.write(text)
        except (OSError, ValueError, AttributeError):
            return len(text)

    def flush(self) -> None:
        try:
            self._raw.flush()
        except (OSError, ValueError, AttributeError):
            pass


out_stream = SafeOutput()
status_stream = SafeStatus()


def _output_error(e: BaseException) -> OutputError:
    quiet_stdout()
    why = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return OutputError(f"cannot write to standard output: {why}")


def _warn_encoding(encoding: str) -> None:
    global _warned_encoding
    if not _warned_encoding:
        _warned_encoding = True
        say(f"standard output's encoding ({encoding}) cannot show some characters; they are written as '?' "
            "(set PYTHONIOENCODING=utf-8, or use --json, which escapes them)")


def write(text: str, *, flush: bool = True) -> None:
    """Generated text (or a command's plain output) on stdout."""
    out_stream.write(text)
    if flush:
        out_stream.flush()


def write_json(value, *, indent: int | None = None, default=None) -> None:
    """One JSON document on stdout, lossless whatever stdout's encoding (\\u escapes where it is not Unicode)."""
    ascii_only = not _is_unicode(_encoding(sys.stdout))
    write(json.dumps(value, ensure_ascii=ascii_only, indent=indent, default=default) + "\n")


def console(*, stderr: bool = False, **kwargs):
    """A Rich console on stdout (through SafeOutput) or stderr. A closed pipe raises BrokenPipeError for
    `cli.main` to end quietly with exit 0 (Rich's own handling exits 1)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            quiet_stdout()
            raise BrokenPipeError

    return _Console(file=status_stream if stderr else out_stream, stderr=stderr, **kwargs)
