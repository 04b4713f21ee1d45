"""Cheap checks on a model path before llama.cpp sees it, so the user gets a precise one-line reason
(missing, a directory, not GGUF, truncated) instead of llama.cpp's multi-line log."""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str | Path, role: str = "model") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"{role} file not found: {p}")
    if p.is_dir():
        raise ModelFileError(f"{role} path is a directory, not a GGUF file: {p}")
    try:
        with p.open("rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ModelFileError(f"cannot read {role} file {p}: {e.strerror or e}") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{role} file is not a GGUF model (bad magic bytes): {p}")
    if len(head) < 24:
        raise ModelFileError(f"{role} file is truncated (header incomplete): {p}")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelFileError(f"{role} file has unsupported GGUF version {version}: {p}")
    return p
