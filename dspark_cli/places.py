"""Where dspark keeps its files for the user: the XDG base directories, read the way the spec says."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$HOME when it is set and absolute, else the password database's home (an empty HOME used to put
    the demo models in /.cache)."""
    value = os.environ.get("HOME", "")
    if os.path.isabs(value):
        return Path(value)
    try:
        import pwd

        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        return Path(os.path.expanduser("~"))


def user_dir(xdg_variable: str, default: str) -> Path:
    """$XDG_<...>_HOME when set to an absolute path (the spec ignores relative ones), else ~/default."""
    value = os.environ.get(xdg_variable, "")
    return Path(value) if os.path.isabs(value) else home() / default


def cache_dir(name: str, override: str | None = None) -> Path:
    """One folder of dspark's cache: $<override> when that variable is set, else `name` in $DSPARK_CACHE or in
    the user's cache folder (~/.cache/dspark)."""
    if override and os.environ.get(override):
        return Path(os.environ[override]).expanduser()
    root = os.environ.get("DSPARK_CACHE")
    return (Path(root).expanduser() if root else user_dir("XDG_CACHE_HOME", ".cache") / "dspark") / name
