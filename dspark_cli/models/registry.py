"""The registry of known-good draft/target pairs: models.toml shipped with dspark, plus the user's own file.

The one real file is models.toml at the top of the source tree; a built wheel carries a copy as package data
(dspark_cli/data/models.toml), which setup.py writes at build time. A user file
in the config dir uses the same format and can add models, pairs and aliases, or replace packaged ones.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport (pyproject: tomli; python_version < "3.11")
    import tomli as tomllib

from ..errors import UsageError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # dspark_cli/
TEMPLATES = ("chatml", "llama3", "gemma", "mistral", "phi3", "none")
SCHEMA = 1


@dataclass(frozen=True)
class ModelSpec:
    """One GGUF file the registry knows: on the hub (repo + file) or built by dspark (builtin)."""

    name: str
    quant: str
    size: int
    repo: str | None = None
    file: str | None = None
    sha256: str | None = None
    builtin: bool = False
    description: str = ""
    source: str = "packaged"

    @property
    def ref(self) -> str:
        """The reference a user could type instead of the name."""
        return self.name if self.builtin else f"{self.repo}:{self.file}"


@dataclass(frozen=True)
class Pair:
    name: str
    target: ModelSpec
    draft: ModelSpec
    template: str
    draft_len: int
    note: str
    builtin: bool = False
    source: str = "packaged"
    unverified: bool = False  # may well not pair: llama.cpp's vocabulary rule was not checked on these files


@dataclass
class Registry:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    pairs: dict[str, Pair] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def canonical(self, name: str) -> str:
        """Follow aliases (one level is what the file format allows; a chain is followed but not looped)."""
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name

    def pair(self, name: str) -> Pair:
        key = self.canonical(name)
        if key in self.pairs:
            return self.pairs[key]
        hint = f"known pairs: {', '.join(sorted(self.pairs))}"
        if key in self.models:
            raise UsageError(f"'{name}' is a model, not a pair; name it with --target or --draft", hint=hint)
        raise UsageError(f"unknown pair '{name}'", hint=hint + " (see `dspark models`)")

    def model(self, name: str) -> ModelSpec | None:
        return self.models.get(self.canonical(name))

    def is_pair(self, name: str) -> bool:
        return self.canonical(name) in self.pairs

    def find_by_file(self, repo: str, file: str) -> ModelSpec | None:
        for spec in self.models.values():
            if spec.repo == repo and spec.file == file:
                return spec
        return None

    def find_by_quant(self, repo: str, quant: str) -> ModelSpec | None:
        for spec in self.models.values():
            if spec.repo == repo and spec.quant.upper() == quant.upper():
                return spec
        return None


def user_config_dir() -> Path:
    """dspark's config dir: $DSPARK_CONFIG_DIR, else $XDG_CONFIG_HOME/dspark, else ~/.config/dspark."""
    if os.environ.get("DSPARK_CONFIG_DIR"):
        return Path(os.environ["DSPARK_CONFIG_DIR"]).expanduser()
    from ..places import user_dir

    return user_dir("XDG_CONFIG_HOME", ".config") / "dspark"


def user_registry_path() -> Path:
    return user_config_dir() / "models.toml"


def packaged_registry_path() -> Path:
    # In a checkout the top-level file is the canonical one (no stale copy); the pyproject.toml beside it
    # tells a checkout apart from a site-packages dir that happens to hold some other models.toml.
    top = _PACKAGE_DIR.parent / "models.toml"
    if top.is_file() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return top
    data = _PACKAGE_DIR / "data" / "models.toml"
    if data.is_file():
        return data
    raise FileNotFoundError("dspark's models.toml is missing from the installation (reinstall dspark)")


def load_registry(user_file: Path | None = None, *, include_user: bool = True) -> Registry:
    """The packaged registry, overlaid with the user's file when it exists."""
    reg = Registry()
    _merge(reg, packaged_registry_path(), source="packaged")
    if include_user:
        path = user_file if user_file is not None else user_registry_path()
        if path.is_file():
            _merge(reg, path, source="user")
    return reg


class RegistryFormatError(UsageError):
    """A models.toml that does not follow the format (the packaged one is tested; this is for user files)."""


def _merge(reg: Registry, path: Path, *, source: str) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RegistryFormatError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise RegistryFormatError(f"{path}: cannot read: {e.strerror}") from None
    reg.files.append(path)

    def bad(what: str) -> RegistryFormatError:
        return RegistryFormatError(f"{path}: {what}")

    schema = data.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise bad(f"schema {schema!r} is not supported (this dspark reads schema {SCHEMA})")
    unknown = set(data) - {"schema", "models", "pairs", "aliases"}
    if unknown:
        raise bad(f"unknown top-level key(s): {', '.join(sorted(unknown))}")

    for name, m in (data.get("models") or {}).items():
        reg.models[name] = _model(name, m, source, bad)
    for name, p in (data.get("pairs") or {}).items():
        if not isinstance(p, dict):
            raise bad(f"pairs.{name} must be a table")
        missing = [k for k in ("target", "draft", "template", "draft_len", "note") if k not in p]
        if missing:
            raise bad(f"pairs.{name} lacks {', '.join(missing)}")
        specs = []
        for role in ("target", "draft"):
            ref = p[role]
            spec = reg.models.get(ref) if isinstance(ref, str) else None
            if spec is None:
                raise bad(f"pairs.{name}.{role} = {ref!r} is not a model in [models]")
            specs.append(spec)
        if p["template"] not in TEMPLATES:
            raise bad(f"pairs.{name}.template {p['template']!r} is not one of {', '.join(TEMPLATES)}")
        if not isinstance(p["draft_len"], int) or isinstance(p["draft_len"], bool) or not 1 <= p["draft_len"] <= 64:
            raise bad(f"pairs.{name}.draft_len must be an integer from 1 to 64")
        if not isinstance(p["note"], str) or not p["note"].strip():
            raise bad(f"pairs.{name}.note must be a non-empty string")
        builtin = bool(p.get("builtin", False))
        if not isinstance(p.get("unverified", False), bool):
            raise bad(f"pairs.{name}.unverified must be true or false")
        if builtin != (specs[0].builtin and specs[1].builtin):
            raise bad(f"pairs.{name}: a builtin pair must name builtin models, and only it may")
        reg.pairs[name] = Pair(name, specs[0], specs[1], p["template"], p["draft_len"], p["note"].strip(), builtin,
                               source, p.get("unverified", False))
    for alias, target in (data.get("aliases") or {}).items():
        if not isinstance(target, str):
            raise bad(f"aliases.{alias} must be a string")
        reg.aliases[alias] = target
    for alias, target in reg.aliases.items():
        if target not in reg.pairs and target not in reg.models and target not in reg.aliases:
            raise bad(f"alias '{alias}' points at '{target}', which is neither a pair nor a model")
        if alias in reg.pairs or alias in reg.models:
            raise bad(f"alias '{alias}' shadows a pair or model of the same name")
    clash = set(reg.pairs) & set(reg.models)
    if clash:
        raise bad(f"name(s) used for both a pair and a model: {', '.join(sorted(clash))}")


def _model(name: str, m: object, source: str, bad) -> ModelSpec:
    if not isinstance(m, dict):
        raise bad(f"models.{name} must be a table")
    builtin = bool(m.get("builtin", False))
    need = ("quant", "size") if builtin else ("repo", "file", "quant", "size")
    missing = [k for k in need if k not in m]
    if missing:
        raise bad(f"models.{name} lacks {', '.join(missing)}")
    size = m["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise bad(f"models.{name}.size must be a positive number of bytes")
    if not builtin:
        repo, file = m["repo"], m["file"]
        if not isinstance(repo, str) or repo.count("/") != 1 or not all(repo.split("/")):
            raise bad(f"models.{name}.repo must be 'org/name'")
        if not isinstance(file, str) or not file.endswith(".gguf"):
            raise bad(f"models.{name}.file must be a .gguf file name")
    sha = m.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise bad(f"models.{name}.sha256 must be 64 lowercase hex digits")
    return ModelSpec(
        name=name, quant=str(m["quant"]), size=size, repo=m.get("repo"), file=m.get("file"), sha256=sha,
        builtin=builtin, description=str(m.get("description", "")), source=source,
    )
