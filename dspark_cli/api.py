"""The public API: load a draft/target pair once, then generate from it. The CLI commands stand on it (and
the server and the benchmark are meant to), so there is one path from a prompt to events.

    import dspark_cli as dspark

    with dspark.load() as pair:                      # the demo pair; target=, draft=, pair=, ... as the CLI
        for ev in pair.generate("Why is the sky blue?", max_tokens=64):
            print(ev.text, end="", flush=True)
        r = pair.complete([{"role": "user", "content": "2+2?"}], max_tokens=8, temperature=0)
        print(r.text, r.finish_reason, r.stats.tokens_per_second, r.stats.acceptance_rate)

A prompt is a string (the target's chat template is applied, as `dspark run` does; `raw=True` sends it as is)
or a list of chat messages. Consecutive calls whose prompt extends the previous one (a conversation resent
with one more message) reuse both models' KV caches: only the new tokens are processed. Every failure is a
`DsparkError` subclass with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .engine import DEFAULT_DRAFT_MAX, Event, generate as _generate
from .errors import UsageError
from .loader import Loaded, ModelOptions, load as _load_models
from .model import Model
from .prompt import ChatTemplate, Continuation, tokenize_prompt
from .sampling import SamplingParams
from .stats import GenerationStats

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class Result:
    """A whole answer: its text and tokens, why it ended, and its figures."""

    text: str
    tokens: list[int]
    finish_reason: str | None  # "stop", "length", "context"
    stats: GenerationStats


class Pair:
    """A loaded target with its drafter (a draft model, prompt lookup, both, or none). Not thread-safe: one
    generation at a time (the models' KV caches are its state)."""

    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.template = ChatTemplate(loaded.target)
        self._continuation = Continuation(loaded.target)
        self._active = None  # the generation under way, closed before the models are

    # ---- what was loaded ------------------------------------------------------------------------------
    @property
    def target(self) -> Model:
        return self._loaded.target

    @property
    def draft_model(self) -> Model | None:
        return self._loaded.draft_model

    @property
    def drafter(self):
        return self._loaded.drafter

    @property
    def target_path(self) -> Path:
        return self._loaded.target_path

    @property
    def draft_path(self) -> Path | None:
        return self._loaded.draft_path

    @property
    def method(self) -> str:
        """"target" (alone), "draft", "lookup" or "hybrid" (the draft model and prompt lookup)."""
        return self.drafter.name if self.drafter is not None else "target"

    # ---- prompts --------------------------------------------------------------------------------------
    def prompt_text(self, prompt: str | Sequence[Message], *, raw: bool = False, system: str | None = None) -> str:
        """The text the target sees: the chat template applied to the messages (or to one user message)."""
        if isinstance(prompt, str):
            if raw:
                if system:
                    raise UsageError("a system prompt needs the chat template; drop raw=True or the system prompt")
                return prompt
            messages: list[Message] = [{"role": "user", "content": prompt}]
        else:
            if raw:
                raise UsageError("raw=True takes a string prompt, not chat messages")
            messages = _checked_messages(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        return self.template.render(messages)

    def tokens(self, prompt: str | Sequence[Message], *, raw: bool = False, system: str | None = None) -> list[int]:
        """The prompt's token ids; when it extends the previous call's prompt and answer, that part's tokens are
        the very ones in the caches (re-tokenizing a conversation does not always give them back)."""
        text = self.prompt_text(prompt, raw=raw, system=system)
        if raw:
            return tokenize_prompt(self.target, text)
        return self._continuation.tokens_for(text)[0]

    # ---- generating -----------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[Message], *, max_tokens: int = 512, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.05, seed: int | None = None,
                 stop: Sequence[str] = (), raw: bool = False, system: str | None = None,
                 draft_max: int = DEFAULT_DRAFT_MAX, fixed: bool = False) -> Iterator[Event]:
        """The answer as events (token, text, from_draft, stats; the last one has finish_reason). Greedy
        (temperature 0) gives the target's own output, token for token; sampled, the target's own output for
        that seed. Sampling filters run in llama.cpp's order: top-k, top-p, min-p, then the temperature."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        text = self.prompt_text(prompt, raw=raw, system=system)
        tokens = tokenize_prompt(self.target, text) if raw else self._continuation.tokens_for(text)[0]
        return self._track(self._run(text, tokens, params, max_tokens=max_tokens, stop=tuple(stop),
                                     draft_max=draft_max, fixed=fixed, remember=not raw))

    def generate_tokens(self, tokens: list[int], *, params: SamplingParams, max_tokens: int = 512,
                        stop: Sequence[str] = (), draft_max: int = DEFAULT_DRAFT_MAX, fixed: bool = False,
                        method: str | None = None) -> Iterator[Event]:
        """The same from token ids the caller built (a chat keeping its own conversation state). `method`
        runs another drafter on the same models: "target" (alone), "draft", "lookup" or "hybrid"."""
        drafter = self.drafter if method is None else self._drafter_for(method)
        return self._track(_generate(self.target, tokens, drafter=drafter, params=params, max_tokens=max_tokens,
                                     draft_max=draft_max, stop=tuple(stop), fixed=fixed))

    def _track(self, events: Iterator[Event]) -> Iterator[Event]:
        if self._active is not None:
            self._active.close()  # one generation at a time: a new one ends an abandoned one
        self._active = events
        return events

    def _drafter_for(self, method: str):
        from .drafters import HybridDrafter, ModelDrafter, PromptLookupDrafter

        if method == "target":
            return None
        if method == "lookup":
            return PromptLookupDrafter()
        if method in ("draft", "hybrid"):
            if self.draft_model is None:
                raise UsageError(f"method {method!r} needs a draft model; load one or use 'lookup'")
            p_min = getattr(self.drafter, "p_min", 0.0)
            return (HybridDrafter if method == "hybrid" else ModelDrafter)(self.draft_model, p_min=p_min)
        raise UsageError(f"unknown method {method!r}: choose from target, draft, lookup, hybrid")

    def _run(self, text, tokens, params, *, max_tokens, stop, draft_max, fixed, remember) -> Iterator[Event]:
        answer: list[int] = []
        pieces: list[str] = []
        events = _generate(self.target, tokens, drafter=self.drafter, params=params, max_tokens=max_tokens,
                           draft_max=draft_max, stop=stop, fixed=fixed)
        try:
            for ev in events:
                if ev.token is not None:
                    answer.append(ev.token)
                pieces.append(ev.text)
                yield ev
        finally:
            events.close()  # trims both caches to what was yielded
            if remember:
                self._continuation.remember(text, tokens, "".join(pieces), answer)

    def complete(self, prompt: str | Sequence[Message], **options) -> Result:
        """The whole answer at once; the same options as generate."""
        tokens: list[int] = []
        pieces: list[str] = []
        last = None
        for ev in self.generate(prompt, **options):
            if ev.token is not None:
                tokens.append(ev.token)
            pieces.append(ev.text)
            last = ev
        return Result("".join(pieces), tokens, last.finish_reason, last.stats)

    # ---- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._active is not None:
            self._active.close()  # its finally trims the caches: it must run while the models exist
            self._active = None
        self._loaded.close()

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked_messages(messages: Sequence[Message]) -> list[Message]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise UsageError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise UsageError("no messages")
    return out


def load(target: str | None = None, draft: str | None = None, pair: str | None = None, *, ctx_size: int = 4096,
         n_gpu_layers: int | None = None, n_gpu_layers_draft: int | None = None, threads: int | None = None,
         draft_p_min: float = 0.0, lookup: bool = True, pull: bool = False, offline: bool = False,
         force: bool = False, rpc: str | None = None, rpc_draft: str | None = None,
         tensor_split: str | None = None, quiet: bool = False) -> Pair:
    """Load a target and its drafter, as the CLI's model options do.

    target, draft: a GGUF path, "org/repo:file.gguf", "org/repo:QUANT" or a registry name; draft may also be
    "lookup" (prompt lookup, no second model) or "none" (the target alone). With neither, the built-in demo
    pair. pair: a registry pair name, setting both. ctx_size: context in tokens (prompt + answer).
    n_gpu_layers / n_gpu_layers_draft: layers offloaded (None: all when llama.cpp has a GPU backend).
    threads: CPU threads (None: the physical cores). draft_p_min: greedy drafting stops below this top
    probability. lookup: with a draft model, use prompt-lookup matches too (the hybrid). pull: download
    models not in the cache; offline: the cache only. force: skip the memory preflight. rpc / rpc_draft:
    "HOST:PORT,..." llama.cpp RPC servers for the target's / the draft's layers; tensor_split: "3,1", the
    devices' shares of the target. quiet: no status line on stderr.
    """
    opts = ModelOptions(target=target, draft=draft, pair=pair, ctx_size=ctx_size, n_gpu_layers=n_gpu_layers,
                        n_gpu_layers_draft=n_gpu_layers_draft, threads=threads, draft_p_min=draft_p_min,
                        lookup=lookup, pull=pull, offline=offline, force=force, rpc=rpc, rpc_draft=rpc_draft,
                        tensor_split=tensor_split)
    return open_pair(opts, quiet=quiet)


def open_pair(opts: ModelOptions, *, quiet: bool = False) -> Pair:
    """load() from ModelOptions (what the CLI's shared options build)."""
    return Pair(_load_models(opts, quiet=quiet))
