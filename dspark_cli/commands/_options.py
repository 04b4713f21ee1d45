"""Options shared by run, chat and bench, declared once so the commands stay alike."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..loader import ModelOptions
from ..sampling import SamplingParams

MODELS = "Models"
SAMPLING = "Sampling"

Target = Annotated[Optional[str], typer.Option("--target", "-m", help="Target model: a GGUF path, org/repo:file.gguf, org/repo:QUANT or a registry name. Default: the built-in demo pair.", rich_help_panel=MODELS)]
Draft = Annotated[Optional[str], typer.Option("--draft", "-d", help="Draft model (same forms as --target), 'lookup' for prompt lookup (no second model), or 'none' for the target alone.", rich_help_panel=MODELS)]
Pair = Annotated[Optional[str], typer.Option("--pair", help="A registry pair name: sets both --target and --draft (see `dspark models`).", rich_help_panel=MODELS)]
DraftMax = Annotated[int, typer.Option("--draft-max", help="Most tokens drafted per target step; the cost model picks how many pay (0 included) up to this.", rich_help_panel=MODELS)]
DraftFixed = Annotated[bool, typer.Option("--draft-fixed", help="Draft exactly --draft-max tokens every step (no cost model).", rich_help_panel=MODELS)]
NoLookup = Annotated[bool, typer.Option("--no-lookup", help="With a draft model, draft from it alone (by default prompt-lookup matches are used too when they pay).", rich_help_panel=MODELS)]
DraftPMin = Annotated[float, typer.Option("--draft-p-min", help="Greedy drafting stops when the draft's top probability falls below this (0 = never).", rich_help_panel=MODELS)]
CtxSize = Annotated[int, typer.Option("--ctx-size", "-c", help="Context size in tokens (prompt + answer).", rich_help_panel=MODELS)]
GpuLayers = Annotated[Optional[int], typer.Option("--n-gpu-layers", "-ngl", help="Target layers to offload to the GPU (default: all when llama.cpp has a GPU backend).", rich_help_panel=MODELS)]
GpuLayersDraft = Annotated[Optional[int], typer.Option("--n-gpu-layers-draft", "-ngld", help="Draft layers to offload to the GPU (default: as for the target).", rich_help_panel=MODELS)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: physical cores).", rich_help_panel=MODELS)]
Pull = Annotated[bool, typer.Option("--pull", help="Download models that are not cached yet.", rich_help_panel=MODELS)]
Offline = Annotated[bool, typer.Option("--offline", help="Use the local cache only (like HF_HUB_OFFLINE=1).", rich_help_panel=MODELS)]
Force = Annotated[bool, typer.Option("--force", help="Load even if the memory preflight says it will not fit.", rich_help_panel=MODELS)]

Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 = greedy. Either way the output is the target's own (sampled: for this --seed).", rich_help_panel=SAMPLING)]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off). Filters run in llama.cpp's order: top-k, top-p, min-p, then the temperature.", rich_help_panel=SAMPLING)]
TopP = Annotated[float, typer.Option("--top-p", help="Keep the smallest set of tokens with this much probability (1 = off).", rich_help_panel=SAMPLING)]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below this fraction of the top token's probability (0 = off; llama.cpp's default).", rich_help_panel=SAMPLING)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed; the same seed repeats a sampled run exactly.", rich_help_panel=SAMPLING)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.", rich_help_panel=SAMPLING)]


def model_options(target, draft, pair, ctx_size, n_gpu_layers, n_gpu_layers_draft, threads, draft_p_min, pull, offline, force,
                  lookup: bool = True) -> ModelOptions:
    opts = ModelOptions(
        target=target, draft=draft, pair=pair, ctx_size=ctx_size, n_gpu_layers=n_gpu_layers,
        n_gpu_layers_draft=n_gpu_layers_draft, threads=threads, draft_p_min=draft_p_min, lookup=lookup,
        pull=pull, offline=offline, force=force,
    )
    opts.validate()
    return opts


MIN_P = 0.05  # llama.cpp's default (llama-cli, llama-server), so the same flags sample alike


def sampling_params(temp: float, top_k: int, top_p: float, seed: int | None, min_p: float = MIN_P) -> SamplingParams:
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)  # recorded in --json so a sampled run can be repeated
    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
