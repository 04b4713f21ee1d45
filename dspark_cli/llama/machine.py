"""Facts about this machine and the llama.cpp build: CPU, memory, GPU backend and devices, versions.

`machine_info()` returns a plain dict of JSON-able values (doctor prints it; bench puts it in its header).
GPU facts come from ggml's backend registry, read through ctypes (ggml.py) from the very libraries
llama-cpp-python loaded (its Python bindings do not wrap those functions).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import re
import subprocess
import sys

from .kernels import dspark_patches

# CPU features llama.cpp's kernels care about, as /proc/cpuinfo spells them (x86 flags, ARM Features).
_X86_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                 "avx512_vnni", "avx512vbmi", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
_ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
                 "bf16": "bf16", "fphp": "fp16"}
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def machine_info() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "ram": {"total": vm.total, "available": vm.available},
        "llama": llama_info(),
        "gpu": gpu_summary(),
    }


def cpu_info() -> dict:
    import psutil

    model, features = _cpu_model_and_features()
    return {
        "model": model,
        "arch": platform.machine(),
        "features": features,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
    }


def _cpu_model_and_features() -> tuple[str, list[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if sys.platform == "darwin":
        model = model or _sysctl("machdep.cpu.brand_string")
        if platform.machine() == "arm64":
            flags |= {"asimd", "asimddp", "fphp"}  # every Apple Silicon core has them
            if _sysctl("hw.optional.arm.FEAT_I8MM") == "1":
                flags.add("i8mm")
        else:
            flags |= {f.lower().replace(".", "_") for f in _sysctl("machdep.cpu.features").split()}
            flags |= {f.lower() for f in _sysctl("machdep.cpu.leaf7_features").split()}
    model = model or platform.processor() or platform.machine() or "unknown"
    features = [f for f in _X86_FEATURES if f in flags]
    features += [name for flag, name in _ARM_FEATURES.items() if flag in flags]
    return model, features


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------------------------------------- llama.cpp


def _ggml():
    """dspark_cli.llama.ggml (handles on the ggml copies llama-cpp-python loaded), or the reason it cannot load."""
    try:
        from . import ggml

        return ggml
    except ImportError as e:
        return "llama-cpp-python is not installed" if e.name == "llama_cpp" else f"cannot load llama.cpp: {e}"
    except (OSError, RuntimeError) as e:  # the bindings found no usable library
        return f"cannot load llama.cpp: {e}"


def llama_info() -> dict:
    try:
        from importlib.metadata import PackageNotFoundError, version

        py_version = version("llama_cpp_python")
    except PackageNotFoundError:
        py_version = None
    info = {"llama_cpp_python": py_version, "ggml_version": None, "ggml_commit": None, "system_info": None,
            "compiled_features": [], "dspark_patches": dspark_patches()}
    ggml = _ggml()
    if isinstance(ggml, str):
        info["error"] = ggml
        return info
    for key in ("ggml_version", "ggml_commit"):
        f = ggml.function("ggml-base", key, ctypes.c_char_p)
        if f:
            info[key] = f().decode(errors="replace")
    f = ggml.function("llama", "llama_print_system_info", ctypes.c_char_p)
    if f:
        text = f().decode(errors="replace").strip()
        info["system_info"] = text
        info["compiled_features"] = [m.group(1).lower() for m in re.finditer(r"(\w+) = 1", text)]
    return info


def gpu_summary() -> dict:
    """The GPU backend compiled into llama.cpp ("none" for CPU-only builds), its devices and their memory."""
    out = {"backend": "none", "offload": False, "devices": [], "vram_free": None, "vram_total": None}
    ggml = _ggml()
    if isinstance(ggml, str):
        out["error"] = ggml
        return out
    # Not llama_supports_gpu_offload(): it says yes for any build with RPC, GPU or not.
    backends = ggml.backend_names()
    gpu_backends = [b for b in backends if b.upper() not in ("CPU", "BLAS", "RPC")]
    out["backends"] = backends
    out["rpc"] = "RPC" in backends
    if gpu_backends:
        out["backend"] = gpu_backends[0]
    free_sum = total_sum = 0
    for dev in ggml.devices():
        free, total = ggml.device_memory(dev)
        kind = _DEV_TYPES.get(ggml.device_type(dev), "other")
        out["devices"].append({"name": ggml.device_name(dev), "description": ggml.device_description(dev),
                               "type": kind, "memory_free": free, "memory_total": total})
        if kind in ("gpu", "igpu"):
            out["offload"] = True
            free_sum += free
            total_sum += total
    if total_sum:
        out["vram_free"], out["vram_total"] = free_sum, total_sum
    return out


@functools.cache
def build_id() -> str:
    """A short hash naming this llama.cpp build as far as speed goes (versions, commit, dspark's patches, the
    kernel choice): what measured costs and derived files are keyed by. The same for the whole process (a load
    asks for it twice: the derived draft, then the profile)."""
    import hashlib
    import json

    from .kernels import fast_kernels

    info = llama_info()
    parts = [info.get(k) for k in ("llama_cpp_python", "ggml_version", "ggml_commit", "dspark_patches")]
    return hashlib.sha256(json.dumps(parts + [fast_kernels(), _library_stamp()]).encode()).hexdigest()[:12]


def _library_stamp() -> list:
    """The content of the libraries loaded (each one's size and first and last MiB: files.fingerprint), so that
    two builds of one version with other flags or patches, or stock libraries loaded through LLAMA_CPP_LIB_PATH,
    are different builds, while the same wheel installed in another venv (another path, a newer mtime) is the same
    one and shares what was measured and derived for it."""
    from ..files import fingerprint

    stamp = []
    try:
        from .ggml import library_paths

        for stem in ("llama", "ggml-base", "ggml-cpu", "ggml-cuda", "ggml-metal", "ggml-vulkan"):
            paths = library_paths(stem)
            if paths:
                stamp.append([stem, fingerprint(paths[0])])
    except (ImportError, OSError, RuntimeError):
        pass
    return stamp
