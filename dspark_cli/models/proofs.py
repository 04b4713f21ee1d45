"""The exactness proof's verdicts on disk (llama/proof.py), so that it runs once per (target file, build, device,
threads, largest batch): one small JSON file each in dspark's cache ($DSPARK_PROOFS, else the cache's proofs/
folder). The key names the file by its content fingerprint, size and modification time, so a file changed in
place is proven again; the build by build_id (versions, patches, the content of the libraries loaded). A stored
verdict that cannot be read is proven again and replaced; a folder that cannot hold verdicts costs the proof at
every load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import OutputError
from ..files import fingerprint, write_atomic
from ..llama.proof import Verdict, prove

PROOF_VERSION = 1  # bump when what the proof checks changes: older verdicts are then proven again


def proofs_dir() -> Path:
    """$DSPARK_PROOFS, else the cache's proofs/ folder ($DSPARK_CACHE or ~/.cache/dspark)."""
    from ..places import cache_dir

    return cache_dir("proofs", "DSPARK_PROOFS")


def proof_key(model, device: str, largest: int) -> dict:
    """What a verdict depends on. device: where the model's layers run (the loader's words for it)."""
    from ..llama.machine import build_id

    stat = model.path.stat()
    return {"version": PROOF_VERSION, "file": model.path.name, "fingerprint": fingerprint(model.path),
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "build": build_id(), "device": device,
            "threads": model.n_threads, "largest": largest}


def _path(key: dict, folder: Path) -> Path:
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")


def _read(path: Path) -> dict | None:
    """A kept record as {key, verdict (a Verdict), seconds}, or None when the file is missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = {"key": data["key"], "verdict": Verdict.from_dict(data["verdict"]), "seconds": data.get("seconds")}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record["key"], dict) else None


def stored_verdict(key: dict, folder: Path | None = None) -> Verdict | None:
    """The verdict kept for `key`, or None (never kept, or unreadable as one)."""
    record = _read(_path(key, folder or proofs_dir()))
    return record["verdict"] if record is not None and record["key"] == key else None


def verdict_for(model, *, device: str, largest: int, folder: Path | None = None, on_run=None) -> Verdict:
    """The proof's verdict for a loaded model: the stored one, else the proof run now (on_run() is called first,
    to say so) and kept. A verdict that says the proof could not run is not kept (the next load tries again)."""
    folder = folder or proofs_dir()
    key = proof_key(model, device, largest)
    found = stored_verdict(key, folder)
    if found is not None:
        return found
    if on_run is not None:
        on_run()
    verdict = prove(model, largest)
    if verdict.reason is None:
        record = {"key": key, "verdict": verdict.as_dict(), "seconds": round(verdict.seconds, 4)}
        try:
            write_atomic(_path(key, folder), json.dumps(record, indent=1) + "\n", make_dirs=True)
        except OutputError:
            pass  # not kept: the next load proves it again, which costs time, not correctness
    return verdict


def stored_verdicts(target_path: Path | None = None, folder: Path | None = None) -> list[dict]:
    """What `doctor` shows: every readable verdict (for this file, when given), as {key, verdict, seconds}."""
    folder = folder or proofs_dir()
    want = fingerprint(target_path) if target_path is not None else None
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read(path)
        if record is not None and (want is None or record["key"].get("fingerprint") == want):
            out.append(record)
    return out
