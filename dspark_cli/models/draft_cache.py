"""The drafting memory on disk (`--draft-cache FILE`, off by default): what earlier processes wrote, drafted from
by this one (engine/memory.py).

The file: a magic line, a JSON header line (format version, the target vocabulary's fingerprint, counts, and how
many prompt tokens each text keeps before its answer), then the remembered texts as little-endian int32 token ids,
each followed by -1. Read at load; written whole at close (a
temporary file renamed over it: never half-written). A file that is truncated, corrupt, of another version or of
another vocabulary is ignored with one warning (and replaced at close); one that cannot be written warns once; a
file that is not a dspark draft cache at all (another program's: no magic line) is ignored and never written over.
Drafting goes on without it either way: it only ever changes speed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from pathlib import Path

from ..console import say
from ..engine.memory import SEP, DraftMemory
from ..errors import OutputError, UsageError
from ..files import check_writable, write_atomic

MAGIC = b"DSPARK-DRAFT-MEMORY\n"
VERSION = 2  # 2: the texts' heads (the prompt tokens before each answer)


def vocab_id(target) -> str:
    """The target vocabulary's fingerprint: its size and every token's text (token ids mean nothing across
    vocabularies)."""
    h = hashlib.sha256(str(target.n_vocab).encode())
    for i in range(target.n_vocab):
        h.update(target.token_text(i) + b"\0")
    return h.hexdigest()[:32]


class DraftCache:
    """A memory's file: read() into a memory at load, write() from it at close."""

    def __init__(self, path: str | Path, vocab: str, *, quiet: bool = False):
        self.path = Path(path).expanduser()
        self.vocab = vocab
        self._write_failed = False
        try:  # said at load, not after the last answer
            check_writable(self.path, "--draft-cache", make_dirs=True)
        except UsageError as e:
            self._write_failed = True
            if not quiet:
                say(f"warning: the drafting memory cannot be saved ({e.message}); it is kept for this run only")

    def read(self, memory: DraftMemory, *, quiet: bool = False) -> int:
        """Fill `memory` with the file's texts (the newest kept when they exceed its bound): returns how many."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except IsADirectoryError:
            return 0 if self._write_failed else self._ignore("it is a directory", quiet)  # (said once, above)
        except OSError as e:
            return self._ignore(e.strerror or str(e), quiet)
        if data and not data.startswith(MAGIC):  # another program's file: ignored, and never written over
            self._write_failed = True
            return self._ignore("not a dspark draft cache; it is left as it is, and this run's memory is not saved",
                                quiet)
        try:
            texts = _parse(data, self.vocab)
        except ValueError as e:
            return self._ignore(str(e), quiet)
        for text, head in texts:
            memory.add(text, n_prompt=head)
        return len(texts)

    def write(self, memory: DraftMemory) -> None:
        if self._write_failed:
            return
        tokens = array("i", memory.tokens)
        if sys.byteorder != "little":
            tokens.byteswap()
        header = {"version": VERSION, "vocab": self.vocab, "texts": len(memory), "tokens": len(tokens),
                  "heads": memory.heads()}
        try:
            write_atomic(self.path, MAGIC + json.dumps(header).encode() + b"\n" + tokens.tobytes(), make_dirs=True)
        except OutputError as e:
            self._write_failed = True
            say(f"warning: cannot save the drafting memory ({e.message}); it is kept for this run only")

    def _ignore(self, why: str, quiet: bool) -> int:
        if not quiet:
            say(f"warning: ignoring the draft cache {self.path} ({why}); drafting starts without it")
        return 0


def _parse(data: bytes, vocab: str) -> list[tuple[list[int], int]]:
    """The texts, each with its head (the prompt tokens before its answer)."""
    if not data.startswith(MAGIC):
        raise ValueError("not a dspark draft cache")
    line_end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):line_end]) if line_end > 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("its header is unreadable")
    if header.get("version") != VERSION:
        raise ValueError(f"format version {header.get('version')!r}, this dspark reads {VERSION}")
    if header.get("vocab") != vocab:
        raise ValueError("it was written for another vocabulary")
    body = data[line_end + 1:]
    n = header.get("tokens")
    if not isinstance(n, int) or len(body) != 4 * n:
        raise ValueError("it is truncated or corrupt")
    tokens = array("i")
    tokens.frombytes(body)
    if sys.byteorder != "little":
        tokens.byteswap()
    texts, start = [], 0
    for i, t in enumerate(tokens):
        if t == SEP:
            texts.append(tokens[start:i].tolist())
            start = i + 1
        elif t < 0:
            raise ValueError("it is corrupt (a negative token id)")
    heads = header.get("heads")
    if (start != len(tokens) or len(texts) != header.get("texts") or not isinstance(heads, list)
            or len(heads) != len(texts)
            or not all(type(h) is int and 0 <= h < len(t) for h, t in zip(heads, texts))):
        raise ValueError("it is truncated or corrupt")
    return list(zip(texts, heads))
