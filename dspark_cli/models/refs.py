"""Model references, accepted wherever a model is named:

  ./path/to/model.gguf        a local file
  org/repo:file.gguf          a file on the Hugging Face hub (any path inside the repo)
  org/repo:Q4_K_M             the file of that quantization in the repo
  qwen2.5-0.5b-instruct       a model in the registry (models.toml), or an alias of one
and `--pair NAME` names a registry pair, which sets both target and draft.

Resolving never downloads unless asked (pull=True): a hub file that is not in the HF cache is an error that
says how to get it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import hub
from ..errors import DownloadError, ModelFileError, UsageError
from .registry import ModelSpec, Registry, load_registry

_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<sel>[^:]+)$")
_REPO_ONLY = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class ModelRef:
    text: str
    kind: str  # "path" | "hub" | "registry" | "builtin"
    path: Path | None = None
    repo: str | None = None
    file: str | None = None  # None for org/repo:QUANT until the quant is matched to a file
    quant: str | None = None
    spec: ModelSpec | None = None

    @property
    def display(self) -> str:
        if self.kind == "path":
            return str(self.path)
        if self.kind in ("registry", "builtin") and self.spec is not None:
            return self.spec.name
        return f"{self.repo}:{self.file or self.quant}"


def parse_ref(text: str, registry: Registry | None = None) -> ModelRef:
    """Classify a model reference; UsageError/ModelFileError for one that cannot name a model."""
    text = (text or "").strip()
    if not text:
        raise UsageError("empty model reference")
    reg = registry if registry is not None else load_registry()
    if reg.is_pair(text):
        raise UsageError(f"'{text}' is a pair, not a model: use --pair {text}")
    spec = reg.model(text)
    if spec is not None:
        if spec.builtin:
            return ModelRef(text, "builtin", spec=spec, quant=spec.quant)
        return ModelRef(text, "registry", repo=spec.repo, file=spec.file, quant=spec.quant, spec=spec)

    local = Path(text).expanduser()
    m = _HUB_REF.match(text)
    if not local.exists() and ":" in text and not m and not text.startswith(("/", ".", "~")):
        repo, _, sel = text.partition(":")
        if not _REPO_ONLY.match(repo) or not sel.strip():
            raise UsageError(f"'{text}' is not a model reference: use org/repo:FILE.gguf or org/repo:QUANT")
    if m and not local.exists():
        repo, sel = m["repo"], m["sel"]
        if any(part in ("", ".", "..") for part in sel.split("/")):
            raise UsageError(f"'{text}': the file part must be a plain path inside the repo (no '..', no empty parts)")
        if sel.lower().endswith(".gguf"):
            return ModelRef(text, "hub", repo=repo, file=sel, spec=reg.find_by_file(repo, sel))
        if "/" in sel or "." in sel:
            raise UsageError(f"'{text}': after the colon put a .gguf file name or a quantization such as Q4_K_M")
        known = reg.find_by_quant(repo, sel)
        if known is not None:
            return ModelRef(text, "hub", repo=repo, file=known.file, quant=known.quant, spec=known)
        return ModelRef(text, "hub", repo=repo, quant=sel)
    if local.exists():
        if local.is_dir():
            raise ModelFileError(f"{text} is a directory, not a GGUF file")
        return ModelRef(text, "path", path=local)
    if _REPO_ONLY.match(text) and not text.lower().endswith(".gguf"):
        raise UsageError(
            f"no such file '{text}'; for a hub repo say which file: {text}:FILE.gguf or {text}:Q4_K_M"
        )
    if "/" in text or "\\" in text or text.lower().endswith(".gguf") or text.startswith(("~", ".")):
        raise ModelFileError(f"no such model file: {text}")
    raise UsageError(
        f"unknown model '{text}': not a file, org/repo:file.gguf, org/repo:QUANT or a registry name",
        hint="`dspark models` lists the registry",
    )


def resolve_model(ref: str, *, pull: bool = False, offline: bool = False) -> Path:
    """The local path of the model `ref` names, downloading it only when pull=True.

    Raises ModelFileError (not downloaded yet: run `dspark pull REF` or pass --pull; missing or non-GGUF file),
    DownloadError (the download failed, or offline and not cached) or UsageError (a malformed reference).
    """
    reg = load_registry()
    r = parse_ref(ref, reg)
    if r.kind == "path":
        return _check_gguf(r.path)
    if r.kind == "builtin":
        return _builtin(r, reg)
    offline = hub.offline_mode(offline)
    file = r.file or _match_quant(r, pull=pull, offline=offline)
    sha = r.spec.sha256 if r.spec is not None else None
    parts = _split_parts(file)
    paths = []
    for part in parts:
        cached = hub.cached_file(r.repo, part)
        if cached is not None:
            paths.append(cached)
            continue
        if not pull:
            if offline:
                raise DownloadError(f"{r.repo}:{part} is not in the Hugging Face cache and dspark is offline",
                                    hint="drop --offline / HF_HUB_OFFLINE=1 and run `dspark pull` for it")
            raise ModelFileError(
                f"{r.display} is not downloaded yet",
                hint=f"run `dspark pull {ref}` first, or pass --pull to download it now",
            )
        paths.append(hub.download(r.repo, part, sha256=sha if part == file else None, offline=offline))
    return paths[0]  # llama.cpp finds the other parts of a split model next to the first


def resolve_pair(name: str) -> tuple[str, str]:
    """(target_ref, draft_ref) of a registry pair (or alias), each a reference resolve_model accepts."""
    pair = load_registry().pair(name)
    return pair.target.name, pair.draft.name


def cached_path(ref: str) -> Path | None:
    """The path resolve_model(ref) would return without a download, or None (never touches the network)."""
    reg = load_registry()
    try:
        r = parse_ref(ref, reg)
    except (UsageError, ModelFileError):  # a malformed reference names nothing that can be cached: "not cached"
        return None                      # is the answer (the loader parses it again and says what is wrong)
    if r.kind == "path":
        return r.path
    if r.kind == "builtin":
        return _builtin_path(r, reg)
    if r.file is None:
        files = [f for f in _quant_files(hub.cached_files(r.repo), r.quant)
                 if not _SPLIT.search(f) or _SPLIT.search(f).group(1) == "00001"]
        return hub.cached_file(r.repo, files[0]) if len(files) == 1 else None
    parts = _split_parts(r.file)
    found = [hub.cached_file(r.repo, p) for p in parts]
    return found[0] if all(found) else None


def is_cached(ref: str) -> bool:
    """Whether resolve_model(ref) would succeed without a download (never touches the network)."""
    return cached_path(ref) is not None


# ----------------------------------------------------------------------------------------------- helpers


def _check_gguf(path: Path) -> Path:
    from ..llama.gguf_file import check_gguf_file

    return check_gguf_file(path).path.resolve()


def _builtin(r: ModelRef, reg: Registry) -> Path:
    pair = next((p for p in reg.pairs.values() if p.builtin and r.spec in (p.target, p.draft)), None)
    if pair is None or pair.name != "demo":
        raise ModelFileError(f"no way to build the built-in model '{r.text}'")
    from .demo import demo_pair  # lazy: building the demo pair is only needed when it is asked for

    target, draft = demo_pair()
    return Path(target if r.spec == pair.target else draft)


def _builtin_path(r: ModelRef, reg: Registry) -> Path | None:
    """Where the built-in model lies once built (None: not built yet)."""
    from .demo import DRAFT_NAME, TARGET_NAME, cache_dir

    pair = reg.pairs.get("demo")
    if pair is None:
        return None
    path = cache_dir() / (TARGET_NAME if r.spec == pair.target else DRAFT_NAME)
    return path if path.is_file() else None


def _quant_files(files: list[str], quant: str) -> list[str]:
    pat = re.compile(r"(?<![A-Za-z0-9])" + re.escape(quant) + r"(?![A-Za-z0-9_])", re.IGNORECASE)
    out = []
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if name.lower().endswith(".gguf") and "mmproj" not in name.lower() and pat.search(name[:-5]):
            out.append(f)
    return out


def _match_quant(r: ModelRef, *, pull: bool, offline: bool) -> str:
    """The file of quantization r.quant in r.repo: from the cache first, else (when pulling) the hub listing."""
    matches = _quant_files(hub.cached_files(r.repo), r.quant)
    where = "in the cache"
    if not matches:
        if offline or not pull:
            if offline:
                raise DownloadError(f"no {r.quant} file of {r.repo} is in the Hugging Face cache and dspark is offline")
            raise ModelFileError(f"{r.display} is not downloaded yet",
                                 hint=f"run `dspark pull {r.text}` first, or pass --pull to download it now")
        try:
            matches = _quant_files(hub.list_files(r.repo), r.quant)
        except DownloadError as e:
            raise DownloadError(f"cannot look for the {r.quant} file of {r.repo}: {e.message}", hint=e.hint) from None
        where = f"in {r.repo}"
    firsts = sorted({m for m in matches if not _SPLIT.search(m) or _SPLIT.search(m).group(1) == "00001"})
    if not firsts:
        raise DownloadError(f"no {r.quant} GGUF file {where}",
                            hint=f"name the file instead: {r.repo}:FILE.gguf")
    if len(firsts) > 1:
        raise UsageError(f"{r.quant} matches several files {where}: {', '.join(firsts)}",
                         hint=f"name one: {r.repo}:{firsts[0]}")
    return firsts[0]


def _split_parts(file: str) -> list[str]:
    """All parts of a split GGUF (name-00001-of-0000N.gguf), the first one first; [file] otherwise."""
    m = _SPLIT.search(file)
    if not m:
        return [file]
    n = int(m.group(2))
    stem = file[: m.start()]
    return [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
