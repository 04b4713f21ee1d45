"""The generation loop, speculative or not, as a generator of events.

Invariant between rounds: `seq` holds every accepted token (prompt included) and the target's KV cache
holds seq[:-1]; the last token is pending. One round:
  1. the drafter proposes up to n tokens after seq (greedy, or sampled with their distributions q);
  2. the target evaluates [seq[-1]] + draft in one batch, giving n + 1 rows of logits;
  3. the longest agreeing prefix is accepted (greedy), or speculative sampling decides (temperature > 0),
     and one more token comes from the target: the correction, or the bonus after a full acceptance;
  4. the target's cache drops the rejected tail; the drafter catches up lazily on its next proposal.
With no drafter, n is 0 and this is plain one-token-at-a-time decoding, yielding the same events.
The `finally` block trims both caches back to the tokens the consumer has seen, so an abandoned generator
(Ctrl-C, a closed pipe, a consumer that stops reading) leaves them consistent for the next call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .detok import TextStream
from .drafters import Draft, Drafter
from .errors import PromptError, UsageError
from .model import Model
from .sampling import SamplingParams, probabilities, verify_greedy, verify_sampled
from .stats import GenerationStats

# Measured on CPU (scripts/bench_vs_llamacpp.py, dspark bench sweeps): 6 was as fast as or faster than 4, 8,
# 12 and 16 there, because a verify batch costs more as it grows; on a GPU, where verify is nearly flat in
# batch size, longer drafts can pay.
DEFAULT_DRAFT_MAX = 6

FINISH_STOP = "stop"  # an end-of-generation token or a stop string
FINISH_LENGTH = "length"  # --max-tokens reached
FINISH_CONTEXT = "context"  # the context window is full


def check_limits(max_tokens: int, draft_max: int | None = None) -> None:
    """The generation limits every command takes; commands call this before loading a model."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    if draft_max is not None and draft_max < 1:
        raise UsageError(f"--draft-max must be at least 1, got {draft_max}")


@dataclass
class Event:
    token: int | None  # None on the closing event
    text: str  # text released by this token ("" while a UTF-8 sequence or a possible stop string is pending)
    from_draft: bool  # the token was proposed by the drafter and accepted (False: it came from the target)
    stats: GenerationStats  # cumulative, updated in place
    finish_reason: str | None = None  # set on the closing event only


def generate(
    target: Model,
    prompt: list[int],
    *,
    drafter: Drafter | None = None,
    params: SamplingParams = SamplingParams(),
    max_tokens: int = 512,
    draft_max: int = DEFAULT_DRAFT_MAX,
    stop: tuple[str, ...] | list[str] = (),
) -> Iterator[Event]:
    check_limits(max_tokens, draft_max if drafter is not None else None)
    if not prompt:
        raise PromptError("the prompt is empty")
    if len(prompt) >= target.n_ctx:
        raise PromptError(
            f"the prompt is {len(prompt)} tokens but the context holds {target.n_ctx}",
            hint="shorten the prompt or raise --ctx-size",
        )

    stats = GenerationStats(method=drafter.name if drafter else "target", n_prompt=len(prompt))
    rng = np.random.default_rng(params.seed)
    stream = TextStream(stop)
    seq = list(prompt)
    seen = len(seq)  # tokens the consumer has been given (the prompt counts): the caches never keep more
    n_ctx = target.n_ctx
    max_draft = min(draft_max, target.n_batch - 1)

    t0 = time.perf_counter()
    evaluated = target.n_evaluated
    try:
        target.sync(seq[:-1], n_logits=0)
        stats.n_prompt_evaluated = target.n_evaluated - evaluated + 1  # + the pending last token
        if drafter is not None:
            drafter.prepare(seq)
        stats.t_start = time.perf_counter()
        stats.t_prompt = stats.t_start - t0

        finish = None
        while finish is None:
            n_draft = 0
            if drafter is not None:
                n_draft = min(max_draft, n_ctx - len(seq) - 1, max_tokens - stats.n_generated - 1)
            t_draft = time.perf_counter()
            draft = drafter.propose(seq, n_draft, params, rng) if n_draft > 0 else Draft([])
            t_target = time.perf_counter()
            stats.t_draft += t_target - t_draft
            stats.n_draft_steps += draft.steps

            logits = target.sync(seq + draft.tokens, n_logits=len(draft.tokens) + 1)
            if params.greedy:
                picks = np.argmax(logits, axis=1).tolist()
                n_acc = verify_greedy(picks, draft.tokens)
                nxt = picks[n_acc]
            else:
                p_rows = np.stack([probabilities(row, params) for row in logits])
                n_acc, nxt = verify_sampled(p_rows, draft.tokens, draft.q, rng)
            target.truncate(len(seq) + n_acc)
            stats.t_target += time.perf_counter() - t_target
            stats.n_target_steps += 1
            if draft.tokens:
                stats.record_draft(len(draft.tokens), n_acc)

            for i, tok in enumerate(draft.tokens[:n_acc] + [nxt]):
                if target.is_eog(tok):
                    finish = FINISH_STOP
                    break
                seq.append(tok)
                stats.n_generated += 1
                text = stream.push(target.piece(tok))
                if stream.stopped:
                    finish = FINISH_STOP
                elif stats.n_generated >= max_tokens:
                    finish = FINISH_LENGTH
                elif len(seq) >= n_ctx:
                    finish = FINISH_CONTEXT
                seen = len(seq)
                yield Event(tok, text, i < n_acc, stats)
                if finish:
                    break

        stats.t_end = time.perf_counter()
        yield Event(None, stream.flush(), False, stats, finish)
    finally:
        # Rejected drafts, and accepted tokens past a stop, must not survive in either cache.
        target.truncate(seen)
        if drafter is not None:
            drafter.release(seen)
