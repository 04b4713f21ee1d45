"""Cost profiles on disk: one JSON file per (target file, draft file, llama.cpp build, device, threads) in dspark's
cache, holding what the cost model measured there (engine/profile.py), read at load and written after every
generation. A file that cannot be read as a profile of this key (corrupt, another version, another pair) is
ignored with one warning and replaced by the next write; a profile that cannot be written warns once."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..console import say
from ..engine.profile import CostProfile
from ..errors import OutputError
from ..files import fingerprint, write_atomic


def profiles_dir() -> Path:
    """$DSPARK_PROFILES, else the cache's profiles/ folder ($DSPARK_CACHE or ~/.cache/dspark)."""
    from ..places import cache_dir

    return cache_dir("profiles", "DSPARK_PROFILES")


def profile_key(target, draft) -> dict:
    """What a profile's figures depend on: both files' content, the build, where the models run and on how many
    threads. `target`/`draft` are loaded llama.Model objects (draft None: prompt lookup alone). Acceptance is
    kept per drafter inside, so every method over the same files shares one profile."""
    from ..llama.machine import build_id

    def where(model) -> str:
        return "rpc" if model.remote else ("cpu" if model.on_cpu else "gpu")

    key = {
        "target": {"name": target.path.name, "fingerprint": fingerprint(target.path)},
        "draft": None if draft is None else {"name": draft.path.name, "fingerprint": fingerprint(draft.path)},
        "build": build_id(),
        "device": where(target) + ("" if draft is None else "+" + where(draft)),
        "threads": target.n_threads,
    }
    return key


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class StoredProfile:
    """A CostProfile that writes itself after absorbing a run; what engine.loop.generate takes as `profile`."""

    def __init__(self, path: Path, key: dict, profile: CostProfile, *, updated: float | None = None,
                 writable: bool = True):
        self.path = path
        self.key = key
        self.profile = profile
        self.updated = updated
        self._write_failed = not writable

    def prior(self):
        return self.profile.prior()

    def acceptance_prior(self, source: str):
        return self.profile.acceptance_prior(source)

    def absorb(self, planner) -> None:
        if self.profile.absorb(planner):
            self.save()

    def save(self) -> None:
        if self._write_failed:
            return
        self.updated = time.time()
        data = {"key": self.key, "updated": self.updated, **self.profile.to_dict()}
        try:
            write_atomic(self.path, json.dumps(data, indent=1) + "\n", make_dirs=True)
        except OutputError as e:
            self._write_failed = True
            say(f"warning: cannot save the cost profile ({e.message}); the next run learns its costs afresh")


def open_profile(key: dict, directory: Path | None = None, *, quiet: bool = False) -> StoredProfile:
    """The profile stored for `key`, or an empty one (after one warning when the file is unreadable as one, or when
    the folder cannot hold profiles: said at load, not in the middle of an answer)."""
    folder = directory or profiles_dir()
    path = folder / f"{key_name(key)}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK) else "not writable"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem is not None:
        if not quiet:
            say(f"warning: cannot keep cost profiles in {folder} ({problem}); every run learns its costs afresh")
        return StoredProfile(path, key, CostProfile(), writable=False)
    why = None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != key:
            raise ValueError("it was written for other models, build or settings")
        updated = data.get("updated")
        return StoredProfile(path, key, CostProfile.from_dict(data),
                             updated=updated if isinstance(updated, (int, float)) else None)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
    if why is not None and not quiet:
        say(f"warning: ignoring the cost profile {path} ({why}); learning costs afresh")
    return StoredProfile(path, key, CostProfile())


def stored_profiles(target_path: Path | None, draft_path: Path | None, directory: Path | None = None) -> list[dict]:
    """What `doctor` shows: every readable profile for these files (all profiles when no file is given), newest
    first, summarized: runs, age, the one-token step, verify and draft costs relative to it, acceptance."""
    folder = directory or profiles_dir()
    want = {role: fingerprint(p) for role, p in (("target", target_path), ("draft", draft_path)) if p is not None}
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            profile = CostProfile.from_dict(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError):
            continue  # unreadable: not shown (the next run using it warns and replaces it)
        key = data.get("key")
        if not isinstance(key, dict):
            continue
        if any((key.get(role) or {}).get("fingerprint") != fp for role, fp in want.items()):
            continue
        out.append(_summary(path, data, profile))
    return sorted(out, key=lambda s: -(s["updated"] or 0))


def _summary(path: Path, data: dict, profile: CostProfile) -> dict:
    prior = profile.prior()
    key = data["key"]
    return {
        "path": str(path),
        "target": (key.get("target") or {}).get("name"),
        "draft": (key.get("draft") or {}).get("name"),
        "device": key.get("device"),
        "threads": key.get("threads"),
        "runs": profile.runs,
        "updated": data.get("updated"),
        "step_ms": prior.v1 * 1000 if prior else None,
        "verify": {n: r for n, r in sorted(prior.verify.items()) if n in (2, 4, 8, 16)} if prior else {},
        "draft_step": prior.draft if prior else None,
        "acceptance": {s: a.mean for s, a in profile.acceptance.items() if a.mean is not None},
    }
