"""Where draft tokens come from: a small model of the same tokenizer, prompt lookup, or both (the hybrid,
what a user gets by default with a draft model: a lookup match when there is one, the model otherwise; the
cost model in engine/costs decides per round which pays). Any drafter may also hold a drafting memory
(engine/memory.py: what earlier generations wrote), a second free source beside lookup.

Every drafter has the same interface, so any engine can use any drafter. Drafted tokens are chosen with the
same sampling rule and noise as the target's own (sampling.pick), so a draft is accepted exactly when it is
what the target would have produced.
"""

from __future__ import annotations

from array import array

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..llama.model import Model
from .costs import SOURCE_LOOKUP, SOURCE_MEMORY, SOURCE_RESUMED
from .memory import DraftMemory
from .sampling import Noise, SamplingParams, pick


# The drafting methods, by the names users see (`bench --methods`, `generate_tokens(method=)`, stats.method).
METHOD_TARGET = "target"  # no drafter: the target alone
METHOD_DRAFT = "draft"  # the draft model alone (--no-lookup)
METHOD_LOOKUP = "lookup"  # prompt lookup, no second model
METHOD_HYBRID = "hybrid"  # the draft model and prompt lookup: what a user gets with a draft model
METHODS = (METHOD_HYBRID, METHOD_DRAFT, METHOD_LOOKUP)
WITH_MEMORY = "+memory"  # a method with the drafting memory, as `bench --methods hybrid+memory` names it


def split_method(name: str) -> tuple[str, bool]:
    """A method name as bench names variants: (the method, whether it drafts from the memory too)."""
    return (name[: -len(WITH_MEMORY)], True) if name.endswith(WITH_MEMORY) else (name, False)


@dataclass
class Draft:
    tokens: list[int]
    steps: int = 0  # draft-model decode calls spent on it
    seconds: float = 0.0  # draft-model time spent on those steps (catch-up excluded)
    own: list[int] = field(default_factory=list)  # a draft of another vocabulary: its own tokens (through_text.py)


class Drafter(Protocol):
    """`model` is the draft model (None for prompt lookup alone); `lookup` whether prompt lookup is on;
    `memory` the drafting memory (None: off)."""

    name: str
    model: Model | None
    lookup: bool
    memory: DraftMemory | None

    def prepare(self, seq: list[int], n_vocab: int) -> int:
        """Before generation, with the prompt and the target's vocabulary size: returns the prompt tokens the
        draft model processed."""

    def catch_up(self, seq: list[int]) -> tuple[int, float]:
        """Bring the draft model's cache up to seq[:-1]: (tokens processed, seconds). (0, 0.0) without one."""

    def behind(self, seq: list[int]) -> int:
        """Tokens of seq[:-1] the draft model has yet to process."""

    def rewind(self, seq: list[int], window: int) -> int:
        """Let the draft model catch up on at most the last `window` tokens of seq (see ModelDrafter): returns the
        tokens it is then behind."""

    def extend(self, seq: list[int], ahead: Draft, params: SamplingParams, noise: Noise) -> bool:
        """Draft one more token after seq + ahead.tokens into `ahead` (one model step). False when there is
        nothing more to draft (no model, an end token)."""

    def offers(self, seq: list[int], n_max: int) -> dict[str, list[int]]:
        """What the free sources propose after seq, at most n_max tokens each: {SOURCE_LOOKUP: prompt lookup's
        match, SOURCE_MEMORY: the memory's recall, or SOURCE_RESUMED: its resume where recall has nothing}, the ones
        that are off or match nothing left out."""

    def release(self, seq: list[int], n_prompt: int) -> None:
        """Generation ended with `seq` accepted (its first n_prompt tokens the prompt): drop any state past it,
        and remember it in the drafting memory."""


class FreeSources:
    """Prompt lookup and the drafting memory, the drafts that cost nothing to make (every drafter has them)."""

    lookup = False
    memory: DraftMemory | None = None
    ngram_max, ngram_min = 4, 2
    through_text = False  # a draft model of another vocabulary (engine/through_text.py)

    def offers(self, seq: list[int], n_max: int) -> dict[str, list[int]]:
        out = {}
        if n_max > 0:
            if self.lookup:
                out[SOURCE_LOOKUP] = lookup(seq, n_max, self.ngram_max, self.ngram_min)
            if self.memory is not None:
                # An unbroken match first; only without one, the weaker evidence across a differing stretch.
                out[SOURCE_MEMORY] = self.memory.recall(seq, n_max)
                if not out[SOURCE_MEMORY]:
                    out[SOURCE_RESUMED] = self.memory.resume(seq, n_max)
        return {s: t for s, t in out.items() if t}

    @property
    def free(self) -> bool:
        """Whether any free source may offer drafts."""
        return self.lookup or self.memory is not None

    def remember(self, seq: list[int], n_prompt: int) -> None:
        if self.memory is not None:
            self.memory.add(seq, n_prompt)


def confident_top(logits: np.ndarray, p_min: float) -> int | None:
    """The most likely token, or None when its probability is under p_min (--draft-p-min: a token the draft is
    unsure of is likely rejected, and every rejected token costs verify-batch width on a CPU)."""
    tok = int(np.argmax(logits))
    if p_min <= 0.0:
        return tok
    p_top = 1.0 / float(np.exp(logits.astype(np.float64) - float(logits[tok])).sum())
    return tok if p_top >= p_min else None


class ModelDrafter(FreeSources):
    """A small model drafts autoregressively from its own KV cache. Between rounds only the tokens it has not
    seen are fed to it (usually the target's correction), never the whole verified batch again."""

    name = METHOD_DRAFT
    lookup = False

    def __init__(self, model: Model, p_min: float = 0.0):
        self.model = model
        # Greedy drafting stops early when the draft's top probability falls under p_min: a token it is
        # unsure of is likely rejected, and every rejected token costs verify-batch width on CPU.
        self.p_min = p_min
        self.n_shared = model.n_vocab  # ids both vocabularies have (see prepare)
        # Where in the sequence the draft model's cache starts: 0, or later after `rewind` (the model came back
        # after a long pause and caught up on the recent tokens only).
        self.start = 0

    def prepare(self, seq: list[int], n_vocab: int) -> int:
        # A padded draft vocabulary (more ids than the target's) drafts over the shared ids only: its extra ids
        # can never be accepted, and left in they would shift the draft's distribution (normalization, top-p,
        # min-p, the tail's aggregated draw) away from what the unpadded draft proposes for the same noise.
        self.n_shared = min(self.model.n_vocab, n_vocab)
        self.start = 0
        return self.catch_up(seq)[0]

    def rewind(self, seq: list[int], window: int) -> int:
        """When the model is more than `window` tokens behind seq, let its cache start `window` tokens before
        seq's last: catching up then costs `window` tokens, not every token written while it sat unused. Its
        drafts see less context (they may be accepted less, which the cost model measures); the output is the
        target's either way. Returns the tokens it is then behind."""
        behind = self.behind(seq)
        if behind > window:
            self.start = max(self.start, len(seq) - 1 - window)
            return self.behind(seq)
        return behind

    def _seen(self, seq: list[int]) -> list[int]:
        """seq as the draft model can take it: a target token past its vocabulary (a padded target's) stands
        in as token 0. Its draft goes on from a slightly different context; the target verifies anyway."""
        n = self.model.n_vocab
        return seq if not seq or max(seq) < n else [t if t < n else 0 for t in seq]

    def catch_up(self, seq: list[int]) -> tuple[int, float]:
        # All but the last token: the next `extend` evaluates that one and gets its logits.
        before, t0 = self.model.n_evaluated, time.perf_counter()
        self.model.sync(self._seen(seq[self.start:-1]), n_logits=0)
        return self.model.n_evaluated - before, time.perf_counter() - t0

    def behind(self, seq: list[int]) -> int:
        return max(0, len(seq) - 1 - self.start - self.model.common_prefix(self._seen(seq[self.start:])))

    def extend(self, seq: list[int], ahead: Draft, params: SamplingParams, noise: Noise) -> bool:
        if ahead.tokens and self.model.is_eog(ahead.tokens[-1]):
            return False
        t0 = time.perf_counter()
        logits = self.model.sync(self._seen(seq[self.start:] + ahead.tokens), n_logits=1)[0]
        tok = self.choose(logits, params, noise, len(seq) + len(ahead.tokens))
        ahead.steps += 1
        ahead.seconds += time.perf_counter() - t0
        if tok is None:
            return False
        ahead.tokens.append(tok)
        return True

    def choose(self, logits: np.ndarray, params: SamplingParams, noise: Noise, pos: int) -> int | None:
        """The draft token at position `pos` from the draft model's logits there (None: stop drafting, the
        model is unsure under --draft-p-min). The batched engine drafts through this too."""
        logits = logits[: self.n_shared]
        if params.greedy and self.p_min > 0.0:
            return confident_top(logits, self.p_min)
        return pick(logits, params, noise, pos)

    def seen(self, seq: list[int]) -> list[int]:
        """seq in the draft model's vocabulary (see _seen)."""
        return self._seen(seq)

    def release(self, seq: list[int], n_prompt: int) -> None:
        self.model.truncate(max(0, len(seq) - self.start))
        self.remember(seq, n_prompt)


class PromptLookupDrafter(FreeSources):
    """No second model: find the latest earlier occurrence of the last n tokens (n from ngram_max down to
    ngram_min) in the prompt and the text so far, and propose what followed it. Strong when the answer
    copies from the input (summaries, edits, code changes), free when it does not match."""

    name = METHOD_LOOKUP
    model = None
    lookup = True

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2):
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def prepare(self, seq: list[int], n_vocab: int) -> int:
        return 0

    def catch_up(self, seq: list[int]) -> tuple[int, float]:
        return 0, 0.0

    def rewind(self, seq: list[int], window: int) -> int:
        return 0

    def behind(self, seq: list[int]) -> int:
        return 0

    def extend(self, seq: list[int], ahead: Draft, params: SamplingParams, noise: Noise) -> bool:
        return False

    def release(self, seq: list[int], n_prompt: int) -> None:
        self.remember(seq, n_prompt)


class HybridDrafter(ModelDrafter):
    """The draft model and prompt lookup together: each round the cost model takes a lookup match when one
    pays (it costs no drafting), the model otherwise, or neither."""

    name = METHOD_HYBRID
    lookup = True

    def __init__(self, model: Model, p_min: float = 0.0, ngram_max: int = 4, ngram_min: int = 2):
        super().__init__(model, p_min)
        self.ngram_max, self.ngram_min = ngram_max, ngram_min


def make_drafter(method: str, model: Model | None = None, p_min: float = 0.0,
                 memory: DraftMemory | None = None, through_text_for: Model | None = None) -> "Drafter | None":
    """The one way to build a drafter: None for the target alone. `memory`: the drafting memory it drafts from
    too (None: none). `through_text_for`: the target, when the draft model's vocabulary is another (it drafts
    through text, engine/through_text.py). UsageError for a method that needs a draft model when there is none,
    or an unknown one."""
    from ..errors import UsageError

    if method == METHOD_TARGET:
        return None
    if method == METHOD_LOOKUP:
        drafter = PromptLookupDrafter()
    elif method in (METHOD_DRAFT, METHOD_HYBRID):
        if model is None:
            raise UsageError(f"method {method!r} needs a draft model; load one (--draft PATH) or use 'lookup'")
        if through_text_for is not None:
            from .through_text import TextDrafter

            drafter = TextDrafter(model, through_text_for, p_min, lookup=method == METHOD_HYBRID)
        else:
            drafter = (HybridDrafter if method == METHOD_HYBRID else ModelDrafter)(model, p_min=p_min)
    else:
        raise UsageError(f"unknown method {method!r}: choose from {METHOD_TARGET}, {', '.join(METHODS)}")
    drafter.memory = memory
    return drafter


def lookup(seq: list[int], n_max: int, ngram_max: int = 4, ngram_min: int = 2) -> list[int]:
    """The tokens that followed the most recent earlier match of seq's last n-gram, longest n first."""
    if n_max <= 0 or len(seq) < ngram_min + 1:
        return []
    # Searched as bytes, 4 to a token, at C speed: the server asks every sequence this every step (numpy's sliding
    # windows over the whole text took ~0.1 ms a call, a few percent of a plain batched step's Python time).
    text = array("i", seq).tobytes()
    for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
        tail = text[-4 * n:]
        end = 4 * (len(seq) - 1)  # within seq[:-1]: a match cannot be the tail itself
        while (at := text.rfind(tail, 0, end)) >= 0:
            if at % 4 == 0:  # on a token's boundary
                start = at // 4 + n
                return seq[start : start + n_max]
            end = at + len(tail) - 1  # the next occurrence starts before this one
    return []
