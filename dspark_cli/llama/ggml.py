"""ctypes handles on the ggml libraries llama-cpp-python loaded into this process, for what its bindings lack
(the abort callback, the backend registry, RPC).

It must be the very copy llama.cpp runs: a wheel carries several (libggml-base.so, .so.0, ...: wheels hold no
symlinks) and LLAMA_CPP_LIB_PATH may point elsewhere, and two copies mean two registries and two abort hooks.
On Linux /proc/self/maps names what the dynamic loader really mapped; elsewhere, llama-cpp-python's folder.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re

import llama_cpp


def mapped(stem: str) -> list[str]:
    """Paths of lib<stem> that the dynamic loader mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({path for path in (line.split()[-1] for line in maps if f"/lib{stem}." in line)
                           if _LIBRARY_END.search(path)})
    except OSError:
        return []


_LIBRARY_END = re.compile(r"\.(so(\.\d+)*|dylib|dll)$")  # libggml.so, libggml-base.so.0, libgomp.so.1.0.0


def library_paths(stem: str) -> list[str]:
    """Paths of lib<stem> (e.g. "ggml-base") as loaded here, the loaded ones first."""
    found = mapped(stem)
    if found:
        return found
    base = getattr(getattr(llama_cpp, "llama_cpp", None), "_base_path", None)
    return sorted(glob.glob(os.path.join(str(base), f"lib{stem}.*"))) if base else []


@functools.lru_cache(maxsize=None)
def library(stem: str) -> ctypes.CDLL | None:
    for path in library_paths(stem):
        try:
            return ctypes.CDLL(path, mode=getattr(os, "RTLD_GLOBAL", 0))
        except OSError:
            continue
    return None


def function(stem: str, name: str, restype, argtypes=()):
    """A C function of lib<stem>, typed; None when the library or the symbol is missing."""
    lib = library(stem)
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is not None:
        fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


# ---- the backend registry (ggml-backend.h) -----------------------------------------------------------------
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL = 0, 1, 2, 3
_VP, _SZ = ctypes.c_void_p, ctypes.c_size_t


def backend_names() -> list[str]:
    """The backends llama.cpp registered here ("CPU", "CUDA", "RPC", ...)."""
    count = function("ggml", "ggml_backend_reg_count", _SZ)
    get = function("ggml", "ggml_backend_reg_get", _VP, [_SZ])
    name = function("ggml-base", "ggml_backend_reg_name", ctypes.c_char_p, [_VP])
    return [name(get(i)).decode(errors="replace") for i in range(count())] if count and get and name else []


def devices() -> list[int]:
    """Every device llama.cpp registered here (CPU, GPUs, ...), as ggml_backend_dev_t pointers."""
    count = function("ggml", "ggml_backend_dev_count", _SZ)
    get = function("ggml", "ggml_backend_dev_get", _VP, [_SZ])
    return [get(i) for i in range(count())] if count and get else []


def device_name(dev: int) -> str:
    return function("ggml-base", "ggml_backend_dev_name", ctypes.c_char_p, [_VP])(dev).decode(errors="replace")


def device_description(dev: int) -> str:
    return function("ggml-base", "ggml_backend_dev_description", ctypes.c_char_p, [_VP])(dev).decode(errors="replace")


def device_type(dev: int) -> int:
    return function("ggml-base", "ggml_backend_dev_type", ctypes.c_int, [_VP])(dev)


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes."""
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    function("ggml-base", "ggml_backend_dev_memory", None,
             [_VP, ctypes.POINTER(_SZ), ctypes.POINTER(_SZ)])(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def local_accelerators() -> list[int]:
    """This machine's GPUs (what llama.cpp offloads layers to by default)."""
    return [d for d in devices() if device_type(d) in (DEVICE_GPU, DEVICE_IGPU)]


def device_array(devs: list[int]):
    """A NULL-terminated ggml_backend_dev_t array for llama_model_params.devices (keep it alive while loading)."""
    return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
