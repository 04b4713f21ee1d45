"""Where draft tokens come from, behind one small interface.

A drafter proposes up to n tokens to follow `seq` (every accepted token so far, prompt included). It may
return the distributions it sampled them from (`q`), which speculative sampling needs; a deterministic
drafter returns no q and counts as one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .model import Model
from .sampling import PositionRng, SamplingParams, probabilities, sample_from


@dataclass
class Draft:
    tokens: list[int]
    q: list[np.ndarray] = field(default_factory=list)  # the distribution each token was sampled from (if any)
    steps: int = 0  # draft-model decode calls spent


class Drafter(Protocol):
    name: str

    def prepare(self, seq: list[int]) -> None:
        """Called once before generation with the prompt (lets a model drafter process it up front)."""

    def propose(self, seq: list[int], n_max: int, params: SamplingParams, rng: PositionRng) -> Draft: ...

    def release(self, n_keep: int) -> None:
        """Generation ended with `seq[:n_keep]` accepted: drop any state past it."""


class ModelDrafter:
    """A small model of the same tokenizer drafts autoregressively from its own KV cache. Between rounds
    only the tokens it has not seen are fed to it (usually the target's correction or bonus token), never
    the whole verified batch again."""

    name = "draft"

    def __init__(self, model: Model, p_min: float = 0.0):
        self.model = model
        # Greedy drafting stops early when the draft's top probability falls under p_min: a token it is
        # unsure of is likely rejected, and every rejected token costs verify-batch width on CPU.
        self.p_min = p_min

    def prepare(self, seq: list[int]) -> None:
        # All but the last token: the first proposal evaluates that one and gets its logits; syncing the
        # whole prompt here would make it evaluate the last token twice.
        self.model.sync(seq[:-1], n_logits=0)

    def _pick(self, logits: np.ndarray, params: SamplingParams, rng: PositionRng, pos: int):
        """The draft's token for position `pos` and its distribution q (None when greedy), or (None, None)
        when greedy drafting should stop here (p_min)."""
        if params.greedy:
            tok = int(np.argmax(logits))
            if self.p_min > 0.0:
                p_top = 1.0 / float(np.exp(logits.astype(np.float64) - float(logits[tok])).sum())
                if p_top < self.p_min:
                    return None, None
            return tok, None
        q = probabilities(logits, params)
        return sample_from(q, rng.draft(pos)), q

    def propose(self, seq: list[int], n_max: int, params: SamplingParams, rng: PositionRng) -> Draft:
        draft = Draft([])
        while len(draft.tokens) < n_max and self.extend(seq, draft, params, rng):
            pass
        return draft

    def extend(self, seq: list[int], ahead: Draft, params: SamplingParams, rng: PositionRng) -> bool:
        """Draft one more token after seq + ahead.tokens into `ahead` (one decode: the cache already holds
        the rest). False when there is nothing more to draft: an end token, or p_min."""
        if ahead.tokens and self.model.is_eog(ahead.tokens[-1]):
            return False
        logits = self.model.sync(seq + ahead.tokens, n_logits=1)[0]
        ahead.steps += 1
        tok, q = self._pick(logits, params, rng, len(seq) + len(ahead.tokens))
        if tok is None:
            return False
        ahead.tokens.append(tok)
        if q is not None:
            ahead.q.append(q)
        return True

    def release(self, n_keep: int) -> None:
        self.model.truncate(n_keep)


class PromptLookupDrafter:
    """No second model: find the latest earlier occurrence of the last n tokens (n from ngram_max down to
    ngram_min) in the prompt and the text so far, and propose what followed it. Strong when the answer
    copies from the input (summaries, edits, code changes), free when it does not match."""

    name = "lookup"

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2):
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def prepare(self, seq: list[int]) -> None:
        pass

    def propose(self, seq: list[int], n_max: int, params: SamplingParams, rng: PositionRng) -> Draft:
        return Draft(lookup(seq, n_max, self.ngram_max, self.ngram_min))

    def release(self, n_keep: int) -> None:
        pass


def lookup(seq: list[int], n_max: int, ngram_max: int = 4, ngram_min: int = 2) -> list[int]:
    """The tokens that followed the most recent earlier match of seq's last n-gram, longest n first."""
    if n_max <= 0 or len(seq) < ngram_min + 1:
        return []
    arr = np.asarray(seq, dtype=np.int64)
    for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
        tail = arr[-n:]
        # Windows over arr[:-1] so a match cannot be the tail itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        for start in hits[::-1]:
            follow = arr[start + n : start + n + n_max]
            if len(follow):
                return follow.tolist()
    return []
