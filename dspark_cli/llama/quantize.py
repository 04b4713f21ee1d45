"""llama.cpp's quantizer: a GGUF re-encoded as another file type (the demo target, test copies)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelFileError
from . import backend


def requantize(src: Path, dest: Path, ftype: int, what: str = "a requantized copy", head_type: int | None = None) -> None:
    """Write `src` re-encoded as llama.cpp file type `ftype` (a llama_cpp.LLAMA_FTYPE_* value) to `dest`,
    written whole or not at all; `what` names the result in the error. head_type: a ggml type for the output
    head and the token embeddings too (None: the quantizer's own choice for them)."""
    import llama_cpp

    backend.init()  # routes llama.cpp's log away from the terminal
    part = dest.with_suffix(".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = backend.threads_from_environment() or os.cpu_count() or 1  # DSPARK_THREADS: a share of the cores
    if head_type is not None:
        params.output_tensor_type = head_type
        params.token_embedding_type = head_type
    try:
        with backend.deferred_interrupt():  # the quantizer cannot be stopped: Ctrl-C takes effect when it returns
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), params)
        if rc != 0 or not part.exists():
            raise ModelFileError(f"llama.cpp could not make {what} from {src} (code {rc})")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
