"""dspark: faster local LLM answers with lossless speculative decoding (a small GGUF draft model and a large
GGUF target through llama.cpp).

The library's whole public surface is here:

    import dspark_cli as dspark
    with dspark.load() as pair:                      # target=, draft=, pair=, ctx_size=, ... as the CLI
        for ev in pair.generate("Why is the sky blue?", max_tokens=64):
            print(ev.text, end="", flush=True)
        r = pair.complete([{"role": "user", "content": "2+2?"}], max_tokens=8, temperature=0)
        print(r.text, r.finish_reason, r.stats.tokens_per_second, r.stats.acceptance_rate)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so `import dspark_cli` (and the CLI's start-up) does not load llama.cpp for nothing.
_PUBLIC = {
    "load": "api", "Pair": "api", "Result": "api", "Event": "engine.loop", "GenerationStats": "engine.stats",
    "SamplingParams": "engine.sampling", "DsparkError": "errors", "UsageError": "errors", "ModelFileError": "errors",
    "PairError": "errors", "PromptError": "errors", "DownloadError": "errors", "ResourceError": "errors",
    "OutputError": "errors", "Interrupted": "errors", "ContextFullError": "errors", "RemoteError": "errors",
    "Generation": "api", "Verdict": "llama.proof",
}
__all__ = ["load", "Pair", "Result", "Event", "GenerationStats", "SamplingParams", "DsparkError", "UsageError",
           "ModelFileError", "PairError", "PromptError", "DownloadError", "ResourceError", "OutputError",
           "Interrupted", "ContextFullError", "RemoteError", "Generation", "Verdict", "__version__"]

if TYPE_CHECKING:  # for editors and type checkers
    from .api import Generation, Pair, Result, load
    from .engine.loop import Event
    from .errors import (ContextFullError, DownloadError, DsparkError, Interrupted, ModelFileError, OutputError,
                         PairError, PromptError, RemoteError, ResourceError, UsageError)
    from .engine.sampling import SamplingParams
    from .engine.stats import GenerationStats


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dspark_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
