"""Options shared by run, chat and bench, declared once so the commands stay alike."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..loader import DEFAULT_MEMORY_MB, ModelOptions
from ..engine.sampling import DEFAULT_MIN_P, SamplingParams

MODELS = "Models"
SAMPLING = "Sampling"

Target = Annotated[Optional[str], typer.Option("--target", "-m", help="Target model: a GGUF path, org/repo:file.gguf, org/repo:QUANT or a registry name. Default: the built-in demo pair.", rich_help_panel=MODELS)]
Draft = Annotated[Optional[str], typer.Option("--draft", "-d", help="Draft model (same forms as --target), 'lookup' for prompt lookup (no second model), or 'none' for the target alone.", rich_help_panel=MODELS)]
Pair = Annotated[Optional[str], typer.Option("--pair", help="A registry pair name: sets both --target and --draft (see `dspark models`).", rich_help_panel=MODELS)]
DraftMax = Annotated[int, typer.Option("--draft-max", help="Most tokens drafted per target step (at most 15 on the CPU); the cost model picks how many pay (0 included) up to this.", rich_help_panel=MODELS)]
DraftFixed = Annotated[bool, typer.Option("--draft-fixed", help="Draft exactly --draft-max tokens (at most 15 on the CPU) every step (no cost model): the longest lookup or memory offer, the draft model going on from it.", rich_help_panel=MODELS)]
NoLookup = Annotated[bool, typer.Option("--no-lookup", help="With a draft model, draft from it alone (by default prompt-lookup matches are used too when they pay).", rich_help_panel=MODELS)]
DraftPMin = Annotated[float, typer.Option("--draft-p-min", help="Greedy drafting stops when the draft's top probability falls below this (0 = never).", rich_help_panel=MODELS)]
CtxSize = Annotated[int, typer.Option("--ctx-size", "-c", help="Context size in tokens (prompt + answer).", rich_help_panel=MODELS)]
GpuLayers = Annotated[Optional[int], typer.Option("--n-gpu-layers", "-ngl", help="Target layers to offload to the GPU (default: all when llama.cpp has a GPU backend).", rich_help_panel=MODELS)]
GpuLayersDraft = Annotated[Optional[int], typer.Option("--n-gpu-layers-draft", "-ngld", help="Draft layers to offload to the GPU (default: as for the target).", rich_help_panel=MODELS)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: physical cores). With a GPU backend only the layers left on the CPU use them.", rich_help_panel=MODELS)]
Pull = Annotated[bool, typer.Option("--pull", help="Download models that are not cached yet.", rich_help_panel=MODELS)]
Offline = Annotated[bool, typer.Option("--offline", help="Use the local cache only (like HF_HUB_OFFLINE=1).", rich_help_panel=MODELS)]
Rpc = Annotated[Optional[str], typer.Option("--rpc", help="Put the target's layers on llama.cpp RPC servers (HOST:PORT,...; see `dspark rpc-server`), with this machine's GPUs if any.", rich_help_panel=MODELS, show_default=False)]
RpcDraft = Annotated[Optional[str], typer.Option("--rpc-draft", help="The same for the draft model (by default it stays on this machine).", rich_help_panel=MODELS, show_default=False)]
TensorSplit = Annotated[Optional[str], typer.Option("--tensor-split", help="Each device's share of the target's layers, e.g. 3,1: the --rpc servers in order, then this machine's GPUs (default: by free memory).", rich_help_panel=MODELS, show_default=False)]
DraftAsIs = Annotated[bool, typer.Option("--draft-as-is", help="Load the draft file as it is. By default dspark derives, once per build, a copy of the draft in a layout this machine steps faster, and uses that.", rich_help_panel=MODELS)]
Exact = Annotated[bool, typer.Option("--exact", help="Speculate only with verify batches proven bit-identical to one-token decoding on this build and device (the target alone where none is); by default speculation runs either way and says when it is not proven.", rich_help_panel=MODELS)]
DraftMemory = Annotated[int, typer.Option("--draft-memory", help="MB for the drafting memory: earlier answers of this process drafted from when they match what is being written (free to draft; used when it pays). 0 = off.", rich_help_panel=MODELS)]
DraftCache = Annotated[Optional[str], typer.Option("--draft-cache", help="Keep the drafting memory in this file: read at start, saved at exit, so later runs draft from earlier ones' answers (off by default; a bad file is ignored with a warning).", rich_help_panel=MODELS, show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Load even if the memory preflight says it will not fit.", rich_help_panel=MODELS)]

Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 = greedy (bench's default; run and chat sample at 0.8 with top-k 40, top-p 0.95, min-p 0.05, as llama.cpp does). Either way the output is the target's own (sampled: for this --seed).", rich_help_panel=SAMPLING)]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off). Filters run in llama.cpp's order: top-k, top-p, min-p, then the temperature.", rich_help_panel=SAMPLING)]
TopP = Annotated[float, typer.Option("--top-p", help="Keep the smallest set of tokens with this much probability (1 = off).", rich_help_panel=SAMPLING)]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below this fraction of the top token's probability (0 = off). The default, 0.05, is llama.cpp's.", rich_help_panel=SAMPLING)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed; the same seed repeats a sampled run exactly.", rich_help_panel=SAMPLING)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.", rich_help_panel=SAMPLING)]



# The shared options, each declared once: (parameter name, its Typer annotation, default).
MODEL_OPTIONS = [
    ("target", Target, None), ("draft", Draft, None), ("pair", Pair, None), ("draft_p_min", DraftPMin, 0.0),
    ("no_lookup", NoLookup, False), ("ctx_size", CtxSize, 4096), ("n_gpu_layers", GpuLayers, None),
    ("n_gpu_layers_draft", GpuLayersDraft, None), ("threads", Threads, None), ("pull", Pull, False),
    ("offline", Offline, False), ("force", Force, False), ("rpc", Rpc, None), ("rpc_draft", RpcDraft, None),
    ("tensor_split", TensorSplit, None), ("draft_as_is", DraftAsIs, False), ("exact", Exact, False),
    ("draft_memory", DraftMemory, DEFAULT_MEMORY_MB), ("draft_cache", DraftCache, None),
]
SAMPLING_OPTIONS = [("temp", Temp, 0.0), ("top_k", TopK, 0), ("top_p", TopP, 1.0), ("min_p", MinP, DEFAULT_MIN_P)]
# What a person reading the answer gets by default (run, chat): the sampling llama.cpp's and Ollama's users know,
# temperature 0.8 with top-k 40, top-p 0.95 and min-p 0.05, the seed printed so a run can be repeated (and the
# output still exactly the target's for that seed). Greedy decoding loops on small models, and the built-in demo
# is one. bench (speedup figures) and serve (its clients choose) stay greedy by default.
READING_SAMPLING = {"temp": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def shared_options(fn=None, *, sampling: dict | None = None):
    """A command taking the shared model and sampling options once, as `models: ModelOptions` and
    `sampling: SamplingParams` (its seed is the command's own `seed` option, or drawn at random and recorded).
    The options are checked before the command runs, so before any model is loaded. `sampling`: the command's
    own sampling defaults by option name (READING_SAMPLING), else greedy. Use as @shared_options or
    @shared_options(sampling=...)."""
    if fn is None:
        return lambda f: shared_options(f, sampling=sampling)
    import functools
    import inspect

    sampling_options = [(name, annotation, (sampling or {}).get(name, default))
                        for name, annotation, default in SAMPLING_OPTIONS]

    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("models", "sampling")]

    def declared(options):
        return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                for name, annotation, default in options]

    @functools.wraps(fn)
    def command(**kw):
        m = {name: kw.pop(name) for name, _, _ in MODEL_OPTIONS}
        opts = ModelOptions(target=m["target"], draft=m["draft"], pair=m["pair"], ctx_size=m["ctx_size"],
                            n_gpu_layers=m["n_gpu_layers"], n_gpu_layers_draft=m["n_gpu_layers_draft"],
                            threads=m["threads"], draft_p_min=m["draft_p_min"], lookup=not m["no_lookup"],
                            pull=m["pull"], offline=m["offline"], force=m["force"], rpc=m["rpc"],
                            rpc_draft=m["rpc_draft"], tensor_split=m["tensor_split"], draft_as_is=m["draft_as_is"],
                            exact=m["exact"], memory_mb=m["draft_memory"], draft_cache=m["draft_cache"])
        opts.validate()
        s = {name: kw.pop(name) for name, _, _ in SAMPLING_OPTIONS}
        sampling = sampling_params(s["temp"], s["top_k"], s["top_p"], kw.get("seed"), s["min_p"])
        return fn(models=opts, sampling=sampling, **kw)

    params = declared(MODEL_OPTIONS) + own + declared(sampling_options)  # the order of --help
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # Typer must see this signature, not the function's own
    return command


def sampling_params(temp: float, top_k: int, top_p: float, seed: int | None, min_p: float = DEFAULT_MIN_P) -> SamplingParams:
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)  # recorded in --json so a sampled run can be repeated
    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
