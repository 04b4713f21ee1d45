"""From the model options every command shares to loaded models and a drafter."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .drafters import Drafter, HybridDrafter, ModelDrafter, PromptLookupDrafter
from .console import say
from .errors import UsageError
from .model import Model

MAX_CTX = 2**31 - 1
MAX_THREADS = 512  # GGML_MAX_N_THREADS
DRAFT_NONE = "none"  # --draft none: the target alone
DRAFT_LOOKUP = "lookup"  # --draft lookup: prompt lookup, no second model


@dataclass
class ModelOptions:
    target: str | None = None  # a model reference; None = the demo pair (or --pair's target)
    draft: str | None = None  # a model reference, "none", "lookup"; None = the pair's draft
    pair: str | None = None
    ctx_size: int = 4096
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp has a GPU backend, else 0
    n_gpu_layers_draft: int | None = None
    threads: int | None = None
    draft_p_min: float = 0.0
    lookup: bool = True  # with a draft model, prompt lookup too (the hybrid drafter)
    pull: bool = False
    offline: bool = False
    force: bool = False

    def validate(self) -> None:
        if self.ctx_size < 16:
            raise UsageError(f"--ctx-size must be at least 16, got {self.ctx_size}")
        if self.ctx_size > MAX_CTX:  # llama.cpp keeps it in 32 bits: larger values wrap around
            raise UsageError(f"--ctx-size must be at most {MAX_CTX}, got {self.ctx_size}")
        for flag, v in (("--n-gpu-layers", self.n_gpu_layers), ("--n-gpu-layers-draft", self.n_gpu_layers_draft)):
            if v is not None and v < 0:
                raise UsageError(f"{flag} must be 0 or more, got {v}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be between 1 and {MAX_THREADS} (llama.cpp's limit), got {self.threads}")
        if not 0.0 <= self.draft_p_min < 1.0:
            raise UsageError(f"--draft-p-min must be in [0, 1), got {self.draft_p_min}")
        for flag, v in (("--target", self.target), ("--draft", self.draft), ("--pair", self.pair)):
            if v is not None and not v.strip():
                raise UsageError(f"{flag} is empty: name a model (a GGUF path, org/repo:file.gguf, a registry name)")
        if self.pair and (self.target or self.draft not in (None, DRAFT_NONE, DRAFT_LOOKUP)):
            raise UsageError("--pair sets both models; drop --target/--draft or drop --pair")


@dataclass
class Loaded:
    target: Model
    drafter: Drafter | None
    draft_model: Model | None
    target_path: Path
    draft_path: Path | None

    def close(self) -> None:
        if self.draft_model is not None:
            self.draft_model.close()
        self.target.close()


def _gpu_layers(requested: int | None) -> int:
    if requested is not None:
        return requested
    import llama_cpp

    return 999 if llama_cpp.llama_supports_gpu_offload() else 0


def resolve_paths(opts: ModelOptions) -> tuple[Path, Path | str | None]:
    """(target path, draft path or "lookup" or None) after registry/hub resolution."""
    target_ref, draft_ref = opts.target, opts.draft
    if opts.pair:
        from .refs import resolve_pair

        pair_target, pair_draft = resolve_pair(opts.pair)
        target_ref = pair_target
        draft_ref = draft_ref if draft_ref in (DRAFT_NONE, DRAFT_LOOKUP) else pair_draft
    if target_ref is None:
        from .demo import demo_pair

        demo_target, demo_draft = demo_pair()
        target_path = demo_target
        if draft_ref is None:
            draft_ref = str(demo_draft)
    else:
        target_path = _resolve(target_ref, opts)
    if draft_ref is None or draft_ref == DRAFT_NONE:
        return target_path, None
    if draft_ref == DRAFT_LOOKUP:
        return target_path, DRAFT_LOOKUP
    return target_path, _resolve(draft_ref, opts)


def _resolve(ref: str, opts: ModelOptions) -> Path:
    from .refs import resolve_model

    return resolve_model(ref, pull=opts.pull, offline=opts.offline)


def load(opts: ModelOptions, *, quiet: bool = False) -> Loaded:
    opts.validate()
    target_path, draft = resolve_paths(opts)
    draft_path = draft if isinstance(draft, Path) else None
    ngl, ngl_draft = _gpu_layers(opts.n_gpu_layers), _gpu_layers(opts.n_gpu_layers_draft)
    from .memory import preflight

    preflight(target_path, draft_path, n_ctx=opts.ctx_size, n_gpu_layers=ngl, n_gpu_layers_draft=ngl_draft, force=opts.force)

    hardware = os.cpu_count() or 1
    if opts.threads is not None and opts.threads > hardware:
        say(f"warning: --threads {opts.threads} is more than this machine's {hardware} hardware threads; "
            "llama.cpp gets slower, not faster, past them")
    if not quiet:
        what = f"draft {draft_path.name}" if draft_path else ("prompt lookup" if draft == DRAFT_LOOKUP else "no draft")
        say(f"loading target {target_path.name} + {what}")
    target = Model(target_path, role="target", n_ctx=opts.ctx_size, n_gpu_layers=ngl, n_threads=opts.threads)
    draft_model = None
    drafter: Drafter | None = None
    try:
        if draft_path is not None:
            from .vocab import check_pair

            draft_model = Model(draft_path, role="draft", n_ctx=opts.ctx_size, n_gpu_layers=ngl_draft, n_threads=opts.threads)
            check_pair(target, draft_model)
            drafter = (HybridDrafter if opts.lookup else ModelDrafter)(draft_model, p_min=opts.draft_p_min)
        elif draft == DRAFT_LOOKUP:
            drafter = PromptLookupDrafter()
    except BaseException:
        if draft_model is not None:
            draft_model.close()
        target.close()
        raise
    return Loaded(target, drafter, draft_model, target_path, draft_path)
