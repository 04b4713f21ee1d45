"""What a benchmark ran on, for its header and JSON: the machine (CPU, cores, RAM, GPU backend, llama.cpp
version, from machine.machine_info), the model files with their quantizations, and the settings that
change the figures (context, GPU layers, threads)."""

from __future__ import annotations

from ..loader import Loaded, ModelOptions
from ..llama.ggml import local_accelerators
from ..llama.backend import default_threads
from ..llama.model import Model


def _ftype_names() -> dict[int, str]:
    import llama_cpp

    names = {}
    for attr in dir(llama_cpp):
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attr.startswith(prefix):
                names[int(getattr(llama_cpp, attr))] = attr[len(prefix):]
    return names


def model_info(model: Model) -> dict:
    ftype = model.metadata("general.file_type")
    quant = None
    if ftype is not None and ftype.isdigit():
        quant = _ftype_names().get(int(ftype), f"ftype {ftype}")
    arch = model.metadata("general.architecture")
    layers = model.metadata(f"{arch}.block_count") if arch else None
    try:
        size = model.path.stat().st_size
    except OSError:
        size = None
    return {
        "path": str(model.path), "file": model.path.name, "size_bytes": size, "quantization": quant,
        "architecture": arch, "name": model.metadata("general.name"),
        "layers": int(layers) if layers and layers.isdigit() else None,
    }


def _machine() -> dict:
    from ..llama.machine import machine_info

    try:
        return machine_info()
    except Exception as e:  # a header must never stop a benchmark
        info = _minimal_machine()
        info["error"] = f"machine_info failed: {e}"
        return info


def _minimal_machine() -> dict:
    import platform

    import llama_cpp
    import psutil

    return {
        "os": f"{platform.system()} {platform.release()}",
        "cpu": {"model": platform.processor() or platform.machine(), "physical_cores": psutil.cpu_count(logical=False),
                "logical_cores": psutil.cpu_count(logical=True)},
        "ram": {"total": psutil.virtual_memory().total},
        "llama": {"system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()},
        "gpu": {"backend": "gpu" if local_accelerators() else "none"},
    }


def _offloaded(requested: int | None, layers: int | None, offload: bool) -> int | None:
    """Layers on the GPU, as llama.cpp counts them (the output layer counts, hence layers + 1)."""
    if not offload:
        return 0  # a CPU-only build ignores --n-gpu-layers
    n = requested if requested is not None else 999
    return min(n, layers + 1) if layers is not None else n


def setup_info(loaded: Loaded, opts: ModelOptions, load_seconds: float) -> dict:
    machine = _machine()
    offload = bool(machine.get("gpu", {}).get("offload") or machine.get("gpu", {}).get("backend", "none") != "none")
    target = model_info(loaded.target)
    draft = model_info(loaded.draft_model) if loaded.draft_model is not None else None
    target["gpu_layers"] = _offloaded(opts.n_gpu_layers, target["layers"], offload)
    if draft is not None:
        draft["gpu_layers"] = _offloaded(opts.n_gpu_layers_draft, draft["layers"], offload)
        if loaded.draft_path is not None and loaded.draft_model.path != loaded.draft_path:
            draft["derived_from"] = loaded.draft_path.name  # a faster copy (models/derive.py) runs in its place
    return {
        "machine": machine,
        "target": target,
        "draft": draft,
        "ctx_size": loaded.target.n_ctx,
        "threads": opts.threads or default_threads(),
        "load_seconds": load_seconds,
        # The proof at load (llama/proof.py): whether verify batches match one-token decoding bit for bit here.
        "exact": loaded.exact_label,
        "exactness": loaded.exactness.as_dict() if loaded.exactness is not None else None,
    }
