"""llama.cpp's process-wide state, in one place: its one-time initialisation, its log (kept off the terminal,
errors remembered so a failed load can say why in one line), Ctrl-C during a load, and what happens when
llama.cpp aborts. Everything here concerns the whole process, not one model (that is model.py).

As a library dspark changes nothing of its host process but one environment variable that exactness needs in
builds without its kernels (_set_exactness_environment); the dspark command asks for the rest explicitly
(process.configure(): aborts as one line and an exit code, Ctrl-C during loads).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import signal
import threading
from contextlib import contextmanager

import llama_cpp

from ..errors import ModelFileError, ResourceError, UsageError
from . import ggml, process

_backend_lock = threading.Lock()
_backend_ready = False
_log_lines: list[str] | None = None  # set while capturing llama.cpp's log during a load
_VERBOSE = os.environ.get("DSPARK_VERBOSE", "") not in ("", "0")
_interrupted = False  # a Ctrl-C that arrived while llama.cpp was calling back into Python (see deferred_interrupt)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs a great deal on load; keep it off the terminal unless DSPARK_VERBOSE is set, but
    # remember errors so a failed load can say why in one line.
    global _interrupted
    try:
        msg = text.decode("utf-8", errors="replace")
        if _log_lines is not None and level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            _log_lines.append(msg.strip())
        if _VERBOSE:
            from ..console import err_text

            err_text(msg)
    except KeyboardInterrupt:  # raised here, ctypes would print it and drop it: keep it for later
        _interrupted = True


@llama_cpp.llama_progress_callback
def load_progress(progress: float, user_data: ctypes.c_void_p) -> bool:
    return not _interrupted  # False cancels the load


def raise_if_interrupted() -> None:
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupt():
    """Around llama.cpp calls that call back into Python (its log, a load's progress). Python runs the
    Ctrl-C handler at the first Python code it meets, which is inside such a callback, where ctypes prints the
    KeyboardInterrupt and drops it: a load went on and answered as if nothing happened. Here the press is
    only noted; the load's progress callback then asks llama.cpp to stop, and KeyboardInterrupt is raised
    once the call has returned (in place of the error a cancelled load reports)."""
    global _interrupted
    if not process.configured or threading.current_thread() is not threading.main_thread():
        yield  # a library's host keeps its own SIGINT handler
        return

    def note(signum, frame):
        global _interrupted
        _interrupted = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if _interrupted:
            _interrupted = False
            raise KeyboardInterrupt


def _set_exactness_environment() -> None:
    """The one change dspark makes to the environment as a library, before its first model loads (ggml reads
    the variable once, at the first matmul), and only where exactness needs it: see kernels.tiled_mm_off."""
    from .kernels import tiled_mm_off

    if tiled_mm_off():
        os.environ.setdefault("GGML_CPU_TILED_MM", "0")


_abort_explainers: list = []  # functions naming what a llama.cpp abort means (rpc: the server that went away)


def explain_aborts(explain) -> None:
    """Register explain(message) -> str | None: a user-facing reason for a llama.cpp abort message that the
    caller knows about (rpc.py names a lost server this way, so this module need not know about RPC)."""
    if explain not in _abort_explainers:
        _abort_explainers.append(explain)


_ABORT_EXIT = 1  # README: exit 1, an internal error (here: llama.cpp's own)
_abort_hooks: list = []  # callables run before the process ends on a llama.cpp abort (keep what was generated)


@contextmanager
def abort_hook(hook):
    """While inside, run hook(reason) (best effort, in llama.cpp's aborting thread) if llama.cpp aborts the
    process: chat writes the answer so far to its transcript, serve ends the stream it was sending."""
    _abort_hooks.append(hook)
    try:
        yield
    finally:
        _abort_hooks.remove(hook)


@ctypes.CFUNCTYPE(None, ctypes.c_char_p)
def _on_llama_abort(message: bytes) -> None:
    # llama.cpp hits an assertion or loses an RPC server: it is about to abort() the process. What was printed
    # stays printed; say why in one line instead of a core dump, and leave with a documented code.
    code = _ABORT_EXIT
    try:
        text = (message or b"").decode("utf-8", "replace").strip()
        reason = text.split(": ", 1)[-1] if ": " in text else text
        lost = next((why for why in (explain(text) for explain in _abort_explainers) if why), None)
        for hook in list(_abort_hooks):
            try:
                hook(lost or reason)
            except BaseException:  # noqa: BLE001 - a hook that fails must not stop the others or the exit below
                pass
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - a closed stdout: what was printed is all there is to keep
            pass
        if lost:
            from ..errors import RemoteError

            code = RemoteError.exit_code
            sys.stderr.write(f"dspark: error: {lost}\n")
        else:
            sys.stderr.write(f"dspark: error: llama.cpp stopped: {reason}\n")
            sys.stderr.write("  hint: DSPARK_VERBOSE=1 shows llama.cpp's log; please report it if it looks like a bug\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _install_abort_handler() -> None:
    """ggml_set_abort_callback, in every copy of libggml-base this process loaded (see ggml.py)."""
    from . import ggml

    for path in ggml.library_paths("ggml-base"):
        try:
            setter = ctypes.CDLL(path, mode=getattr(os, "RTLD_GLOBAL", 0)).ggml_set_abort_callback
        except (OSError, AttributeError):
            continue
        setter.restype = ctypes.c_void_p
        setter.argtypes = [type(_on_llama_abort)]
        setter(_on_llama_abort)


def init() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            _set_exactness_environment()
            if process.configured:
                _install_abort_handler()
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


@contextmanager
def capture_log():
    global _log_lines
    _log_lines = []
    try:
        yield _log_lines
    finally:
        _log_lines = None


def _reason(lines: list[str]) -> str:
    """The most telling line of llama.cpp's log for a failed load ("error loading model: ..." first)."""
    for line in lines:
        if "error loading model:" in line:
            reason = line.split("error loading model:", 1)[1].strip()
            if "not within the file bounds" in reason:
                return f"the file is truncated or corrupt ({reason})"
            return reason
    for line in reversed(lines):
        if "error" in line.lower() or "failed" in line.lower():
            return line.split(": ", 1)[-1]
    return lines[-1] if lines else "llama.cpp could not load it"


_OUT_OF_MEMORY = ("bad_alloc", "failed to allocate", "out of memory", "unable to allocate", "cannot allocate")


def load_error(what: str, lines: list[str]):
    """ResourceError when llama.cpp ran out of memory (a huge --ctx-size, say), else ModelFileError."""
    reason = _reason(lines)
    if any(m in line.lower() for line in lines for m in _OUT_OF_MEMORY):
        return ResourceError(f"{what}: not enough memory ({reason})",
                             hint="a smaller --ctx-size, fewer GPU layers, or close other programs")
    return ModelFileError(f"{what}: {reason}")


@functools.lru_cache(maxsize=1)
def _libgomp_pause():
    """omp_pause_resource_all of the libgomp this process mapped (llama.cpp's CPU backend built with OpenMP, as
    pip builds it with GCC), or None: no such build here, or a libgomp older than OpenMP 5.0."""
    for path in ggml.mapped("gomp"):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy already mapped, never another
            pause = lib.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
        return pause
    return None


_OMP_PAUSE_SOFT = 1  # omp_pause_soft


def release_workers() -> None:
    """Give back the worker threads that the calling thread's decodes started; call it where a thread's decodes
    end for a while (a load, a lone generation, an idle scheduler).

    Built with OpenMP, llama.cpp's CPU backend runs a decode as a parallel region of the calling thread's own
    team of workers, synchronised at an OpenMP barrier after every op. libgomp keeps each thread's team until
    that thread exits, and once the process holds more threads in teams than the machine has cores, it cuts every
    spin-wait short: workers then sleep, and are woken at each of a pass's hundreds of barriers. A server whose
    exactness proof ran at load on the main thread, then generated on its scheduler's, took every target pass
    ~60% longer for its whole life (Qwen2.5-Coder 1.5B, 2 cores: 40 ms against 25), as did a library host
    calling from two threads. Elsewhere (no OpenMP, another runtime) nothing happens."""
    pause = _libgomp_pause()
    if pause is not None:
        pause(_OMP_PAUSE_SOFT)  # libgomp: frees the calling thread's team only (gomp_pause_host)


MAX_THREADS = 512  # GGML_MAX_N_THREADS
THREADS_VARIABLE = "DSPARK_THREADS"


def threads_from_environment() -> int | None:
    """$DSPARK_THREADS, the default of --threads (as LLAMA_ARG_THREADS is llama-server's): for several dspark
    processes sharing one machine's cores, each with its share, where passing --threads to each is not an option."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdecimal() or not 1 <= int(value) <= MAX_THREADS:
        raise UsageError(f"{THREADS_VARIABLE} must be a number of threads from 1 to {MAX_THREADS}, got {value!r}")
    return int(value)


def default_threads() -> int:
    """The CPU threads when none are asked for: $DSPARK_THREADS, else the physical cores."""
    chosen = threads_from_environment()
    if chosen:
        return chosen
    try:
        import psutil

        n = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    except Exception:  # psutil can fail inside some containers
        n = os.cpu_count() or 1
    return max(1, n)
