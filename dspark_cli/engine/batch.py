"""Several generations at once in one pair of contexts: continuous batching, with speculation, still exact.

A Scheduler owns the target and draft models and one thread that drives them. Each generation (a Job) takes a
slot, which is a sequence of its own in both models' KV caches (llama/model.py, n_seq). The thread loops:

  1. drop jobs whose consumer left (their caches trimmed to what was delivered; the slot is free at once);
  2. give free slots to waiting jobs in arrival order, each the free slot whose cache shares the longest prefix
     with its prompt (a conversation resent with one more message processes only the new tokens; a prefix it
     can copy from another slot, see 3, counts as well, less the copy's cost), next to the
     busy ones unless that prefix is worth more than the padding (below) a gap would cost;
  3. process prompts: up to a batch's worth of tokens each iteration, one job's chunk per llama.cpp call with
     the very chunks a lone run makes (exactness, below), so a long prompt does not stall the others for its
     whole length; a prefix another slot's cache holds (a system prompt the clients share) is copied over
     first, not processed again (_borrow). A job generates as soon as its target prompt is in; its draft model
     catches up afterwards;
  4. one step for every generating job: the batch planner (costs.BatchPlanner) picks how many rows every
     sequence takes and what each drafts (its own acceptance, the measured batch costs); the draft model drafts
     for all of them in one pass per draft position; the target verifies every sequence's rows in one pass;
     each job keeps the longest prefix of its draft that the target itself picks, plus the target's next token,
     exactly as engine/loop.py does for one.

Exact under batching: the target's KV cache keeps each sequence in a stream of its own, where its keys sit in
the cells and its attention sums run in the order they would alone; every pass stays within the rows that
dspark's kernels keep bit-identical to one-token decoding (EXACT_BATCH_MAX on the CPU; the proven bound with
--exact, llama/proof.py), and prompts are processed in a lone run's kinds of chunks (a prefix copied from
another slot included: Model.prompt_plan keeps only tokens computed by the kind a lone run would use, and a copied
stream keeps them in the same cells). So each row's logits are the ones a lone run computes, whatever shares the
batch, and every answer is the lone run's (greedy: token for token; sampled: the same keyed noise, same text).
llama.cpp passes once per run of consecutive streams holding the same number of rows, so every stream of the
step's range gets the same rows: a sequence with fewer real ones, or a free slot inside the range, is padded
with rows whose logits are never read and which are dropped right after (they come after the real rows, where
the causal mask keeps them out of the real rows' attention).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field


from ..errors import DsparkError, UsageError
from ..llama.backend import release_workers
from ..llama.kernels import default_verify_max
from ..llama.model import Model
from .costs import FREE_SOURCES, SOURCE_MODEL, BatchPlanner, Lane, judge_offers
from .detok import TextStream
from .drafters import METHOD_TARGET, Drafter
from .loop import Event
from .sampling import Noise, SamplingParams, accept
from .stats import FINISH_CONTEXT, FINISH_LENGTH, FINISH_STOP, GenerationStats

ENGINE_BATCHED = "batched"  # GenerationStats.engine of a generation the scheduler ran
COPIES_TRUSTED = 2  # prefix copies taken before their timings decide (Scheduler._copy_pays)
COPY_RETIME = 8  # ... and after, one refused copy in this many is taken anyway, to be timed again (_borrow)
CATCHUP_INLINE = 32  # the end of a draft's prompt left to its first draft pass (which catches it up anyway)
_END = object()


def _padding(slots: list[int]) -> int:
    """Free streams inside the range of busy `slots`: each takes padding rows in every step."""
    return max(slots) - min(slots) + 1 - len(slots) if slots else 0


@dataclass
class Job:
    """One generation in the scheduler: the request, its state, and the queue its consumer reads events from."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    draft_max: int
    fixed: bool = False  # --draft-fixed: draft_max tokens every step, no cost model
    out: queue.Queue = field(default_factory=queue.Queue)  # Event, a DsparkError to raise, or _END
    cancelled: bool = False
    slot: int | None = None
    arrived: float = field(default_factory=time.perf_counter)
    prefill_from: int = 0  # prompt tokens its slot's cache already held
    batches: list[int] = field(default_factory=list)  # the sizes of the prompt batches still to run
    seq: list[int] = field(default_factory=list)  # prompt + accepted tokens
    seen: int = 0  # tokens of seq delivered (the prompt counts): the caches never keep more once it ends
    generating: bool = False  # the target's prompt is in
    borrowed: bool = False  # another slot's cache was looked at for its prompt's prefix (Scheduler._borrow)
    t_copy: float = 0.0  # seconds of its prompt time that copying that prefix took
    draft_ready: bool = False  # the draft model's prompt is in
    lane: Lane | None = None  # its part in the batch planner (costs.Lane)
    pending: dict = field(default_factory=dict)  # per free source, a proposal judged in hindsight
    offers: dict = field(default_factory=dict)  # this step's free drafts by source (lookup, memory)
    source: str | None = None  # this step's draft source
    stats: GenerationStats | None = None
    stream: TextStream | None = None
    noise: Noise | None = None
    finished: bool = False

    def tokens_left(self, n_ctx: int) -> int:
        """Tokens it may still generate: --max-tokens less those written, within its context of n_ctx."""
        written = max(0, len(self.seq) - len(self.prompt))
        return max(0, min(self.max_tokens - written, n_ctx - len(self.prompt) - written))

    def events(self):
        """The events as they come, ending after the one with finish_reason; a failure is raised."""
        while True:
            item = self.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    """Continuous batching over `target.n_seq` slots; see the module docstring. Thread-safe: submit() and
    cancel() from any thread; the models are driven by the scheduler's own thread only."""

    def __init__(self, target: Model, drafter: Drafter | None, *, verify_max: int | None = None, exact: str = "",
                 step_log=None):
        """verify_max: the most rows in one target pass (None: kernels.default_verify_max); exact: what every
        job's stats say about exactness (the loader's words for the proof's verdict); step_log: where each prompt
        batch and step is told (steplog.StepLog: its write(kind, **fields)), or None."""
        self.target = target
        self.exact = exact
        self.drafter = drafter
        # A draft of another vocabulary drafts alone (through_text.py), not in batches: these draft from lookup and
        # the memory.
        self.draft = drafter.model if drafter is not None and not drafter.through_text else None
        self.n_slots = target.n_seq
        self.slots: list[Job | None] = [None] * self.n_slots
        rows_max = target.n_batch
        verify_max = verify_max if verify_max is not None else default_verify_max(target)
        if verify_max is not None:
            rows_max = min(rows_max, verify_max)  # past it a row's logits may depend on the others
        self.planner = BatchPlanner(rows_max, 64, has_model=self.draft is not None,
                                    has_free=drafter is not None and drafter.free)
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._to_settle: set[int] = set()  # free slots whose cache holds an answer to re-process while idle
        self._settling_now: int | None = None  # the one being re-processed
        self.copy_seconds: float | None = None  # what copying a prompt prefix between slots costs (_borrow, _prefill)
        self.copies_timed = 0  # copies whose time went into copy_seconds
        self.copies_refused = 0  # copies _copy_pays refused since the last one timed
        self.step_log = step_log  # DSPARK_STEP_LOG: where the time goes (steplog.py)

    # ---- from any thread --------------------------------------------------------------------------------
    def submit(self, *jobs: Job) -> None:
        """Queue jobs (several at once: they arrive together, before the scheduler's next step)."""
        with self._wake:
            if self._closing:
                raise UsageError("the pair is closed")
            for job in jobs:
                job.stats = GenerationStats(method=self.drafter.name if self.drafter else METHOD_TARGET,
                                            engine=ENGINE_BATCHED, n_prompt=len(job.prompt), exact=self.exact)
                self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dspark-batch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """The consumer is gone: the job ends at the scheduler's next step, its slot freed."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    @property
    def active(self) -> int:
        return sum(1 for j in self.slots if j is not None)

    @property
    def settling(self) -> int:
        """Free slots whose cached answer waits to be, or is being, re-processed for reuse (done while idle)."""
        return len(self._to_settle) + (self._settling_now is not None)

    def close(self, why: str = "the pair is closed") -> None:
        """End every job (their consumers get a UsageError(why)) and stop the thread."""
        with self._wake:
            self._closing = True
            self._why = why
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- the scheduler's thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            settle = None
            with self._wake:
                while not self._closing and not self._waiting and not any(self.slots) and not self._to_settle:
                    release_workers()  # idle: another pair's thread may decode meanwhile (backend.release_workers)
                    self._wake.wait()
                if not self._closing and not self._waiting and not any(self.slots):
                    settle = self._to_settle.pop()  # idle: one free slot's answer re-processed (Model.settle)
                    self._settling_now = settle
            if settle is not None:
                try:
                    self.target.settle(settle)
                except Exception:  # noqa: BLE001 - a cache left unsettled only costs a resend its reuse
                    self.target.truncate(0, settle)
                finally:
                    self._settling_now = None
                continue
            with self._wake:
                if self._closing:
                    for job in list(self._waiting) + [j for j in self.slots if j is not None]:
                        self._fail(job, UsageError(self._why))
                    self._waiting.clear()
                    return
                self._reap()
                self._admit()
            try:
                # The draft's prompts first, right after admission: its what-if then weighs the newcomers too (a
                # job's first token is no later for it: it came from the last iteration's step).
                self._prefill_draft()
                self._prefill()
                if any(j is not None and j.generating for j in self.slots):
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed pass fails the jobs in it; the scheduler goes on
                err = e if isinstance(e, DsparkError) else DsparkError(f"internal error: {type(e).__name__}: {e}")
                for job in [j for j in self.slots if j is not None]:
                    self._fail(job, err)

    def _reap(self) -> None:
        for job in self.slots:
            if job is not None and job.cancelled:
                self._free(job)
        self._waiting = deque(j for j in self._waiting if not j.cancelled)

    def _admit(self) -> None:
        while self._waiting and None in self.slots:
            job = self._waiting.popleft()
            free = [s for s in range(self.n_slots) if self.slots[s] is None]
            keeps = self.target.keeps(job.prompt[:-1])  # what every slot's cache keeps of it, once for the choice
            job.slot = max(free, key=lambda s: self._worth(job, s, keeps))
            self.slots[job.slot] = job
            job.seq = list(job.prompt)
            job.seen = len(job.seq)
            job.stream = TextStream(job.stop)
            job.noise = Noise(job.params.seed)
            job.lane = self.planner.new_lane()
            self._bound(job)  # (what the draft prompts' what-if weighs for a job still in prefill)
            # The cached prefix a fresh run's prompt processing agrees with, then the rest in a fresh run's kinds
            # of batches (Model.prompt_plan): what makes the answer the lone run's whatever the slot held.
            job.prefill_from, job.batches = self.target.prompt_plan(job.prompt[:-1], job.slot)
            self.target.truncate(job.prefill_from, job.slot)
            self._to_settle.discard(job.slot)

    def _worth(self, job: Job, slot: int, keeps: list[int]) -> tuple[int, int]:
        """How good a free slot is for a job, in rows of a pass (a prompt token and a padding row each cost about
        one): the prompt tokens its cache saves (or another slot's, copied over by _borrow, which throws all of
        its own away), less the cached tokens the job would throw away (another
        conversation that may come back: a newcomer does not take its slot over for a shared system prompt), less
        the padding rows it adds for as long as it may generate. A free slot between busy ones is padded every step
        (module docstring): a slot that opens or widens such a gap costs a row a step, one that fills a gap saves
        one. (Slots chosen for their cache alone scattered four jobs over eight streams: twice the rows a step.)
        Then the lowest slot. keeps: Model.keeps of its prompt."""
        keep = keeps[slot]
        lost = len(self.target.seq_cached[slot]) - self.target.common_prefix(job.prompt[:-1], slot)  # (another's)
        borrowed = max((k for s, k in enumerate(keeps) if s != slot), default=0)
        if self._copy_pays(borrowed - keep):  # another slot's prefix copied over (_borrow) replaces its whole cache
            keep, lost = borrowed - self._copy_rows(), len(self.target.seq_cached[slot])
        busy = [s for s, other in enumerate(self.slots) if other is not None and other is not job]
        horizon = job.tokens_left(self.target.n_ctx)
        return keep - lost - horizon * (_padding(busy + [slot]) - _padding(busy)), -slot

    def _bound(self, job: Job) -> None:
        """The job's lane: the tokens it may draft this step (--draft-max, both contexts, --max-tokens) and may
        still generate."""
        target, lane = self.target, job.lane
        draft_ctx = self.draft.n_ctx if self.draft is not None else target.n_ctx
        n_gen = len(job.seq) - len(job.prompt)
        lane.room = 0 if self.drafter is None else max(0, min(
            job.draft_max, target.n_ctx - len(job.seq) - 1, draft_ctx - len(job.seq) - 1,
            job.max_tokens - n_gen - 1))
        lane.left = job.tokens_left(target.n_ctx)

    def _prefill(self) -> None:
        """The target's prompt batches (Model.prompt_plan), oldest job first, one batch per iteration: a job
        generates once its prompt is in, and takes its first step before the next prompt's batch runs. (All
        waiting prompts first, then a step, would give every one of them the last one's wait: with four arriving
        together, the median time to first token is 2.5 prompts' processing this way, 4 the other.)"""
        target = self.target
        ran = False
        for job in sorted((j for j in self.slots if j is not None and not j.generating), key=lambda j: j.arrived):
            t0 = time.perf_counter()
            copied = False
            if job.batches:
                if ran:
                    return
                copied = self._borrow(job)
            if job.batches:
                done = len(target.seq_cached[job.slot])
                size = job.batches.pop(0)
                t_batch = time.perf_counter()
                target.eval(job.prompt[done : done + size], n_logits=0, seq=job.slot)
                ran = True
                if self.step_log:
                    self.step_log.write("prompt", tokens=size, seconds=round(time.perf_counter() - t_batch, 6))
                if copied and self.planner.costs.prefill_per_token is not None:
                    # The copy runs at the start of that llama_decode: what the batch took past its tokens at the
                    # prompt rate (an overestimate for a small batch, whose pass has a fixed cost, or on a busy
                    # machine: noise only adds). The cheapest copy seen is the estimate (_copy_pays, which with
                    # _borrow keeps one slow first timing from stopping copies for good).
                    job.t_copy = max(0.0, time.perf_counter() - t0 - size * self.planner.costs.prefill_per_token)
                    self.copy_seconds = min(job.t_copy, self.copy_seconds if self.copy_seconds is not None else 1e9)
                    self.copies_timed += 1
                    self.copies_refused = 0
            job.stats.t_prompt += time.perf_counter() - t0
            if len(target.seq_cached[job.slot]) == len(job.prompt) - 1:
                job.generating = True
                job.stats.n_prompt_evaluated = len(job.prompt) - job.prefill_from
                if job.stats.n_prompt_evaluated - 1 >= 16:
                    self.planner.costs.record_prefill(job.stats.n_prompt_evaluated - 1, job.stats.t_prompt - job.t_copy)
                job.stats.t_start = time.perf_counter()

    def _borrow(self, job: Job) -> bool:
        """Before a job's first prompt batch: when another slot's cache holds more of its prompt than its own (the
        same system prompt, a tool's instructions; an earlier job's prompt is in by now, oldest first), copy that
        prefix over (Model.copy_prefix) if the tokens it saves cost more to process than a copy (_copy_pays; a
        refused one now and then, to time it again). Exact: the kept tokens are those prompt_plan keeps from any
        cache, computed by the kinds of batches a fresh run of this prompt would use, in the cells it would use.
        Returns whether it copied."""
        if job.borrowed:
            return False
        job.borrowed = True
        tokens = job.prompt[:-1]
        donor, keep = self.target.donor(tokens, job.slot)
        if donor < 0:
            return False
        if keep <= job.prefill_from:
            return False
        if not self._copy_pays(keep - job.prefill_from):
            self.copies_refused += 1
            if self.copies_refused % COPY_RETIME:
                return False
        self.target.copy_prefix(donor, job.slot, keep)
        job.prefill_from, job.batches = self.target.prompt_plan(tokens, job.slot)
        return True

    def _copy_pays(self, gain: int) -> bool:
        """Whether processing `gain` more prompt tokens costs more than a copy, as timed: the cheapest copy seen.
        A timing only overestimates (other work on the machine, a small batch's fixed cost), and a copy refused is
        not timed again, so one bad timing would stop copies for good: the first COPIES_TRUSTED are taken on
        trust (and _borrow takes one refused copy in COPY_RETIME anyway, to time it again)."""
        per_token = self.planner.costs.prefill_per_token
        if gain <= 0:
            return False
        return (per_token is None or self.copy_seconds is None or self.copies_timed < COPIES_TRUSTED
                or gain * per_token > self.copy_seconds)

    def _copy_rows(self) -> int:
        """A copy's cost in prompt tokens: at least one (a slot that holds the prefix itself beats a copy of it)."""
        per_token = self.planner.costs.prefill_per_token
        if per_token is None or self.copy_seconds is None:
            return 1
        return max(1, math.ceil(self.copy_seconds / per_token))

    def _prefill_draft(self) -> None:
        """The draft model's prompt chunks, where the batch planner finds they would pay (drafts_wanted), all the
        jobs' in one pass, before the iteration's prefill and step (a job's first token came from the last
        iteration's step, so it does not wait for them): the draft's pool takes any mix of rows and its numerics
        never reach the output. Until its prompt is in, a job drafts from lookup or not at all; afterwards its
        catch-up is part of drafting."""
        draft = self.draft
        pending = [] if draft is None else [j for j in self.slots if j is not None and j.generating and not j.draft_ready]
        if not pending:
            return
        query = self._planner_query([j for j in self.slots if j is not None])
        exploring = self.planner.exploring
        if self.planner.feeds_refused(query[1], fixed=query[3]):
            return  # refused at this load whatever the prompts: skip sizing them (this runs every iteration)
        pending.sort(key=lambda j: len(j.seq))  # exploring takes the cheapest
        seen_of = {j.slot: self.drafter.seen(j.seq)[:-1] for j in pending}
        if not draft.separate:  # another slot's prefix is only a tag on its cells in a shared pool: take it
            for s, seen in seen_of.items():
                donor, keep = draft.donor(seen, s)
                if donor >= 0:
                    draft.copy_prefix(donor, s, keep)
        cached_of = {s: draft.common_prefix(seen, s) for s, seen in seen_of.items()}
        feed = sum(len(seen) - cached_of[s] for s, seen in seen_of.items())
        # 0: the model would not pay at this load (every admitted job's lane, as the last step left it)
        wanted = self.planner.drafts_wanted(*query, feed)
        if wanted == 0:
            return
        parts, budget = [], draft.n_batch
        for job in pending[:wanted]:
            if budget <= 0:
                break
            seen, common = seen_of[job.slot], cached_of[job.slot]
            draft.truncate(common, job.slot)
            chunk = seen[common:][:budget]
            if len(seen) - common - len(chunk) <= CATCHUP_INLINE:
                job.draft_ready = True
            if chunk:
                parts.append((job.slot, chunk, 0))
                job.stats.n_prompt_evaluated_draft += len(chunk)
                budget -= len(chunk)
        if parts:
            t0 = time.perf_counter()
            draft.decode_rows(parts)
            seconds = time.perf_counter() - t0
            # the slope of the draft's pass costs by rows, until passes of several widths are timed
            self.planner.draft_costs.record_prefill(sum(len(p[1]) for p in parts), seconds)
            if not exploring:  # (exploring buys the costs' measurements; the record weighs drafting)
                self.planner.record_feed(query[1], seconds)  # what the model's drafts must pay back (pays_back)
            if self.step_log:
                self.step_log.write("draft_prompt", tokens=sum(len(p[1]) for p in parts), seconds=round(seconds, 6),
                                    streams=query[1])
            for seq, _, _ in parts:
                self.slots[seq].stats.t_prompt += seconds

    @staticmethod
    def _planner_query(jobs: list[Job]) -> tuple:
        """What the batch planner is asked about the generating `jobs`, for a step or its what-if: their lanes, the
        streams their slots span, the most any may draft, whether any drafts a fixed length."""
        n_streams = max(j.slot for j in jobs) - min(j.slot for j in jobs) + 1
        return [j.lane for j in jobs], n_streams, max(j.draft_max for j in jobs), any(j.fixed for j in jobs)

    def _step(self) -> None:
        """One target pass for every generating job (see the module docstring)."""
        target = self.target
        jobs = [j for j in self.slots if j is not None and j.generating]
        lo, hi = min(j.slot for j in jobs), max(j.slot for j in jobs)
        n_streams = hi - lo + 1
        exploring = self.planner.exploring
        t_start = time.perf_counter()
        for job in jobs:
            lane = job.lane
            self._bound(job)
            job.offers = self.drafter.offers(job.seq, lane.room) if lane.room else {}
            if self.drafter is not None:
                judge_offers(job.pending, lane.acceptance, job.seq, job.offers)
            lane.offers = {source: len(t) for source, t in job.offers.items()}
            lane.model_behind = None
            if self.draft is not None and job.draft_ready:
                # Tokens its draft has yet to see (after plain or lookup steps): caught up in the first draft pass,
                # when the planner finds drafting worth that too, as the single-sequence loop does.
                behind = max(0, len(job.seq) - 1 - self.draft.common_prefix(self.drafter.seen(job.seq), job.slot))
                lane.model_behind = behind if behind < self.draft.n_batch // self.n_slots else None
        plan = self.planner.plan(*self._planner_query(jobs))
        # Padding rows must fit every stream's context: the range's rows shrink for a job near its end.
        rows = min([plan.rows] + [target.n_ctx - len(target.seq_cached[s]) for s in range(lo, hi + 1)
                                  if self.slots[s] is not None and self.slots[s].generating])
        drafts: dict[int, list[int]] = {}
        t0 = time.perf_counter()
        model_jobs = []
        for job, source, k in zip(jobs, plan.sources, plan.lengths):
            k = min(k, rows - 1)
            if source in FREE_SOURCES:
                drafts[job.slot] = job.offers[source][:k]
            elif source == SOURCE_MODEL and k:
                model_jobs.append((job, k))
            job.source = source if k else None
        n_draft_passes = self._draft(model_jobs, drafts) if model_jobs else 0
        t1 = time.perf_counter()
        # The target pass: every stream of lo..hi takes `rows` rows.
        parts, before = [], {}
        for s in range(lo, hi + 1):
            job = self.slots[s]
            before[s] = len(target.seq_cached[s])
            if job is not None and job.generating:
                d = [t for t in drafts.get(s, []) if t < target.n_vocab][: rows - 1]
                drafts[s] = d
                toks = [job.seq[-1]] + d
                parts.append((s, toks + [job.seq[-1]] * (rows - len(toks)), len(toks)))
            else:
                if before[s] + rows > target.n_ctx:  # a free slot's kept prefix makes room for the padding
                    target.truncate(target.n_ctx - rows, s)
                    before[s] = len(target.seq_cached[s])
                parts.append((s, [0] * rows, 0))
        logits = target.decode_rows(parts)
        t2 = time.perf_counter()
        self.planner.costs.record_verify(n_streams * rows, t2 - t1)
        row = 0
        results = []
        for s, toks, n_out in parts:
            job = self.slots[s]
            if job is None or not job.generating:
                target.truncate(before[s], s)
                continue
            d = drafts[s]
            n_acc, nxt = accept(logits[row : row + n_out], d, job.params, job.noise, len(job.seq))
            row += n_out
            target.truncate(before[s] + 1 + n_acc, s)
            results.append((job, d, n_acc, nxt))
        self._record_payback(results, n_streams, t2 - t0, exploring)
        for job, d, n_acc, nxt in results:
            job.stats.batch_max = max(job.stats.batch_max, len(results))
            job.stats.t_draft += t1 - t0
            job.stats.t_target += t2 - t1
            job.stats.n_target_steps += 1
            if job.source == SOURCE_MODEL:
                job.stats.n_draft_steps += n_draft_passes
            key = "none" if not d else f"{job.source}@{len(d)}"
            job.stats.draft_lengths[key] = job.stats.draft_lengths.get(key, 0) + 1
            if job.source in FREE_SOURCES:
                job.pending.pop(job.source, None)  # verified: recorded below
            out = d[:n_acc] + [nxt]
            self.planner.record_round(job.lane, job.source if d else None, len(d), n_acc, len(out))
            self._deliver(job, out, n_acc, len(d))
        if self.step_log:
            self.step_log.write("step", jobs=len(jobs), streams=n_streams, rows=rows,
                                sources=[job.source for job, _, _, _ in results],
                                tokens=sum(n_acc + 1 for _, _, n_acc, _ in results), draft_s=round(t1 - t0, 6),
                                target_s=round(t2 - t1, 6),
                                python_s=round(time.perf_counter() - t_start - (t2 - t0), 6))

    def _record_payback(self, results: list, n_streams: int, seconds: float, exploring: bool) -> None:
        """What the step's drafts from the model saved over a plain step (the record drafts_wanted checks): each
        such sequence's accepted drafts at the plain step's time per token, less its share of the step's time past
        a plain step's (drafting included), by the rows it drafted. results: (job, drafts, accepted, next).
        Exploring steps (short drafts that time the draft model) are not weighed: they buy measurements."""
        v_plain = self.planner.costs.step(n_streams)
        drafted = sum(len(d) for _, d, _, _ in results)
        saved = None
        if (v_plain is not None and drafted and not exploring
                and any(job.source == SOURCE_MODEL for job, _, _, _ in results)):
            extra = seconds - v_plain
            saved = sum(n_acc * v_plain / len(results) - extra * len(d) / drafted
                        for job, d, n_acc, _ in results if job.source == SOURCE_MODEL)
        self.planner.record_step(n_streams, sum(n_acc + 1 for _, _, n_acc, _ in results), saved)

    def _draft(self, model_jobs: list[tuple[Job, int]], drafts: dict[int, list[int]]) -> int:
        """The draft model drafts for every job in model_jobs (k tokens each at most), one pass per position:
        the first pass also catches each one up on the tokens it has not seen. Returns the passes made."""
        draft, drafter = self.draft, self.drafter
        live = []
        for job, k in model_jobs:
            drafts[job.slot] = []
            live.append((job, k))
        passes = 0
        while live:
            parts = []
            for job, _ in live:
                seen = drafter.seen(job.seq + drafts[job.slot])
                common = min(draft.common_prefix(seen, job.slot), len(seen) - 1)
                draft.truncate(common, job.slot)
                parts.append((job.slot, seen[common:], -1))
            t0 = time.perf_counter()
            logits = draft.decode_rows(parts)
            self.planner.record_draft_pass(sum(len(p[1]) for p in parts), time.perf_counter() - t0)
            passes += 1
            still = []
            for i, (job, k) in enumerate(live):
                ahead = drafts[job.slot]
                tok = drafter.choose(logits[i], job.params, job.noise, len(job.seq) + len(ahead))
                if tok is None:
                    continue
                ahead.append(tok)
                if len(ahead) < k and not draft.is_eog(tok):
                    still.append((job, k))
            live = still
        return passes

    def _deliver(self, job: Job, tokens: list[int], n_accepted: int, n_drafted: int) -> None:
        """The round's tokens to the job's consumer, as engine/loop.py yields them; ends the job when done."""
        target = self.target
        finish = None
        kept = 0
        for i, tok in enumerate(tokens):
            if target.is_eog(tok):
                finish = FINISH_STOP
                break
            job.seq.append(tok)
            kept = i + 1
            job.stats.n_generated += 1
            text = job.stream.push(target.piece(tok))
            if job.stream.stopped:
                finish = FINISH_STOP
            elif job.stats.n_generated >= job.max_tokens:
                finish = FINISH_LENGTH
            elif len(job.seq) >= target.n_ctx:
                finish = FINISH_CONTEXT
            job.seen = len(job.seq)
            job.out.put(Event(tok, text, i < n_accepted, job.stats))
            if finish:
                break
        job.stats.record_draft(n_drafted, min(n_accepted, kept), job.source)
        if finish:
            job.stats.t_end = time.perf_counter()
            job.out.put(Event(None, job.stream.flush(), False, job.stats, finish))
            job.out.put(_END)
            self._free(job)

    def _fail(self, job: Job, err: BaseException) -> None:
        job.out.put(err)
        job.out.put(_END)
        if job.slot is not None and self.slots[job.slot] is job:
            self._free(job)

    def _free(self, job: Job) -> None:
        """The job leaves its slot; its caches keep what was delivered (the next request may extend it)."""
        job.finished = True
        if self.drafter is not None:
            self.drafter.remember(job.seq[:job.seen], len(job.prompt))
        s = job.slot
        self.target.truncate(job.seen, s)
        if self.draft is not None:
            self.draft.truncate(job.seen, s)
        self.slots[s] = None
        self._to_settle.add(s)
