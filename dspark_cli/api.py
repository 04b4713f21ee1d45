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

import threading
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Iterator, Sequence

from . import arguments as check
from .engine.batch import Job, Scheduler
from .engine.drafters import METHOD_TARGET, make_drafter
from .engine.loop import DEFAULT_DRAFT_MAX, Event, check_limits, check_prompt, generate as _generate
from .errors import ContextFullError, UsageError
from .loader import DEFAULT_MEMORY_MB, Loaded, ModelOptions, load as _load_models
from .llama.backend import release_workers
from .llama.model import Model
from .prompt import ChatTemplate, Continuation, Rendered, min_tokens, tokenize_prompt
from .steplog import StepLog
from .engine.sampling import DEFAULT_MIN_P, SamplingParams
from .engine.stats import GenerationStats

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

CLOSED = "the pair is closed"
SUPERSEDED = ("this generation was ended by a newer one on the same pair (a Pair runs one generation at a time: "
              "finish or close one before starting the next, or use complete() from several threads)")


@dataclass
class Result:
    """A whole answer: its text and tokens, why it ended, and its figures."""

    text: str
    tokens: list[int]
    finish_reason: str | None  # "stop", "length", "context"
    stats: GenerationStats


class Generation:
    """The events of one generation (what Pair.generate returns): an iterator, closed by close() or when the
    pair starts another generation (one at a time, unless the pair was loaded with parallel > 1) or closes.
    Iterating it after that raises a DsparkError instead of yielding nothing, so an answer is never cut short
    in silence."""

    def __init__(self, pair: "Pair", events: Iterator[Event], lock=None):
        self._pair = pair
        self._events = events
        self._ended: str | None = None  # why it was ended from outside
        self._lock = lock if lock is not None else pair._step  # batched generations step on their own

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> Event:
        with self._lock:  # one step at a time, whichever thread asks
            if self._ended is not None:
                raise UsageError(self._ended)
            return next(self._events)

    def close(self) -> None:
        with self._lock:
            self._events.close()  # its finally trims both caches to what was yielded (batched: frees its slot)

    def _end(self, why: str) -> None:  # with the pair's step lock held
        self._events.close()
        self._ended = why


class Pair:
    """A loaded target with its drafter (a draft model, prompt lookup, both, or none). Loaded as usual (parallel
    1) it runs one generation at a time (the models' KV caches are its state): complete() calls from several
    threads take turns; a new generation ends one left unfinished, whose next step then raises a DsparkError.
    Loaded with parallel=N, up to N generations run at once, batched together by one scheduler thread
    (engine/batch.py), each exactly what it would be alone; more wait their turn in arrival order. After close()
    every call raises a DsparkError."""

    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.template = ChatTemplate(loaded.target)
        self.parallel = loaded.target.n_seq
        self._continuation = Continuation(loaded.target, keep=self.parallel)
        self._scheduler = (Scheduler(loaded.target, loaded.drafter, verify_max=loaded.verify_max,
                                     exact=loaded.exact_label, step_log=StepLog.from_environment())
                           if self.parallel > 1 else None)
        self._active: Generation | None = None  # the generation under way, closed before the models are
        self._closed = False
        self._turns = threading.RLock()  # held by complete() for a whole answer: callers take turns
        self._step = threading.RLock()  # held for each step of a generation, and to start or end one

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
        return self.drafter.name if self.drafter is not None else METHOD_TARGET

    # ---- prompts --------------------------------------------------------------------------------------
    def prompt_text(self, prompt: str | Sequence[Message], *, raw: bool = False, system: str | None = None) -> str:
        """The text the target sees: the chat template applied to the messages (or to one user message)."""
        return self._render(prompt, raw, system).text

    def tokens(self, prompt: str | Sequence[Message], *, raw: bool = False, system: str | None = None) -> list[int]:
        """The prompt's token ids; when it extends the previous call's prompt and answer, that part's tokens are
        the very ones in the caches (re-tokenizing a conversation does not always give them back)."""
        with self._step:
            rendered = self._render(prompt, raw, system)
            return self._tokens(rendered, raw)

    def _render(self, prompt, raw, system) -> Rendered:
        """The prompt checked (types, valid text, what cannot fit the context) and rendered. Message text is
        plain text: only the template writes control tokens (see prompt.py); a raw prompt's are parsed."""
        self._check_open()
        raw = check.flag("raw", raw)
        system = check.text("system", system, optional=True)
        if isinstance(prompt, str):
            check.valid_unicode("the prompt", prompt)
            if raw:
                if system:
                    raise UsageError("a system prompt needs the chat template; drop raw=True or the system prompt")
                self._check_size([prompt], 1)
                return Rendered(prompt)
            messages: list[Message] = [{"role": "user", "content": prompt}]
        else:
            if raw:
                raise UsageError("raw=True takes a string prompt, not chat messages")
            messages = check.messages(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
        self._check_size([m["content"] for m in messages], len(messages))
        return self.template.render(messages)

    def _check_size(self, texts: list[str], n_messages: int) -> None:
        """What is cheap to check before the template and the tokenizer see a prompt: every message costs at
        least a token, and text at least its bytes over the longest token's (so a paste of megabytes or 50,000
        messages is refused at once, not after the tokenizer has worked through it)."""
        n_ctx = self.target.n_ctx
        if n_messages >= n_ctx:
            raise ContextFullError(f"the prompt has {n_messages} messages; the context holds {n_ctx} tokens",
                              hint="send fewer messages or raise --ctx-size")
        at_least = min_tokens(self.target, "".join(texts))
        if at_least >= n_ctx:
            raise ContextFullError(f"the prompt is at least {at_least} tokens but the context holds {n_ctx}",
                              hint="shorten the prompt or raise --ctx-size")

    def _tokens(self, rendered: Rendered, raw: bool) -> list[int]:
        if raw:
            return tokenize_prompt(self.target, rendered.text)
        return self._continuation.tokens_for(rendered)[0]

    # ---- generating -----------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[Message], *, max_tokens: int = 512, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = DEFAULT_MIN_P, seed: int | None = None,
                 stop: str | Sequence[str] = (), raw: bool = False, system: str | None = None,
                 draft_max: int = DEFAULT_DRAFT_MAX, fixed: bool = False) -> Generation:
        """The answer as events (token, text, from_draft, stats; the last one has finish_reason). Greedy
        (temperature 0) gives the target's own output, token for token; sampled, the target's own output for
        that seed. Sampling filters run in llama.cpp's order: top-k, top-p, min-p, then the temperature.
        Everything about the request is checked here, before the first event: a bad argument, invalid text
        or a prompt too long for the context raise a DsparkError from this call."""
        params = SamplingParams(temperature=check.number("temperature", temperature),
                                top_k=check.integer("top_k", top_k), top_p=check.number("top_p", top_p),
                                min_p=check.number("min_p", min_p), seed=check.integer("seed", seed, optional=True))
        max_tokens = check.integer("max_tokens", max_tokens)
        draft_max = check.integer("draft_max", draft_max)
        check_limits(max_tokens, draft_max)
        stop = check.stop_strings(stop)
        fixed = check.flag("fixed", fixed)
        if self._scheduler is not None:
            with self._step:  # the template, the tokenizer and the remembered conversations, one caller at a time
                rendered = self._render(prompt, raw, system)
                tokens = self._tokens(rendered, raw)
                check_prompt(self.target, tokens)
            return self._submit(rendered.text, tokens, params, max_tokens=max_tokens, stop=stop,
                                draft_max=draft_max, fixed=fixed, remember=not raw)
        with self._turns, self._step:
            rendered = self._render(prompt, raw, system)
            tokens = self._tokens(rendered, raw)
            check_prompt(self.target, tokens)
            return self._start(self._run(rendered.text, tokens, params, max_tokens=max_tokens, stop=stop,
                                         draft_max=draft_max, fixed=fixed, remember=not raw))

    def generate_tokens(self, tokens: list[int], *, params: SamplingParams, max_tokens: int = 512,
                        stop: Sequence[str] = (), draft_max: int = DEFAULT_DRAFT_MAX, fixed: bool = False,
                        method: str | None = None) -> Generation:
        """The same from token ids the caller built (a chat keeping its own conversation state). `method`
        runs another drafter on the same models: "target" (alone), "draft", "lookup" or "hybrid"."""
        if self._scheduler is not None:
            self._check_open()
            if method is not None and method != self.method:
                raise UsageError(f"a pair loaded with parallel > 1 generates with its own drafter ({self.method}), "
                                 f"not {method!r}")
            check_prompt(self.target, tokens)
            return self._submit(None, list(tokens), params, max_tokens=max_tokens, stop=tuple(stop),
                                draft_max=draft_max, fixed=fixed, remember=False)
        with self._turns, self._step:
            self._check_open()
            drafter = self.drafter if method is None else self._drafter_for(method)
            return self._start(_generate(self.target, tokens, drafter=drafter, params=params, max_tokens=max_tokens,
                                         draft_max=draft_max, stop=tuple(stop), fixed=fixed,
                                         profile=self._loaded.profile, **self._exactness(drafter)))

    def _start(self, events: Iterator[Event]) -> Generation:  # with the step lock held
        if self._active is not None:
            self._active._end(SUPERSEDED)  # one generation at a time: a new one ends an unfinished one
        self._active = Generation(self, events)
        return self._active

    def _exactness(self, drafter) -> dict:
        """The engine's verify bound and what its stats say about exactness, for a generation with `drafter`
        (a drafter the load did not prove for, asked for by method=, is said as unknown)."""
        return {"verify_max": self._loaded.verify_max,
                "exact": self._loaded.exact_label if self._loaded.exactness is not None else ""}

    @property
    def exact_label(self) -> str:
        """One line: "proven (batches <= 16)", "no - <which batch sizes differ, by how much>", or the target alone."""
        return self._loaded.exact_label

    @property
    def exactness(self):
        """The proof's verdict for this target here (llama.proof.Verdict: .proven, .bound, .label, .differ), or
        None when nothing was proven: the target was loaded to run alone, one generation at a time."""
        return self._loaded.exactness

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(CLOSED)

    def _drafter_for(self, method: str):
        drafter = self.drafter
        return make_drafter(method, self.draft_model, getattr(drafter, "p_min", 0.0),
                            memory=getattr(drafter, "memory", None),  # (one memory per pair)
                            through_text_for=self.target if drafter is not None and drafter.through_text else None)

    def _run(self, text, tokens, params, *, max_tokens, stop, draft_max, fixed, remember) -> Iterator[Event]:
        answer: list[int] = []
        pieces: list[str] = []
        events = _generate(self.target, tokens, drafter=self.drafter, params=params, max_tokens=max_tokens,
                           draft_max=draft_max, stop=stop, fixed=fixed, profile=self._loaded.profile,
                           **self._exactness(self.drafter))
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

    def _submit(self, text, tokens, params, *, max_tokens, stop, draft_max, fixed, remember) -> Generation:
        """A generation the scheduler batches with the others under way."""
        job = Job(tokens, params, max_tokens, tuple(stop), draft_max, fixed=fixed)
        self._scheduler.submit(job)

        def events() -> Iterator[Event]:
            answer: list[int] = []
            pieces: list[str] = []
            try:
                for ev in job.events():
                    if ev.token is not None:
                        answer.append(ev.token)
                    pieces.append(ev.text)
                    yield ev
            finally:
                if not job.finished:
                    self._scheduler.cancel(job)  # its slot is freed, its caches trimmed, at the next step
                if remember:
                    with self._step:
                        if not self._closed:  # (closed: the models are gone, and so is what they held)
                            self._continuation.remember(text, tokens, "".join(pieces), answer)

        return Generation(self, events(), lock=threading.RLock())

    def complete(self, prompt: str | Sequence[Message], **options) -> Result:
        """The whole answer at once; the same options as generate. Calls from several threads take turns (with
        parallel > 1, they run at once, batched)."""
        if self._scheduler is not None:
            return self._collect(self.generate(prompt, **options))
        with self._turns:
            return self._collect(self.generate(prompt, **options))

    @staticmethod
    def _collect(generation: Generation) -> Result:
        tokens: list[int] = []
        pieces: list[str] = []
        last = None
        for ev in generation:
            if ev.token is not None:
                tokens.append(ev.token)
            pieces.append(ev.text)
            last = ev
        return Result("".join(pieces), tokens, last.finish_reason, last.stats)

    # ---- the caches between requests ------------------------------------------------------------------
    def settle(self) -> int:
        """Re-process the last answer's tokens in the target's cache as a prompt batch (at most one batch), so
        that a next prompt extending the conversation processes only its new tokens and still gets exactly a
        fresh run's answer (see Model.prompt_plan). Worth calling while idle (a chat waiting for its user);
        otherwise the next prompt does it. Returns the tokens processed. A pair with parallel > 1 does this by
        itself whenever it is idle."""
        with self._turns, self._step:
            self._check_open()
            if self._scheduler is not None:
                return 0
            try:
                return self.target.settle()
            finally:
                release_workers()  # as a generation does (engine/loop.py): the next call may be another thread's

    @property
    def settling(self) -> int:
        """Slots whose cached answer is still to be settled (parallel > 1; the scheduler does it while idle)."""
        return self._scheduler.settling if self._scheduler is not None else 0

    # ---- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free both models. A generation under way is ended first (its caches trimmed while the models
        exist); any later call on the pair, or on a generation of it, raises a DsparkError."""
        if self._scheduler is not None:
            self._scheduler.close(CLOSED)  # every batched generation ends with UsageError(CLOSED)
        with self._turns, self._step:
            if self._closed:
                return
            if self._active is not None:
                self._active._end(CLOSED)
                self._active = None
            self._closed = True
            self._loaded.close()

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(target: str | PathLike | None = None, draft: str | PathLike | None = None, pair: str | None = None, *,
         ctx_size: int = 4096,
         n_gpu_layers: int | None = None, n_gpu_layers_draft: int | None = None, threads: int | None = None,
         draft_p_min: float = 0.0, lookup: bool = True, pull: bool = False, offline: bool = False,
         force: bool = False, rpc: str | None = None, rpc_draft: str | None = None,
         tensor_split: str | None = None, parallel: int = 1, draft_as_is: bool = False, profile: bool = True,
         exact: bool = False, memory_mb: int = DEFAULT_MEMORY_MB, draft_cache: str | PathLike | None = None,
         quiet: bool = False) -> Pair:
    """Load a target and its drafter, as the CLI's model options do.

    target, draft: a GGUF path, "org/repo:file.gguf", "org/repo:QUANT" or a registry name; draft may also be
    "lookup" (prompt lookup, no second model) or "none" (the target alone). With neither, the built-in demo
    pair. pair: a registry pair name, setting both. ctx_size: context in tokens (prompt + answer).
    n_gpu_layers / n_gpu_layers_draft: layers offloaded (None: all when llama.cpp has a GPU backend).
    threads: CPU threads (None: the physical cores). draft_p_min: greedy drafting stops below this top
    probability. lookup: with a draft model, use prompt-lookup matches too (the hybrid). pull: download
    models not in the cache; offline: the cache only. force: skip the memory preflight. rpc / rpc_draft:
    "HOST:PORT,..." llama.cpp RPC servers for the target's / the draft's layers; tensor_split: "3,1", the
    devices' shares of the target. parallel: generations at once, batched together (each exactly what it would
    be alone; each with ctx_size tokens of its own); with 1, one at a time. draft_as_is: load the draft file as it
    is (by default, on the CPU, a copy re-encoded in a layout measured faster here is derived once and used).
    profile: start the cost model from what earlier runs measured on this machine and add this one's (False: learn
    from nothing, store nothing). exact: speculate only with verify batches the proof at load found bit-identical to
    one-token decoding here (the target alone where none is); Pair.exactness says what it found either way.
    memory_mb: the drafting memory's bound: the pair drafts from its own earlier answers too, where that pays (0: off).
    draft_cache: a file the memory is read from now and saved to at close() (None: this process's answers only).
    quiet: no status line on stderr. A wrong type or value is a UsageError.
    """
    opts = ModelOptions(
        target=check.model_ref("target", target), draft=check.model_ref("draft", draft),
        pair=check.text("pair", pair, optional=True), ctx_size=check.integer("ctx_size", ctx_size),
        n_gpu_layers=check.integer("n_gpu_layers", n_gpu_layers, optional=True),
        n_gpu_layers_draft=check.integer("n_gpu_layers_draft", n_gpu_layers_draft, optional=True),
        threads=check.integer("threads", threads, optional=True), draft_p_min=check.number("draft_p_min", draft_p_min),
        lookup=check.flag("lookup", lookup), pull=check.flag("pull", pull), offline=check.flag("offline", offline),
        force=check.flag("force", force), rpc=check.text("rpc", rpc, optional=True),
        rpc_draft=check.text("rpc_draft", rpc_draft, optional=True),
        tensor_split=check.text("tensor_split", tensor_split, optional=True),
        parallel=check.integer("parallel", parallel), draft_as_is=check.flag("draft_as_is", draft_as_is),
        profile=check.flag("profile", profile), exact=check.flag("exact", exact),
        memory_mb=check.integer("memory_mb", memory_mb),
        draft_cache=check.path("draft_cache", draft_cache))
    return open_pair(opts, quiet=check.flag("quiet", quiet))


def open_pair(opts: ModelOptions, *, quiet: bool = False) -> Pair:
    """load() from ModelOptions (what the CLI's shared options build)."""
    return Pair(_load_models(opts, quiet=quiet))
