"""The one reader of GGUF headers, read with struct (gguf isn't a runtime dependency, and its reader parses
every tensor and token: seconds on big files). Every path to a model goes through `check_gguf_file` before
llama.cpp or the memory estimate sees it, so both judge a file alike and the user gets a precise one-line
reason (missing, a directory or special file, not GGUF, truncated, an impossible header) instead of
llama.cpp's multi-line log, or a hang on a FIFO."""

from __future__ import annotations

import io
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
# The smallest a header entry can be: a tensor's info is a name (u64 length + 1 byte), u32 n_dims, one u64
# dim, u32 type and u64 offset; a key/value pair is a key (u64 + 1 byte), a u32 type and a 1-byte value.
_MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8
_MIN_KV = 8 + 1 + 4 + 1
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, key/value count
_LENGTH = struct.Struct("<Q")  # a string's length


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    n_tensors: int
    n_kv: int
    size: int


def check_gguf_file(path: str | Path, role: str = "model") -> GGUFHeader:
    """The header of a file llama.cpp can be asked to load; ModelFileError naming `role` otherwise."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelFileError(f"{role} file not found: {p}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {role} file {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{role} path is a directory, not a GGUF file: {p}")
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would wait forever for a writer
        raise ModelFileError(f"{role} path is not a regular file (a FIFO, device or socket): {p}")
    try:
        with p.open("rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise ModelFileError(f"cannot read {role} file {p}: {e.strerror or e}") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{role} file is not a GGUF model (it does not start with the GGUF magic bytes): {p}")
    if len(head) < _HEADER.size:
        raise ModelFileError(f"{role} file is truncated (its GGUF header ends early): {p}")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in (2, 3):
        raise ModelFileError(f"{role} file has unsupported GGUF version {version}: {p}")
    if _HEADER.size + n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > st.st_size:
        raise ModelFileError(f"{role} file is corrupt: its header claims {n_tensors:,} tensors and {n_kv:,} metadata "
                             f"entries, more than its {st.st_size:,} bytes can hold: {p}")
    return GGUFHeader(p, version, n_tensors, n_kv, st.st_size)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types: (values per block, bytes per block), to know where each tensor's data ends. A type not
# listed here (a newer one) is not checked.
_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}


# Long: one pass over the GGUF header as the format lays it out, with a check at each field; kept in one


# place so a truncated or hostile file is judged the same way everywhere.


def read_metadata(path: str | Path, role: str = "model") -> dict:
    """The key/value section of a GGUF header (after check_gguf_file). Arrays of strings come back as their
    length only; long arrays of numbers (per-token scores and types) too; other arrays as lists.
    ModelFileError when the header is cut short or malformed, or when the file ends before the tensor data
    the header describes (a truncated download: llama.cpp would refuse it at load)."""
    return _read_header(path, role)[0]


def read_tensors(path: str | Path, role: str = "model") -> list[tuple[str, tuple[int, ...], int]]:
    """(name, dimensions as the file lists them, ggml type number) of each tensor, from the header alone (gguf's
    GGUFReader parses every token string first: seconds a file); judged as read_metadata judges the file."""
    return _read_header(path, role)[1]


def _read_header(path: str | Path, role: str) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    header = check_gguf_file(path, role)
    p = header.path

    def unpack(f, fmt):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    longest = min(1 << 30, header.size)  # a string's length beyond this is a corrupt header

    def string(f):
        n = unpack(f, "<Q")
        if n > longest:
            raise ValueError("absurd string length")
        return f.read(n).decode("utf-8", errors="replace")

    def skip_strings(f, count):
        # A vocabulary's tokens and merges: ~100,000 strings a model, walked a megabyte at a time (a read and a
        # seek each took 0.2 s a model, at every start). Not mmap: a file cut short meanwhile would be a SIGBUS.
        buf, pos = b"", 0
        for _ in range(count):
            if pos + 8 > len(buf):
                if pos > len(buf):  # the last string ran past the buffer
                    f.seek(pos - len(buf), io.SEEK_CUR)
                    buf, pos = b"", 0
                buf = buf[pos:] + f.read(1 << 20)
                pos = 0
                if len(buf) < 8:
                    raise EOFError
            (n,) = _LENGTH.unpack_from(buf, pos)
            if n > longest:
                raise ValueError("absurd string length")
            pos += 8 + n
        f.seek(pos - len(buf), io.SEEK_CUR)  # back to just after the last string

    def value(f, vtype):
        if vtype in _SCALARS:
            return unpack(f, _SCALARS[vtype])
        if vtype == _STRING:
            return string(f)
        if vtype == _ARRAY:
            etype, count = unpack(f, "<I"), unpack(f, "<Q")
            if count > header.size:
                raise ValueError("absurd array length")
            if etype == _STRING:
                skip_strings(f, count)
                return count
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                if count > 4096:  # per-token scores and types: only their length matters here
                    f.seek(size * count, io.SEEK_CUR)
                    return count
                return [unpack(f, _SCALARS[etype]) for _ in range(count)]
            raise ValueError(f"unsupported array element type {etype}")
        raise ValueError(f"unknown value type {vtype}")

    try:
        with open(p, "rb", buffering=1 << 16) as f:
            f.seek(_HEADER.size)
            meta = {}
            for _ in range(header.n_kv):
                key = string(f)
                meta[key] = value(f, unpack(f, "<I"))
            end = 0  # where the last tensor's data ends, from the start of the data section
            tensors = []
            for _ in range(header.n_tensors):
                name = string(f)
                n_dims = unpack(f, "<I")
                if n_dims > 8:
                    raise ValueError(f"a tensor with {n_dims} dimensions")
                dims = tuple(unpack(f, "<Q") for _ in range(n_dims))
                count = 1
                for d in dims:
                    count *= d
                kind, offset = unpack(f, "<I"), unpack(f, "<Q")
                tensors.append((name, dims, kind))
                if kind in _TYPE_SIZES:
                    per_block, block_bytes = _TYPE_SIZES[kind]
                    end = max(end, offset + -(-count // per_block) * block_bytes)
            align = meta.get("general.alignment", 32)
            align = align if isinstance(align, int) and align > 0 else 32
            data_start = -(-f.tell() // align) * align
            if data_start + end > header.size:
                raise ModelFileError(f"{role} file is truncated: its tensors need {data_start + end:,} bytes, the file has "
                                     f"{header.size:,} (an interrupted download?): {p}")
            return meta, tensors
    except OSError as e:
        raise ModelFileError(f"cannot read {role} file {p}: {e.strerror or e}") from None
    except EOFError:
        raise ModelFileError(f"{role} file is truncated (its GGUF header ends early): {p}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{role} file is not a usable GGUF model ({e}): {p}") from None
