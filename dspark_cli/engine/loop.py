"""The generation loop, speculative or not, as a generator of events.

Invariant between rounds: `seq` holds every accepted token (prompt included) and the target's KV cache
holds seq[:-1]; the last token is pending. One round:
  1. the cost model (costs.Planner) picks what to draft: k tokens from the draft model, k from a free source
     (a prompt-lookup match, the drafting memory's recall), a free source's tokens with the model going on from
     them (a chain), or nothing (a plain target step, as the target alone runs); after the model's tokens, free
     tokens going on from them where the wider verify pays (a tail: the memory's next key after a value);
  2. the target evaluates [seq[-1]] + draft in one batch, giving k + 1 rows of logits;
  3. the longest prefix of the draft that matches the target's own picks (sampling.pick: the argmax, or the
     keyed Gumbel draw) is accepted, and the target's pick after it comes along: the correction, or the
     bonus token after a full acceptance;
  4. the target's cache drops the rejected tail; the draft model catches up on its next round.
With no drafter every round is a plain step: the target alone, yielding the same events.

There is one loop. An overlapped one (the cores split between the models, drafting on while the target
verified) measured no faster on 2 cores than this loop with the cost model (1.58x against 1.62x the target
alone on the demo pair), could not turn speculation off, and bypassed the planner; it was removed.

The `finally` block trims both caches back to the tokens the consumer has seen, so an abandoned generator
(Ctrl-C, a closed pipe, a consumer that stops reading) leaves them consistent for the next call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator


from .costs import FOLD_CATCHUP, FREE_SOURCES, REENTRY_WINDOW, SOURCE_MODEL, Plan, Planner
from .detok import TextStream
from .drafters import METHOD_TARGET, Draft, Drafter
from ..errors import ContextFullError, PromptError, UsageError
from ..llama.backend import release_workers
from ..llama.kernels import default_verify_max
from ..llama.model import Model
from .sampling import Noise, SamplingParams, accept
from .stats import EXACT_ALONE, FINISH_CONTEXT, FINISH_LENGTH, FINISH_STOP, GenerationStats

# The most tokens drafted per target step. The cost model picks fewer whenever fewer pay (often on CPU,
# where a verify batch costs several one-token steps); on a GPU, where a batch costs about one step, raise it.
DEFAULT_DRAFT_MAX = 8


ENGINE_SEQUENTIAL = "sequential"  # the one loop (GenerationStats.engine, `run --json`'s "engine")


def check_limits(max_tokens: int, draft_max: int | None = None) -> None:
    """The generation limits every command takes; commands call this before loading a model."""
    if max_tokens < 1:
        raise UsageError(f"max_tokens (--max-tokens) must be at least 1, got {max_tokens}")
    if draft_max is not None and draft_max < 1:
        raise UsageError(f"draft_max (--draft-max) must be at least 1, got {draft_max}")


def check_prompt(target: Model, prompt: list[int]) -> None:
    """A prompt the target can answer: not empty, and leaving room in its context for at least one token."""
    if not prompt:
        raise PromptError("the prompt is empty")
    if len(prompt) >= target.n_ctx:
        raise ContextFullError(
            f"the prompt is {len(prompt)} tokens but the context holds {target.n_ctx}",
            hint="shorten the prompt or raise --ctx-size",
        )


@dataclass
class Event:
    token: int | None  # None on the closing event
    text: str  # text released by this token ("" while a UTF-8 sequence or a possible stop string is pending)
    from_draft: bool  # the token was proposed by the drafter and accepted (False: it came from the target)
    stats: GenerationStats  # cumulative, updated in place
    finish_reason: str | None = None  # set on the closing event only


@dataclass
class Round:
    tokens: list[int]  # the accepted drafts, then the target's own token
    n_drafted: int
    n_accepted: int
    source: str | None = None  # where the drafts came from (costs.SOURCE_MODEL, SOURCE_LOOKUP, SOURCE_MEMORY)
    segments: list[tuple[str, int]] | None = None  # where the drafts came from, in order: (source, tokens)


# Long (about 90 lines): the whole generation on one screen, as llama.cpp's speculative-simple keeps it:


# checks, prompt, rounds, finish, and the finally that trims both caches.


def generate(
    target: Model,
    prompt: list[int],
    *,
    drafter: Drafter | None = None,
    params: SamplingParams = SamplingParams(),
    max_tokens: int = 512,
    draft_max: int = DEFAULT_DRAFT_MAX,
    stop: tuple[str, ...] | list[str] = (),
    fixed: bool = False,
    profile=None,
    verify_max: int | None = None,
    exact: str = "",
) -> Iterator[Event]:
    """Events for the answer to `prompt`. `fixed`: draft `draft_max` tokens every round instead of what the
    cost model picks. `profile`: what earlier runs measured on this machine (profile.CostProfile, or a stored
    one that writes itself when it absorbs): the cost model starts from it, and absorbs this run at the end.
    `verify_max`: the largest verify batch in tokens (None: kernels.default_verify_max); `exact`: what the
    stats say about exactness (the loader's words for the proof's verdict)."""
    check_limits(max_tokens, draft_max if drafter is not None else None)
    check_prompt(target, prompt)
    max_draft = min(draft_max, target.n_batch - 1)
    # Verify batches beyond the bound are not bit-identical to one-token decoding (on the CPU past it they are
    # prompts, for llama.cpp's fast kernels): drafting more would lose exactness.
    verify_max = verify_max if verify_max is not None else default_verify_max(target)
    if verify_max is not None:
        max_draft = min(max_draft, verify_max - 1)
    if max_draft < 1:
        drafter = None  # no verify batch is allowed: the target alone
    stats = GenerationStats(method=drafter.name if drafter else METHOD_TARGET, n_prompt=len(prompt),
                            exact=exact if drafter is not None else EXACT_ALONE)
    noise = Noise(params.seed)
    stream = TextStream(stop)
    seq = list(prompt)
    seen = len(seq)  # tokens the consumer has been given (the prompt counts): the caches never keep more
    n_ctx = target.n_ctx
    # Drafting needs room in the draft model's context too (it may be smaller than the target's).
    draft_ctx = drafter.model.n_ctx if drafter is not None and drafter.model is not None else n_ctx
    has_model = drafter is not None and drafter.model is not None
    planner = Planner(max(1, max_draft), has_model=has_model, has_free=drafter is not None and drafter.free,
                      chains=has_model and not drafter.through_text, fixed=fixed,
                      profile=None if fixed else profile)

    def room() -> int:  # draft tokens the next verify may carry (both models' contexts, --max-tokens)
        if drafter is None:
            return 0
        return max(0, min(max_draft, n_ctx - len(seq) - 1, draft_ctx - len(seq) - 1, max_tokens - stats.n_generated - 1))

    t0 = time.perf_counter()
    evaluated = target.n_evaluated
    rounds = None
    try:
        target.sync(seq[:-1], n_logits=0)
        stats.n_prompt_evaluated = target.n_evaluated - evaluated + 1  # + the pending last token
        if not target.remote:  # an RPC server may still be computing the prompt (llama_synchronize does not wait)
            planner.costs.record_prefill(stats.n_prompt_evaluated - 1, time.perf_counter() - t0)
        if drafter is not None and len(seq) < draft_ctx:
            t_draft = time.perf_counter()
            stats.n_prompt_evaluated_draft = drafter.prepare(seq, target.n_vocab)
            # The draft model's prompt is a batch like any catch-up: its first per-token cost estimate.
            planner.costs.record_catchup(stats.n_prompt_evaluated_draft, time.perf_counter() - t_draft)
        stats.t_start = time.perf_counter()
        stats.t_prompt = stats.t_start - t0

        stats.engine = ENGINE_SEQUENTIAL
        rounds = _sequential_rounds(target, drafter, seq, params, noise, planner, room, stats)
        finish = None
        while finish is None:
            r = next(rounds)
            kept = 0  # tokens of this round the answer keeps: fewer than all at an end token or a stop
            for i, tok in enumerate(r.tokens):
                if target.is_eog(tok):
                    finish = FINISH_STOP
                    break
                seq.append(tok)
                kept = i + 1
                stats.n_generated += 1
                text = stream.push(target.piece(tok))
                if stream.stopped:
                    finish = FINISH_STOP
                elif stats.n_generated >= max_tokens:
                    finish = FINISH_LENGTH
                elif len(seq) >= n_ctx:
                    finish = FINISH_CONTEXT
                seen = len(seq)
                yield Event(tok, text, i < r.n_accepted, stats)
                if finish:
                    break
            # (drafts past the end: not accepted)
            stats.record_draft(r.n_drafted, min(r.n_accepted, kept), r.source, r.segments)

        stats.t_end = time.perf_counter()
        stats.draft_lengths = planner.chosen_lengths
        if planner.off_reason and 2 * planner.plain_rounds > stats.n_target_steps:
            # it was off for most of the answer: say why (and, when some steps did draft, that it was most)
            stats.speculation_note = (planner.off_reason if not stats.n_drafted else
                                      f"{planner.plain_rounds} of {stats.n_target_steps} steps without a draft: "
                                      f"{planner.off_reason}")
        yield Event(None, stream.flush(), False, stats, finish)
    finally:
        if rounds is not None:
            rounds.close()
        # Rejected drafts, and accepted tokens past a stop, must not survive in either cache.
        target.truncate(seen)
        if drafter is not None:
            drafter.release(seq[:seen], len(prompt))
        if profile is not None and not fixed and stats.n_target_steps:
            profile.absorb(planner)  # what this run measured, for the next (an abandoned run's timings count too)
        # The next generation may come from another of the host's threads: two threads' OpenMP workers would slow
        # every pass of both (backend.release_workers).
        release_workers()


Rounds = Iterator[Round]


def _verify(target: Model, seq: list[int], drafted: list[int], params: SamplingParams, noise: Noise):
    """One target step over seq[-1] + drafted: (n accepted, the target's next token). Leaves the target's
    cache holding the accepted part only. Rows past the first disagreement are never sampled."""
    for i, t in enumerate(drafted):
        if t >= target.n_vocab:  # a padded draft vocabulary's token: the target can neither take nor accept it
            drafted = drafted[:i]
            break
    logits = target.sync(seq + drafted, n_logits=len(drafted) + 1)
    n_acc, nxt = accept(logits, drafted, params, noise, len(seq))
    target.truncate(len(seq) + n_acc)
    return n_acc, nxt


def _sequential_rounds(target, drafter, seq, params, noise, planner: Planner, room: Callable[[], int], stats) -> Rounds:
    """Draft (what the planner picks), then verify, then again: the simple loop (also the target alone)."""
    while True:
        cap = room()
        offers = drafter.offers(seq, cap) if cap else {}
        if drafter is not None:
            planner.hindsight(seq, offers)
        behind = drafter.behind(seq) if cap and drafter.model is not None else 0
        plan = planner.plan({s: len(t) for s, t in offers.items()}, behind) if cap else Plan(None, 0)
        k = min(plan.k, cap)
        t_draft = time.perf_counter()
        draft = Draft(offers[plan.source][:k] if plan.source in FREE_SOURCES else [])
        segments = [(plan.source, len(draft.tokens))] if draft.tokens else []  # (source, tokens) in draft order
        n_model = k if plan.source == SOURCE_MODEL else min(plan.then, cap - len(draft.tokens))
        chain_steps = 0
        if n_model > 0:
            if drafter.rewind(seq, REENTRY_WINDOW) > FOLD_CATCHUP:  # else the first draft step takes them in its batch
                n, seconds = drafter.catch_up(seq)
                planner.costs.record_catchup(n, seconds)
            n_free = len(draft.tokens)
            goal = n_free + n_model
            if n_free and drafter.extend(seq, draft, params, noise):
                # A chain: the model's first step read the free tokens too, a batch timed as a catch-up.
                planner.costs.record_catchup(n_free + 1, draft.seconds)
                chain_steps, draft.steps, draft.seconds = 1, 0, 0.0
            while len(draft.tokens) < goal and drafter.extend(seq, draft, params, noise):
                pass
            draft.tokens = draft.tokens[:goal]  # (a draft through text may gain several tokens in one step)
            if draft.steps:
                planner.costs.record_draft(draft.seconds / draft.steps)
            if len(draft.tokens) > n_free:
                segments.append((SOURCE_MODEL, len(draft.tokens) - n_free))
                _free_tail(drafter, target, seq, draft, plan, segments, planner, cap)
        t_target = time.perf_counter()
        n_acc, nxt = _verify(target, seq, draft.tokens, params, noise)
        t_done = time.perf_counter()
        planner.costs.record_verify(len(draft.tokens) + 1, t_done - t_target)
        stats.t_draft += t_target - t_draft
        stats.t_target += t_done - t_target
        stats.n_draft_steps += draft.steps + chain_steps
        stats.n_target_steps += 1
        out = draft.tokens[:n_acc] + [nxt]
        planner.record_round(plan, len(draft.tokens), n_acc, len(out), segments)
        yield Round(out, len(draft.tokens), n_acc, plan.source, segments)


def _free_tail(drafter, target: Model, seq: list[int], draft: Draft, plan: Plan, segments: list, planner: Planner,
               cap: int) -> None:
    """Free tokens going on from the draft model's (the memory's next key after the model wrote a value), where
    the cost model finds that the wider verify pays for them (costs.Planner.tail)."""
    room = cap - len(draft.tokens)
    if not drafter.free or room <= 0 or target.is_eog(draft.tokens[-1]):
        return
    ahead = seq + draft.tokens
    offers = drafter.offers(ahead, room)
    choice = planner.tail(plan, segments, {s: len(t) for s, t in offers.items()})
    if choice is not None:
        source, n = choice
        draft.tokens += offers[source][:n]
        segments.append((source, n))
