"""A draft model of another vocabulary, drafting through text.

A target without a small sibling of the same tokenizer can still be drafted for by a small model of another
family: the draft reads the text so far in its own tokens, writes on in them, and its text is tokenized in the
target's vocabulary (the last token dropped, unless the draft ended: it may be a word cut short). The target
verifies those tokens as any draft's, so the output stays the target's own: greedy token for token, sampled
exactly (a proposal is accepted when it is the target's own pick, see sampling.accept, whoever proposed it).

The draft's context follows the accepted text: the prompt's text tokenized once in its vocabulary, the answer's
text again whenever it grew; the draft model's KV cache is reused up to the common prefix (Model.sync), so a
round costs a re-tokenization of the answer so far (measured in the draft step's time, which the cost model
weighs) and the draft steps. Control tokens (a chat template's) are passed as their text, parsed as control
tokens where the draft's vocabulary has them (ChatML models share "<|im_start|>").
"""

from __future__ import annotations

import time

from ..llama.model import Model
from .drafters import METHOD_DRAFT, METHOD_HYBRID, Draft, FreeSources, confident_top
from .sampling import Noise, SamplingParams

EXTRA_STEPS = 4  # draft steps an extend() may take beyond one to gain a target token (its text may be a word part)


class TextDrafter(FreeSources):
    """A draft model whose vocabulary differs from the target's (llama/vocab.py's check fails), with prompt lookup
    and the memory as any drafter; `through_text` tells the engines so."""

    through_text = True

    def __init__(self, model: Model, target: Model, p_min: float = 0.0, lookup: bool = True):
        self.model = model
        self.target = target
        self.p_min = p_min
        self.lookup = lookup
        self.name = METHOD_HYBRID if lookup else METHOD_DRAFT
        self.start = 0  # where in the draft's token list its cache starts (rewind)
        self._prompt: list[int] = []  # the target tokens the prompt's conversion was made from
        self._prompt_own: list[int] = []  # … and the prompt in the draft's tokens
        self._answer: list[int] = []  # the answer tokens last converted
        self._answer_own: list[int] = []
        self._seen = 0  # target tokens of seq whose text the draft's cache holds (for behind(): no conversion)

    # ---- the text between the vocabularies ------------------------------------------------------------------
    def _bytes(self, tokens: list[int]) -> bytes:
        target = self.target
        # A control token prints nothing; its text (e.g. "<|im_start|>") lets the draft see the template.
        return b"".join(target.piece(t) or target.token_text(t) for t in tokens)

    def own(self, seq: list[int]) -> list[int]:
        """seq (target tokens) as the draft model reads it: its text in the draft's tokens."""
        if seq[: len(self._prompt)] != self._prompt or not self._prompt:
            self._prompt = list(seq)  # a new context: the whole of it is "prompt" now
            text = self._bytes(seq).decode("utf-8", errors="ignore")
            self._prompt_own = self.model.tokenize(text, add_special=True, parse_special=True)
            self._answer, self._answer_own = [], []
            return list(self._prompt_own)
        answer = seq[len(self._prompt):]
        if answer != self._answer:
            text = self._bytes(answer).decode("utf-8", errors="ignore")
            self._answer = list(answer)
            self._answer_own = self.model.tokenize(text, add_special=False, parse_special=True) if text else []
        return self._prompt_own + self._answer_own

    def to_target(self, own: list[int], ended: bool) -> list[int]:
        """Draft tokens as target tokens: their text tokenized in the target's vocabulary, the last one dropped
        unless the draft ended (a word may go on), and a trailing incomplete UTF-8 character left out."""
        text = b"".join(self.model.piece(t) for t in own).decode("utf-8", errors="ignore")
        if not text:
            return []
        tokens = self.target.tokenize(text, add_special=False, parse_special=False)
        return tokens if ended else tokens[:-1]

    # ---- the Drafter interface ------------------------------------------------------------------------------
    def prepare(self, seq: list[int], n_vocab: int) -> int:
        self._prompt = []
        self.start = 0
        return self.catch_up(seq)[0]

    def catch_up(self, seq: list[int]) -> tuple[int, float]:
        before, t0 = self.model.n_evaluated, time.perf_counter()
        own = self.own(seq)
        self.model.sync(own[self.start:-1], n_logits=0)
        self._seen = len(seq) - 1
        return self.model.n_evaluated - before, time.perf_counter() - t0

    def behind(self, seq: list[int]) -> int:
        """In target tokens, from what the draft last caught up to: the planner asks every round, drafting or
        not, and converting the text each time would cost every round (measured: 0.96x the target alone where
        the draft never paid)."""
        return max(0, len(seq) - 1 - self._seen)

    def rewind(self, seq: list[int], window: int) -> int:
        behind = self.behind(seq)
        if behind > window:
            own = self.own(seq)
            # The draft's cache starts about `window` target tokens back (its tokens are counted as the target's).
            self.start = max(self.start, len(own) - 1 - window)
            self._seen = len(seq) - 1 - window
            return window
        return behind

    def extend(self, seq: list[int], ahead: Draft, params: SamplingParams, noise: Noise) -> bool:
        """Draft steps until the draft's text gives one more target token (a few at most): ahead.tokens are then
        the whole draft's text in target tokens, ahead.own the draft's own tokens."""
        t0 = time.perf_counter()
        try:
            context = self.own(seq)[self.start:]
            have = len(ahead.tokens)
            for _ in range(1 + EXTRA_STEPS):
                logits = self.model.sync(context + ahead.own, n_logits=1)[0]
                self._seen = len(seq)  # (the sync took in all of seq)
                ahead.steps += 1
                tok = confident_top(logits, self.p_min)  # (a proposal is judged as given: the likeliest is best)
                if tok is None:
                    return False
                if self.model.is_eog(tok):
                    ahead.tokens = self.to_target(ahead.own, ended=True)
                    return False
                ahead.own.append(tok)
                converted = self.to_target(ahead.own, ended=False)
                if len(converted) > have:
                    ahead.tokens = converted
                    return True
            return False
        finally:
            ahead.seconds += time.perf_counter() - t0

    def release(self, seq: list[int], n_prompt: int) -> None:
        own = self.own(seq)[self.start:]
        self.model.truncate(self.model.common_prefix(own))
        self._seen = min(self._seen, len(seq) - 1)
        self.remember(seq, n_prompt)
