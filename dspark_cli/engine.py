"""The generation loop, speculative or not, as a generator of events.

Invariant between rounds: `seq` holds every accepted token (prompt included) and the target's KV cache
holds seq[:-1]; the last token is pending. One round:
  1. the drafter proposes up to n tokens after seq (greedy, or sampled with their distributions q);
  2. the target evaluates [seq[-1]] + draft in one batch, giving n + 1 rows of logits;
  3. the longest agreeing prefix is accepted (greedy), or speculative sampling decides (temperature > 0),
     and one more token comes from the target: the correction, or the bonus after a full acceptance;
  4. the target's cache drops the rejected tail; the drafter catches up lazily on its next proposal.
With no drafter, n is 0 and this is plain one-token-at-a-time decoding, yielding the same events.

On CPU, with a draft model, the rounds overlap (`_overlapped_rounds`): the cores are split between the
two models, and while the target verifies one draft the drafter keeps drafting past it, betting that it
will be accepted whole. When the bet wins (most rounds at high acceptance) the next draft is already
there; when it loses, the extra tokens are dropped. Either way the target is never idle waiting for the
draft, and the draft length adapts itself to how long a verify takes.

The `finally` block trims both caches back to the tokens the consumer has seen, so an abandoned generator
(Ctrl-C, a closed pipe, a consumer that stops reading) leaves them consistent for the next call.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .detok import TextStream
from .drafters import Draft, Drafter, ModelDrafter
from .errors import PromptError, UsageError
from .model import Model
from .sampling import PositionRng, SamplingParams, probabilities, verify_greedy, verify_sampled
from .stats import GenerationStats

# Measured on CPU (scripts/bench_vs_llamacpp.py, dspark bench sweeps): with the overlapped engine, the CPU
# default, 6 was as fast as or faster than 4, 8 and 10 (its draft length settles below the cap anyway). The
# sequential engine, with dspark's patched verify kernels or on a GPU where verify is nearly flat in batch
# size, gains from 8-10: pass --draft-max there.
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


def overlap_default(target: Model, drafter: Drafter | None) -> bool:
    """Overlap draft and verify when both models run on the CPU with at least two threads to split;
    DSPARK_OVERLAP=0 or 1 forces it off or on."""
    forced = os.environ.get("DSPARK_OVERLAP", "")
    if not isinstance(drafter, ModelDrafter) or target.n_threads < 2:
        return False
    if forced in ("0", "1"):
        return forced == "1"
    return target.on_cpu and drafter.model.on_cpu


def split_threads(n: int) -> tuple[int, int]:
    """(target, draft) threads out of n for overlapped rounds: the target's verify is the larger job."""
    draft = max(1, n // 3)
    return max(1, n - draft), draft


def generate(
    target: Model,
    prompt: list[int],
    *,
    drafter: Drafter | None = None,
    params: SamplingParams = SamplingParams(),
    max_tokens: int = 512,
    draft_max: int = DEFAULT_DRAFT_MAX,
    stop: tuple[str, ...] | list[str] = (),
    overlap: bool | None = None,
) -> Iterator[Event]:
    check_limits(max_tokens, draft_max if drafter is not None else None)
    if not prompt:
        raise PromptError("the prompt is empty")
    if len(prompt) >= target.n_ctx:
        raise PromptError(
            f"the prompt is {len(prompt)} tokens but the context holds {target.n_ctx}",
            hint="shorten the prompt or raise --ctx-size",
        )
    if overlap is None:
        overlap = overlap_default(target, drafter)

    stats = GenerationStats(method=drafter.name if drafter else "target", n_prompt=len(prompt))
    rng = PositionRng(params.seed)
    stream = TextStream(stop)
    seq = list(prompt)
    seen = len(seq)  # tokens the consumer has been given (the prompt counts): the caches never keep more
    n_ctx = target.n_ctx
    max_draft = min(draft_max, target.n_batch - 1)

    def room() -> int:  # draft tokens the next verify may carry
        if drafter is None:
            return 0
        return max(0, min(max_draft, n_ctx - len(seq) - 1, max_tokens - stats.n_generated - 1))

    t0 = time.perf_counter()
    evaluated = target.n_evaluated
    rounds = None
    try:
        target.sync(seq[:-1], n_logits=0)
        stats.n_prompt_evaluated = target.n_evaluated - evaluated + 1  # + the pending last token
        if drafter is not None:
            drafter.prepare(seq)
        stats.t_start = time.perf_counter()
        stats.t_prompt = stats.t_start - t0

        make_rounds = _overlapped_rounds if overlap else _sequential_rounds
        rounds = make_rounds(target, drafter, seq, params, rng, room, stats)
        finish = None
        while finish is None:
            tokens, n_acc = next(rounds)
            for i, tok in enumerate(tokens):
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
        if rounds is not None:
            rounds.close()  # waits for a verify still running in the overlapped engine
        # Rejected drafts, and accepted tokens past a stop, must not survive in either cache.
        target.truncate(seen)
        if drafter is not None:
            drafter.release(seen)


Rounds = Iterator[tuple[list[int], int]]  # per target step: (accepted drafts + the target's token, n accepted)


def _verify(target: Model, seq: list[int], draft: Draft, params: SamplingParams, rng: PositionRng):
    """One target step over seq[-1] + draft: (n accepted, the target's next token). Leaves the target's
    cache holding the accepted part only."""
    logits = target.sync(seq + draft.tokens, n_logits=len(draft.tokens) + 1)
    if params.greedy:
        picks = np.argmax(logits, axis=1).tolist()
        n_acc = verify_greedy(picks, draft.tokens)
        nxt = picks[n_acc]
    else:
        p_rows = np.stack([probabilities(row, params) for row in logits])
        rngs = [rng.target(len(seq) + i) for i in range(len(draft.tokens) + 1)]
        n_acc, nxt = verify_sampled(p_rows, draft.tokens, draft.q or None, rngs)
    target.truncate(len(seq) + n_acc)
    return n_acc, nxt


def _sequential_rounds(target, drafter, seq, params, rng, room: Callable[[], int], stats) -> Rounds:
    """Draft, then verify, then draft again: the simple loop (also the target-alone loop)."""
    while True:
        n_draft = room()
        t_draft = time.perf_counter()
        draft = drafter.propose(seq, n_draft, params, rng) if n_draft > 0 else Draft([])
        t_target = time.perf_counter()
        stats.t_draft += t_target - t_draft
        stats.n_draft_steps += draft.steps
        n_acc, nxt = _verify(target, seq, draft, params, rng)
        stats.t_target += time.perf_counter() - t_target
        stats.n_target_steps += 1
        if draft.tokens:
            stats.record_draft(len(draft.tokens), n_acc)
        yield draft.tokens[:n_acc] + [nxt], n_acc


def _overlapped_rounds(target, drafter: ModelDrafter, seq, params, rng, room: Callable[[], int], stats) -> Rounds:
    """The target verifies the drafts that are ready (possibly none) in a worker thread while this thread
    drafts past them, betting that they will all be accepted and guessing the target's own next token;
    the drafts that survive the verdict are the next round's candidates. ctypes releases the GIL inside
    llama_decode, so the two models run at once, each on its share of the cores. A verify of k drafts
    takes longer than k draft steps would, so the draft length settles where the two balance."""
    draft_model = drafter.model
    threads = (target.n_threads, draft_model.n_threads)
    n_target, n_draft = split_threads(target.n_threads)
    target.set_threads(n_target)
    draft_model.set_threads(n_draft)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-verify")
    ahead = Draft([])  # drafted after seq, not verified yet
    try:
        while True:
            n = room()
            steps, t_draft = ahead.steps, time.perf_counter()
            if not params.greedy:
                # Sampling verifies exactly n drafts (fewer only at an end token), so which positions get
                # drafted, and with them every random draw, does not depend on timing: seeds reproduce.
                while len(ahead.tokens) < n and drafter.extend(seq, ahead, params, rng):
                    pass
            cand = Draft(ahead.tokens[:n], ahead.q[:n])
            t_target = time.perf_counter()
            job = pool.submit(_verify, target, list(seq), cand, params, rng)
            # Draft past the candidates while the target works, at most one more full draft.
            limit = min(len(cand.tokens) + 1 + max(n, 1), draft_model.n_ctx - len(seq) - 1)
            while not job.done() and len(ahead.tokens) < limit:
                if not drafter.extend(seq, ahead, params, rng):
                    break
            t_wait = time.perf_counter()
            n_acc, nxt = job.result()
            t_done = time.perf_counter()
            stats.t_draft += t_wait - t_draft
            stats.t_target += t_done - t_target
            stats.n_draft_steps += ahead.steps - steps
            stats.n_target_steps += 1
            k = len(cand.tokens)
            if k:
                stats.record_draft(k, n_acc)
            if n_acc == k and len(ahead.tokens) > k and ahead.tokens[k] == nxt:
                # The bet won, and the drafter guessed the target's token: what it drafted after stands.
                ahead = Draft(ahead.tokens[k + 1 :], ahead.q[k + 1 :], steps=ahead.steps)
            else:
                ahead = Draft([], steps=ahead.steps)
            yield cand.tokens[:n_acc] + [nxt], n_acc
    finally:
        pool.shutdown(wait=True)  # never leave a verify running on the target's cache
        target.set_threads(threads[0])
        draft_model.set_threads(threads[1])
