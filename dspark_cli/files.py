"""Files dspark writes for the user (bench results, chat transcripts and /save): checked before any work
starts, written so that nothing already there is lost.

Only regular files are ever written. A path that names a directory, a device, a FIFO or a socket is refused
(as root, replacing /dev/full with a JSON file was one `/save` away). A symlink is written through: its
target is what gets replaced, and the link stays.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, UsageError


def _target(path: str | Path) -> Path:
    """The file a write to `path` lands in: ~ expanded, symlinks followed (a dangling link: its target)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _problem(path: Path, make_dirs: bool) -> str | None:
    """Why `path` (symlinks already followed) cannot be written as a regular file, or None. With make_dirs,
    missing directories will be created under the nearest one that exists."""
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        while make_dirs and not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return f"{parent} is not a directory" if parent.exists() else f"the directory {parent} does not exist"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create files in {parent}"
        return None
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a device, FIFO or socket); dspark only writes regular files"
    if not os.access(path, os.W_OK):
        return "the file is not writable"
    return None


def check_writable(path: str | Path, flag: str, *, make_dirs: bool = False) -> Path:
    """Fail before any work starts if a result file could not be written (UsageError: a bad flag value)."""
    if not str(path).strip():
        raise UsageError(f"{flag} needs a file name, got an empty one")
    why = _problem(_target(path), make_dirs)
    if why is not None:
        raise UsageError(f"{flag} {path}: {why}")
    return Path(path).expanduser()


def write_atomic(path: str | Path, text: str | bytes, *, make_dirs: bool = False) -> Path:
    """Replace the file at `path` with `text` (or bytes), whole or not at all (a temporary file beside it, renamed
    over it). Raises OutputError, and then the old file is untouched."""
    target = _target(path)
    why = _problem(target, make_dirs)
    if why is not None:
        raise OutputError(f"cannot write {path}: {why}")
    fd, tmp = None, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            fd = None
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))  # keep the old file's permissions
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return Path(path).expanduser()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_append(path: str | Path, flag: str, *, make_dirs: bool = False):
    """A file opened for appending, unbuffered bytes (the chat transcript), after the checks of check_writable."""
    check_writable(path, flag, make_dirs=make_dirs)
    p = Path(path).expanduser()
    try:
        _target(p).parent.mkdir(parents=True, exist_ok=True)
        return p.open("ab", buffering=0)
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None


def save_fallback(text: str, prefix: str, suffix: str) -> Path | None:
    """When the file the user asked for could not be written: the same content in the temporary directory,
    so a finished benchmark is not lost. None if even that fails (a full disk)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix)
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            f.write(text)
        return Path(tmp)
    except OSError:
        return None


def fingerprint(path: str | Path, sample: int = 1 << 20) -> str:
    """A short hash naming a file's content cheaply: its size and its first and last `sample` bytes (a GGUF's
    header and metadata sit at its start). Changes when the file is replaced or rewritten, not when it moves."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(sample, size - sample))
            h.update(f.read(sample))
    return h.hexdigest()[:16]


@contextmanager
def locked(directory: Path):
    """Held by one dspark process at a time (two starting at once, tests, a user with two terminals, must not both
    download or derive the same file); made in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock, the atomic renames still keep files whole
            pass
        yield
