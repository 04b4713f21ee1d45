"""What a round of speculation costs on this machine and what it brings, measured while generating, and the
choice each round makes from it.

Leviathan et al.'s speedup, with the costs measured instead of assumed: a round that drafts k tokens brings
E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i tokens (a_i: the chance that draft position i is accepted once the ones
before it were) and costs the drafting plus a target step over k + 1 tokens. The target alone brings 1 token
per one-token step. Each round takes the option with the most tokens per second:

    none            1 / V(1)
    draft model, k  E_model(k) / (catch-up + k * D + V(k + 1))
    lookup, k       E_lookup(k) / V(k + 1)          (k <= the tokens the match offers; drafting is free)
    memory, k       E_memory(k) / V(k + 1)          (the drafting memory, engine/memory.py: free as lookup)
    a chain, f + m  (E_free(f) + P_free(f) * (E_model(m) - 1)) / (catch-up + C(f + 1) + (m - 1) * D + V(f + m + 1))

A chain takes a free source's f tokens and lets the draft model go on from them for m more: the memory knows a
JSON record's keys and punctuation (free), the model its values (which no earlier text holds). P_free(f) is the
chance all f free tokens are accepted (the model's tokens count only then); C(f + 1) the model's first step,
which reads the f free tokens in the same batch (a catch-up's cost per token).

V(n) is the target step over n tokens (a verify, or a plain step when n = 1), D a draft-model step, catch-up
what the draft model spends on tokens it has not seen (after rounds without it). On a GPU V is nearly flat in
n and speculation pays; on a CPU V(8) can be 4-5 V(1) and it often does not: then the target runs alone, at
its own speed.

Knowing without a calibration run: costs and acceptance start from optimistic guesses, so the first rounds
try speculation and measure it; what was measured replaces the guesses at once. Acceptance evidence fades as
tokens go by (the text changes: a code block, a passage quoted from the prompt), drifting back toward the
optimistic guess, so an option left aside comes back by itself once it could pay again, catch-up cost
included: prompt lookup is judged for free on every token the target makes anyway, and the draft model
returns only where catching it up is cheap (on a GPU, not on a CPU where it costs a fifth of a step a token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

SOURCE_MODEL = "draft"
SOURCE_LOOKUP = "lookup"
SOURCE_MEMORY = "memory"
SOURCE_RESUMED = "memory-resumed"  # the memory, past a stretch that differs from every earlier text (memory.resume)
# Drafts that cost nothing to make: a match offers them, or not.
FREE_SOURCES = (SOURCE_LOOKUP, SOURCE_MEMORY, SOURCE_RESUMED)
SOURCES = (SOURCE_MODEL,) + FREE_SOURCES

EMA = 0.25  # weight of a new timing in its running estimate
FORGET = 0.985  # per generated token, what acceptance evidence keeps (half-life ~46 tokens)
# Acceptance assumed before (or long after) any evidence.
PRIOR = {SOURCE_MODEL: 0.85, SOURCE_LOOKUP: 0.5, SOURCE_MEMORY: 0.5, SOURCE_RESUMED: 0.5}
PRIOR_WEIGHT = 2.0  # how many observations the prior is worth
OPTIMISM = 1.0  # choices use acceptance this many standard deviations above its estimate: little evidence
# (one unlucky first round) leaves room to try again, much evidence pins it down
SLOPE_PRIOR = 0.05  # a verify's extra cost per token, relative to V(1), before two sizes (or a prefill) were timed
DRAFT_PRIOR = 0.1  # a draft step, relative to V(1), before one was measured
EXPLORE_K = 2  # the draft length of the first draft-model round
POOLED_WEIGHT = 4.0  # batched: how many rounds of its own the pooled evidence is worth to a new sequence
BATCH_MARGIN = 1.05  # batched: how much faster than plain batching a speculative plan must look to be taken
EXPLORE_PASSES = 4  # batched: draft passes timed before the draft model is judged on its cost
PAYBACK_HALF_LIFE = 2048  # batched: tokens generated at a load after which the record of what its draft prompts
# paid back counts half (a model found not to pay there is tried again after a few thousand tokens)
REFRESH_ROUNDS = 32  # while speculating, a plain step at least this often keeps V(1), the yardstick, current
SPEC_MARGIN = 1.03  # with a profile: how much faster than plain steps a draft must look to be taken
PROFILE_WEIGHT = 8.0  # how many rounds of its own a profile's acceptance (earlier runs, profile.py) is worth
FOLD_CATCHUP = 4  # a draft model this few tokens behind takes them in its first draft step's batch (one pass,
# not one per token): their cost is part of the measured draft step, not a catch-up
CATCHUP_ROUNDS = 4  # a draft model back after a pause pays its catch-up once, then drafts for a few rounds:
# a round's share of the catch-up is this fraction
REENTRY_WINDOW = 16  # a draft model more tokens behind than this catches up on the last this many only (its
# context then starts there: its drafts may be a little worse, never the output), so coming back costs little
MODEL_RETRY, MODEL_RETRY_MAX = 64, 512  # rounds without the draft model after which one round tries it again
# (gaps doubling up to the max): evidence that turned it off long ago must not keep it off for good


@dataclass
class Plan:
    source: str | None  # SOURCE_MODEL, a free source (FREE_SOURCES), or None: a plain target step
    k: int  # tokens to draft (0 with source None)
    rate: float = 0.0  # expected tokens per second
    then: int = 0  # a chain: tokens the draft model drafts after the free source's k (see the module docstring)
    tail: tuple[str, int] | None = None  # free tokens going on from the model's, once drafted (Planner.tail)

    @property
    def name(self) -> str:
        """As reports show it: "none", "draft@3", "memory@4", a chain "memory@4+draft@2", a tail "draft@2+memory@4"."""
        if self.source is None:
            return "none"
        return (f"{self.source}@{self.k}" + (f"+{SOURCE_MODEL}@{self.then}" if self.then else "")
                + (f"+{self.tail[0]}@{self.tail[1]}" if self.tail else ""))

    @property
    def key(self) -> tuple:
        """For sorting and counting (Planner.chosen): source, k, then, tail."""
        return (self.source or "", self.k, self.then) + (self.tail or ("", 0))


class Acceptance:
    """Conditional acceptance by draft position for one source, with fading evidence."""

    def __init__(self, prior: float, width: int):
        self.prior = prior
        self.reached = [0.0] * width  # rounds whose drafts got as far as position i (all before accepted)
        self.accepted = [0.0] * width
        # The same counts never faded: what this run showed, for the profile the next run starts from.
        self.total_reached = [0.0] * width
        self.total_accepted = [0.0] * width

    def record(self, n_drafted: int, n_accepted: int) -> None:
        for i in range(min(n_drafted, n_accepted + 1, len(self.reached))):
            self.reached[i] += 1.0
            self.total_reached[i] += 1.0
            if i < n_accepted:
                self.accepted[i] += 1.0
                self.total_accepted[i] += 1.0

    def fade(self, tokens: int) -> None:
        f = FORGET ** tokens
        self.reached = [x * f for x in self.reached]
        self.accepted = [x * f for x in self.accepted]

    def alpha(self, i: int, optimistic: bool = False) -> float:
        """The estimate for position i (the posterior mean), or with `optimistic` its upper bound."""
        # Positions past the first share its evidence while they have little of their own: acceptance
        # hardly depends on the position, and the first is measured most.
        prior = self.prior if i == 0 else self.alpha(0)
        if i >= len(self.reached):
            return prior
        n = self.reached[i] + PRIOR_WEIGHT
        mean = (self.accepted[i] + PRIOR_WEIGHT * prior) / n
        if not optimistic:
            return mean
        return min(1.0, mean + OPTIMISM * math.sqrt(mean * (1.0 - mean) / (n + 1.0)))

    def expected_tokens(self, k: int, optimistic: bool = False) -> float:
        """Tokens a round drafting k brings, the target's own one included. `optimistic` takes the first
        position's upper bound (the rest as estimated): optimism once, not compounded over k positions."""
        return sum(self.reach(k, optimistic))

    def reach(self, k: int, optimistic: bool = False) -> list[float]:
        """For j = 0..k, the chance that the first j drafted tokens are all accepted (1.0 for j = 0): the
        expected tokens of a round drafting k are their sum."""
        out = [1.0]
        for i in range(k):
            out.append(out[-1] * self.alpha(i, optimistic and i == 0))
        return out

    @property
    def evidence(self) -> float:
        return self.reached[0] if self.reached else 0.0

    @property
    def total_evidence(self) -> float:
        return self.total_reached[0] if self.total_reached else 0.0

    @property
    def mean(self) -> float | None:
        """The evidence's own acceptance at the first position (no prior), None without evidence."""
        return self.accepted[0] / self.reached[0] if self.evidence > 0 else None

    def add_totals(self, run: "Acceptance") -> None:
        """Add another estimate's never-faded counts to this one's evidence (a profile absorbing a run)."""
        n = max(len(self.reached), len(run.total_reached))
        self.reached = [_at(self.reached, i) + _at(run.total_reached, i) for i in range(n)]
        self.accepted = [_at(self.accepted, i) + _at(run.total_accepted, i) for i in range(n)]

    def cap(self, rounds: float) -> None:
        """Scale the evidence down to at most `rounds` rounds: older evidence fades as newer is added."""
        if self.evidence > rounds:
            f = rounds / self.evidence
            self.reached = [x * f for x in self.reached]
            self.accepted = [x * f for x in self.accepted]

    def start_from(self, pooled: "Acceptance", weight: float) -> "Acceptance":
        """This (fresh) estimate starting from `pooled`'s, its evidence scaled to at most `weight` rounds: what
        the other sequences showed is a prior worth a few rounds of this one's own."""
        scale = min(1.0, weight / pooled.evidence) if pooled.evidence > 0 else 0.0
        n = min(len(self.reached), len(pooled.reached))
        self.reached[:n] = [x * scale for x in pooled.reached[:n]]
        self.accepted[:n] = [x * scale for x in pooled.accepted[:n]]
        return self


class StepCosts:
    """Seconds per target step by its token count, and per draft-model step, as running averages.

    With a `prior` (what earlier runs measured here, engine/profile.py) every figure not yet timed in this run
    comes from it: its ratio to a one-token step, times the one-token step as this run sees it (`scale`: how much
    slower or faster than the prior this run's timed steps ran, so a machine that slowed down since is seen at
    once, by any step size)."""

    def __init__(self, width: int, prior=None):
        self.verify: list[float | None] = [None] * (width + 2)  # index n: a step over n tokens
        self.samples: list[int] = [0] * (width + 2)  # how many steps of each size were timed
        self.draft: float | None = None
        self.draft_samples = 0
        self.prefill_per_token: float | None = None  # the target's prompt, a large batch: seconds per token
        self.catchup_one: float | None = None  # draft-model seconds to catch up on a single token
        self.catchup_per_token: float | None = None  # … per token, when it catches up on several in a batch
        self.prior = prior  # a profile.CostPrior, or None: learn from nothing
        self.scale = 1.0  # this run's step times over the prior's (while the prior is in use)
        # step()'s answers until the next timing: the batch planner asks ~25 sizes a step, and interpolating each
        # over every size was a server step's largest Python cost after prompt lookup.
        self._steps: dict[int, float | None] = {}

    @staticmethod
    def _mix(old: float | None, new: float) -> float:
        # One sample moves an estimate by at most a factor of two: a round the OS preempted must not
        # make an option look so bad that it is never measured again.
        if old is None:
            return new
        new = min(max(new, old / 2), old * 2)
        return old + EMA * (new - old)

    @classmethod
    def _settle(cls, old: float | None, new: float, samples: int) -> float:
        # A step's first timing builds llama.cpp's graph for it, so of the first two timings the smaller stands (a
        # slow second one is an outlier, not the figure); after that, a running average.
        return min(old, new) if samples == 2 else cls._mix(old, new)

    def record_verify(self, n: int, seconds: float) -> None:
        self._steps.clear()
        if n < len(self.verify):
            self.samples[n] += 1
            expected = self._from_prior(n, rescaled=False)
            if expected is not None and self.samples[n] > 1:  # (a size's first step builds its graph: slow)
                self.scale = self._mix(self.scale, seconds / expected)
            # (On an RPC server too: a first one-token step after the prompt measured 325 ms against 47 ms after.)
            self.verify[n] = self._settle(self.verify[n], seconds, self.samples[n])

    def record_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 16:  # a real batch; a few tokens (a chat turn) are dominated by fixed costs
            self.prefill_per_token = seconds / tokens
            self._steps.clear()

    def record_draft(self, seconds: float) -> None:
        self.draft_samples += 1
        # As for a verify size: averaged in, the draft model's first step (at 2-3x the others) kept the estimate
        # high for the few draft steps a short run takes, and in the profile that run left behind.
        self.draft = self._settle(self.draft, seconds, self.draft_samples)

    def record_catchup(self, tokens: int, seconds: float) -> None:
        if tokens == 1:
            self.catchup_one = self._mix(self.catchup_one, seconds)
        elif tokens > 1:
            self.catchup_per_token = self._mix(self.catchup_per_token, seconds / tokens)

    def _from_prior(self, n: int, rescaled: bool = True) -> float | None:
        """V(n) as the prior has it (times `scale` when rescaled), None without one for n."""
        ratio = self.prior.verify.get(n) if self.prior is not None else None
        return None if ratio is None else self.prior.v1 * ratio * (self.scale if rescaled else 1.0)

    def _relative(self, own: float | None, name: str) -> float | None:
        """A figure this run measured, else the prior's ratio for it times this run's one-token step."""
        if own is not None or self.prior is None or getattr(self.prior, name) is None:
            return own
        return getattr(self.prior, name) * self.step(1)

    def catchup(self, tokens: int) -> float:
        """Seconds the draft model needs to see `tokens` it has not seen (a batch costs less per token)."""
        if tokens <= 0:
            return 0.0
        one = self._relative(self.catchup_one, "catchup_one")
        one = one if one is not None else (self.draft_step() or 0.0)
        if tokens == 1:
            return one
        per_token = self._relative(self.catchup_per_token, "catchup_per_token")
        return tokens * (per_token if per_token is not None else one)

    @property
    def knows_yardstick(self) -> bool:
        """Whether V(1) can be trusted: two one-token steps timed (see record_verify), or a prior to start from."""
        return self.samples[1] >= 2 or (self.prior is not None and self.step(1) is not None)

    @property
    def knows_draft(self) -> bool:
        return self.draft is not None or (self.prior is not None and self.prior.draft is not None)

    def step(self, n: int) -> float | None:
        """V(n): measured, else the prior's (rescaled), else on the line through the known sizes around it (the
        nearest two on one side past the ends; a slope guess while one size alone is known). None before any
        step was timed."""
        if n not in self._steps:
            self._steps[n] = self._step(n)
        return self._steps[n]

    def _step(self, n: int) -> float | None:
        prior = self._from_prior(n)
        if n < len(self.verify) and self.verify[n] is not None and (prior is None or self.samples[n] >= 2):
            return self.verify[n]  # (a size's first timing alone does not override a prior: see record_verify)
        if prior is not None:
            return prior
        known = [(i, v) for i, v in ((i, self.verify[i] if self.verify[i] is not None else self._from_prior(i))
                                     for i in range(len(self.verify))) if v is not None]
        if not known:
            return None
        if len(known) == 1:
            # One size timed: the slope is a batch's cost per token, which the prompt's prefill measured (on a
            # CPU most of a step, on a GPU next to nothing), or a guess.
            i, v = known[0]
            prefill = self._relative(self.prefill_per_token, "prefill_per_token")
            slope = prefill if prefill is not None else SLOPE_PRIOR * v
            return max(1e-9, v + slope * (n - i))
        below = [x for x in known if x[0] < n]
        above = [x for x in known if x[0] > n]
        if below and above:
            (i0, v0), (i1, v1) = below[-1], above[0]
        elif below:
            (i0, v0), (i1, v1) = below[-2], below[-1]
        else:
            (i0, v0), (i1, v1) = above[0], above[1]
        slope = max(0.0, (v1 - v0) / (i1 - i0))
        return max(1e-9, v0 + slope * (n - i0))

    def draft_step(self) -> float | None:
        own = self.draft if self.draft_samples >= 2 or self.prior is None else None  # (as step() does)
        known = self._relative(own, "draft")
        if known is not None:
            return known
        v1 = self.step(1)
        return None if v1 is None else DRAFT_PRIOR * v1


@dataclass
class Planner:
    """Chooses every round's source and draft length from StepCosts and Acceptance, and keeps the record
    (`chosen`: rounds per (source, k); `off_reason`: why speculation was left off, if it was)."""

    draft_max: int
    has_model: bool
    has_free: bool  # whether free sources (prompt lookup, the drafting memory) may offer drafts
    chains: bool = False  # whether the draft model may go on from a free source's tokens (same vocabulary only)
    fixed: bool = False  # always draft draft_max tokens (the longest free offer, the model going on from it where
    # chains may; else the model alone): no cost model
    costs: StepCosts = field(init=False)
    acceptance: dict[str, Acceptance] = field(init=False)
    chosen: dict[tuple, int] = field(default_factory=dict)  # rounds by Plan.key
    off_reason: str | None = None
    profile: object = None  # what earlier runs measured (profile.CostProfile), or None: learn from nothing
    _pending: dict = field(default_factory=dict)  # per free source, a proposal waiting for its verdict (hindsight)
    _since_plain: int = 0  # rounds since the last plain step
    _since_model: int = 0  # rounds since the draft model last drafted
    _retry_gap: int = MODEL_RETRY

    def __post_init__(self):
        prior = self.profile.prior() if self.profile is not None else None
        self.costs = StepCosts(self.draft_max, prior)
        self.acceptance = new_acceptance(self.draft_max)
        if self.profile is not None:
            for source, acc in self.acceptance.items():
                earlier = self.profile.acceptance_prior(source)
                if earlier is not None:
                    acc.start_from(earlier, PROFILE_WEIGHT)

    # ---- choosing -----------------------------------------------------------------------------------
    def plan(self, offers: dict[str, int], model_behind: int) -> Plan:
        """This round's plan. offers: tokens each free source offers now (SOURCE_LOOKUP: a prompt-lookup match,
        SOURCE_MEMORY, SOURCE_RESUMED: the drafting memory's; absent or 0: none); model_behind: tokens the draft
        model has yet to see before it can draft."""
        offers = {s: n for s, n in offers.items() if n > 0} if self.has_free else {}
        if self.fixed:
            if offers and (self.chains or not self.has_model):
                # The longest offer (the first on a tie: lookup), the model going on to draft_max where it can.
                source = max(offers, key=offers.get)
                k = min(self.draft_max, offers[source])
                return self._keep(Plan(source, k, then=self.draft_max - k if self.chains else 0))
            if self.has_model:
                return self._keep(Plan(SOURCE_MODEL, self.draft_max))
            return self._keep(Plan(None, 0))
        if not self.costs.knows_yardstick or self._since_plain >= REFRESH_ROUNDS:
            # The yardstick: plain steps, as the target alone takes them (two at first: see record_verify;
            # then one now and then, so a yardstick that changed is noticed while speculation runs).
            return self._keep(Plan(None, 0))
        if self.has_model and (not self.costs.knows_draft or self._since_model >= self._retry_gap):
            # One short draft: to time a draft step and a small verify (cheap to try where the model does not
            # pay, a CPU; what the line through V(1) and V(3) extrapolates from), or to try a model left unused
            # for long again (gaps doubling: a falling rate, never zero).
            if self.costs.knows_draft:
                self._retry_gap = min(2 * self._retry_gap, MODEL_RETRY_MAX)
            return self._keep(Plan(SOURCE_MODEL, min(self.draft_max, EXPLORE_K)))
        v1 = self.costs.step(1)
        # With a profile, speculation must beat plain steps by SPEC_MARGIN: the choice is no longer exploring
        # (the profile says what drafting does here), and near break-even a wrong guess only costs.
        margin = SPEC_MARGIN if self.profile is not None else 1.0
        options = [Plan(None, 0, margin / v1)] + self._options(offers, model_behind)
        options.sort(key=lambda p: p.rate, reverse=True)
        best = options[0]
        if best.source is None:
            self.off_reason = self._why_off(options, v1)
        elif best.source == SOURCE_MODEL:
            self._retry_gap = MODEL_RETRY  # chosen on its merits: a later pause starts the retries afresh
        return self._keep(best)

    def _options(self, offers: dict[str, int], model_behind: int) -> list[Plan]:
        out = []
        model = None  # (reach by position, fixed seconds of a round, seconds per drafted token) of the model
        if self.has_model:
            # Optimism where evidence costs a round to get (the model; free sources' comes every round), while
            # nothing is known: with a profile, its acceptance is the prior and retries keep exploring.
            behind = min(model_behind, REENTRY_WINDOW)
            catch = self.costs.catchup(behind) / CATCHUP_ROUNDS if behind > FOLD_CATCHUP else 0.0
            model = (self.acceptance[SOURCE_MODEL].reach(self.draft_max, self.profile is None), catch,
                     self.costs.draft_step() or 0.0)
            out.append(self._best(SOURCE_MODEL, model[0], self.draft_max, model[1], model[2]))
        for source in FREE_SOURCES:
            if source not in offers:
                continue
            top = min(self.draft_max, offers[source])
            free = self.acceptance[source].reach(top)
            out.append(self._best(source, free, top, 0.0, 0.0))
            if model is not None and self.chains:
                out.append(self._best_chain(source, free, top, model))
        return [p for p in out if p is not None]

    def _best(self, source: str, reach: list[float], top: int, fixed: float, per_token: float) -> Plan | None:
        """The best length up to `top` for one source: reach from Acceptance.reach, the round's seconds
        fixed + k * per_token + V(k + 1)."""
        best, tokens = None, 1.0
        for k in range(1, top + 1):
            tokens += reach[k]
            rate = tokens / (fixed + k * per_token + self.costs.step(k + 1))
            if best is None or rate > best.rate:
                best = Plan(source, k, rate)
        return best

    def _best_chain(self, source: str, free: list[float], top: int, model) -> Plan | None:
        """The best chain: f of the free source's tokens (f <= top), then m from the draft model."""
        reach, catch, d = model
        best = None
        free_tokens = 1.0
        for f in range(1, min(top, self.draft_max - 1) + 1):
            free_tokens += free[f]
            first = catch + self.costs.catchup(f + 1)  # the model's first step reads the f free tokens too
            model_tokens = 0.0
            for m in range(1, self.draft_max - f + 1):
                model_tokens += reach[m]
                rate = (free_tokens + free[f] * model_tokens) / (first + (m - 1) * d + self.costs.step(f + m + 1))
                if best is None or rate > best.rate:
                    best = Plan(source, f, rate, then=m)
        return best

    def _why_off(self, options: list[Plan], v1: float) -> str:
        spec = [p for p in options if p.source is not None]
        if not spec:
            return "no draft to verify (no prompt-lookup or memory match)"
        p = spec[0]
        n = p.k + p.then + 1
        uses_model = p.source == SOURCE_MODEL or p.then
        line = (f"speculation off: a verify of {n} tokens costs {self.costs.step(n) / v1:.1f} target steps"
                + (f", a draft step {self.costs.draft_step() / v1:.2f}" if uses_model else "")
                + f"; at {self.acceptance[p.source].alpha(0):.0%} acceptance the best draft ({p.name}) "
                  f"would run at {p.rate * v1:.2f}x the target alone")
        return line

    def _keep(self, plan: Plan) -> Plan:
        self._since_plain = 0 if plan.source is None else self._since_plain + 1
        self._since_model = 0 if plan.source == SOURCE_MODEL or plan.then else self._since_model + 1
        return plan

    # ---- learning -----------------------------------------------------------------------------------
    def record_round(self, plan: Plan, n_drafted: int, n_accepted: int, n_new: int,
                     segments: list[tuple[str, int]] | None = None) -> None:
        """After a round: what its drafts did. n_new: tokens the round added (accepted + the target's). segments:
        where the drafts came from, in order, as (source, tokens) (a chain, a free tail: several sources; None:
        all from plan.source). Each source learns its own part, from its own first token, where the round got
        that far (every token before it accepted). The round counts in `chosen` under its plan, tail included."""
        self.chosen[plan.key] = self.chosen.get(plan.key, 0) + 1
        for acc in self.acceptance.values():
            acc.fade(n_new)
        for source, n, accepted, reached in draft_parts(segments, plan.source, n_drafted, n_accepted):
            if n and reached:
                self.acceptance[source].record(n, accepted)
            if source in FREE_SOURCES:
                self._pending.pop(source, None)  # this round verified it: already recorded

    def tail(self, plan: Plan, segments: list[tuple[str, int]], offers: dict[str, int]) -> tuple[str, int] | None:
        """After the draft model's tokens (`plan`'s, drafted as `segments`): whether free tokens going on from
        them pay (the memory knows the record's next key once the model wrote its value), as (source, tokens) or
        None; the choice goes into `plan`. The drafting is done; what the free tokens
        add is the chance the draft so far is all accepted times what they bring, for a wider verify: they pay
        where they come faster than the round's own tokens (the rate the plan expected, at least the target
        alone's), the rate they would otherwise come at."""
        v1 = self.costs.step(1)
        if self.fixed or not offers or v1 is None:
            return None
        n, chance = 0, 1.0
        for source, t in segments:
            chance *= self.acceptance[source].reach(t)[t]
            n += t
        base = self.costs.step(n + 1)
        bar = max(plan.rate, 1.0 / v1)  # tokens per second the tail must beat
        best, best_gain = None, 0.0
        for source, top in offers.items():
            gained = 0.0
            for j, r in enumerate(self.acceptance[source].reach(min(top, self.draft_max - n))[1:], 1):
                gained += r
                gain = chance * gained - bar * (self.costs.step(n + j + 1) - base)  # tokens, net of their time
                if gain > best_gain:
                    best, best_gain = (source, j), gain
        if best is not None:
            plan.tail = best
        return best

    def hindsight(self, seq: list[int], proposals: dict[str, list[int]]) -> None:
        """Free sources judged for free, at every depth: a proposal each made after seq (in a round that did not
        use it) is held until the tokens the target makes in its place show how far it was right."""
        judge_offers(self._pending, self.acceptance, seq, proposals)

    @property
    def chosen_lengths(self) -> dict[str, int]:
        """Rounds by the draft planned for them, e.g. {"none": 12, "draft@3": 40, "lookup@6": 5, "memory@4+draft@2": 3}
        (the draft model may stop short of its plan: GenerationStats.n_drafted counts what it drafted)."""
        return {Plan(key[0] or None, key[1], then=key[2], tail=key[3:] if key[3] else None).name: n
                for key, n in sorted(self.chosen.items())}

    @property
    def plain_rounds(self) -> int:
        """Rounds that verified no draft (plain target steps)."""
        return self.chosen.get(Plan(None, 0).key, 0)


def draft_parts(segments: list[tuple[str, int]] | None, source: str | None, n_drafted: int, n_accepted: int):
    """A round's drafts by where they came from, in order: (source, tokens, how many of them were accepted,
    whether the round got as far as the first: every draft before it accepted). segments: (source, tokens) each
    (a chain, a tail); None: all n_drafted from `source` (none at all without one)."""
    if segments is None:
        segments = [(source, n_drafted)] if source is not None else []
    at = 0
    for name, n in segments:
        yield name, n, max(0, min(n_accepted - at, n)), n_accepted >= at
        at += n


def _at(values: list[float], i: int) -> float:
    return values[i] if i < len(values) else 0.0


def judge_free(pending: tuple[int, list[int]] | None, acceptance: Acceptance, seq: list[int],
               proposed: list[int]) -> tuple[int, list[int]] | None:
    """A free source (prompt lookup, the memory) judged in hindsight: a proposal made after seq[:start] and not
    verified is settled (recorded in `acceptance`) once the tokens made in its place show how far it was right.
    Returns what is still pending."""
    if pending is not None:
        start, tokens = pending
        n = 0
        while n < len(tokens) and start + n < len(seq) and seq[start + n] == tokens[n]:
            n += 1
        if n == len(tokens) or start + n < len(seq):  # fully right, or wrong at n: settled
            acceptance.record(len(tokens), n)
            pending = None
    if pending is None and proposed:
        pending = (len(seq), list(proposed))
    return pending


def judge_offers(pending: dict, acceptance: dict[str, Acceptance], seq: list[int],
                 offers: dict[str, list[int]]) -> None:
    """Every free source judged in hindsight (judge_free): `pending` holds each one's proposal still waiting for
    its verdict, `offers` what each proposes after seq now."""
    for source in FREE_SOURCES:
        pending[source] = judge_free(pending.get(source), acceptance[source], seq, offers.get(source, []))


@dataclass
class Lane:
    """One sequence's part in a batched step, as the batch planner sees it."""

    acceptance: dict[str, Acceptance]  # its own acceptance by source (its text, not its neighbours')
    room: int  # tokens it may draft this step (--draft-max, its context, --max-tokens)
    offers: dict[str, int]  # tokens each free source offers it now (see Planner.plan)
    model_behind: int | None  # tokens its draft model has yet to see (None: the draft cannot draft for it now)
    left: int = 0  # tokens it may still generate (--max-tokens, its context): what a prompt for its draft can repay


@dataclass
class BatchPlan:
    rows: int  # rows every sequence of the step's range takes (1: a plain step)
    sources: list[str | None]  # per lane: SOURCE_MODEL, a free source or None
    lengths: list[int]  # per lane: tokens to draft (at most rows - 1)
    rate: float = 0.0  # expected tokens per second for the whole batch


class BatchPlanner:
    """The cost model for several sequences in one target batch (continuous batching).

    A step over S sequence streams costs one target pass over S x R rows (every stream takes the same number of
    rows: llama.cpp passes once per equal-length run, see llama/model.py) plus, when any sequence drafts from the
    model, R - 1 batched draft steps. Each R and each choice of whether the draft model runs is weighed by the
    tokens the whole batch gains per second, every sequence with its own acceptance:

        plain              n / V(S)
        R rows, free       sum_i max_f E_f_i(min(R - 1, offer_f_i)) / V(S R)       (f: lookup, memory)
        R rows, + model    sum_i max(E_f_i, E_model_i(R - 1)) / (catch-up + (R - 1) D(w) + V(S R))

    V(n) is timed by total rows, D(w) by draft rows, both learned while serving (StepCosts). At high load V(S R)
    grows with R faster than the drafts pay for, so the plan shrinks toward plain batched decoding, and since
    plain is always an option, never below it."""

    def __init__(self, rows_max: int, draft_rows_max: int, has_model: bool, has_free: bool):
        # (Not from a single-sequence cost profile: tried as the prior of V, D and the pooled acceptance, it made the
        # demo pair's server 0.67x plain batching at 4 clients and no faster than plain at one: a lone sequence's
        # verify curve and draft step misjudge passes over several streams' rows. What a server measures stands.)
        self.rows_max = rows_max  # most rows in one target pass (the exact bound on a CPU)
        self.has_model = has_model
        self.has_free = has_free
        self.costs = StepCosts(rows_max)  # V by total rows
        self.draft_costs = StepCosts(draft_rows_max)  # a draft pass by total rows (catch-up rows included)
        self._since_plain = 0
        # Every sequence's acceptance evidence, pooled (fading as it comes, see record_round): a new sequence's prior,
        # so a request starts from what this server's drafts have been doing, not from optimistic guesses.
        self.pooled = new_acceptance(max(1, rows_max - 1))
        self.draft_passes = 0  # draft-model passes timed, any width
        # By load (streams in the step): [seconds the draft model's steps saved over plain batching, seconds its
        # prompts took], both fading as tokens are generated at that load (record_step, pays_back).
        self.payback: dict[int, list[float]] = {}

    @property
    def exploring(self) -> bool:
        """Whether the draft model's pass costs are still being learned: fewer than EXPLORE_PASSES passes timed."""
        return self.has_model and self.draft_passes < EXPLORE_PASSES

    def record_draft_pass(self, rows: int, seconds: float) -> None:
        """A draft-model pass over `rows` rows (several sequences' drafts, with any catch-up) took `seconds`."""
        self.draft_passes += 1
        self.draft_costs.record_verify(rows, seconds)

    def record_feed(self, n_streams: int, seconds: float) -> None:
        """The draft model's prompt pass took `seconds` while `n_streams` streams were in use."""
        self.payback.setdefault(n_streams, [0.0, 0.0])[1] += seconds

    def record_step(self, n_streams: int, tokens: int, model_saved: float | None) -> None:
        """A step over `n_streams` streams added `tokens` tokens; where sequences drafted from the model, the seconds
        their drafts saved over plain batching (negative: lost), drafting and the wider verify included."""
        if model_saved is None and n_streams not in self.payback:
            return
        ledger = self.payback.setdefault(n_streams, [0.0, 0.0])
        f = 0.5 ** (tokens / PAYBACK_HALF_LIFE)
        ledger[0] = ledger[0] * f + (model_saved or 0.0)
        ledger[1] *= f

    def pays_back(self, n_streams: int) -> bool:
        """Whether the record of the draft prompts fed at this load allows another: what the model's steps saved
        there falls short of what its prompts cost by less than an eighth of a plain step (noise). The what-if
        (drafts_wanted) rests on estimates; this is what happened. (On the 2-core CPU at 2 clients the what-if
        found the model worth its prompts, then the model drafted in few steps and saved less than its prompts
        cost, round after round: 2-4% of the server's time, a server slower than plain batching.) A shortfall
        fades by half every PAYBACK_HALF_LIFE tokens generated at that load, so the model is tried there again:
        after a prompt that was not repaid, some 7k tokens later on the 2-core CPU at 2 clients."""
        saved, spent = self.payback.get(n_streams, (0.0, 0.0))
        return spent - saved <= (self.costs.step(n_streams) or 0.0) / 8

    def feeds_refused(self, n_streams: int, fixed: bool = False) -> bool:
        """Whether the record refuses every draft prompt at this load, whatever the prompts (drafts_wanted is 0): not
        while exploring, nor for a --draft-fixed job. Cheap, so a caller can ask before sizing the prompts."""
        return not (fixed or self.exploring or self.pays_back(n_streams))

    def drafts_wanted(self, lanes: list[Lane], n_streams: int, draft_max: int, fixed: bool = False,
                      feed: int = 0) -> int | None:
        """How many of the sequences whose prompts the draft model has not seen should it see now (None: all),
        given the admitted sequences' `lanes` over `n_streams` streams (those still in prefill count: they are
        the load the prompts would serve) and `feed`, the tokens those prompts would cost the draft.

        All of them when this step's plan would draft from the model for some sequence were every prompt already
        in (it pays at this load and on this text), and what it saves over the tokens the sequences may still
        generate repays the prompts' pass (a lone request near its end is not worth one), and the prompts fed at
        this load so far were repaid (pays_back); none otherwise. Sent to
        a model that does not pay, a prompt only slows every sequence. (No re-tries beside this: acceptance fades
        back to its prior as tokens go by, so a model judged on old evidence is judged again by this same
        what-if; and a prompt fed to a model the what-if turns down would not be drafted from anyway.)
        While its costs are unknown: one prompt, when no sequence has one in and the plan would explore, so
        exploring costs one prompt and a few passes, not every newcomer's.
        fixed: as plan()'s (a --draft-fixed job drafts from the model whatever it costs: its prompt goes in)."""
        if not self.has_model:
            return 0
        if fixed:
            return None
        if self.feeds_refused(n_streams):
            return 0
        ready = [replace(lane, model_behind=0) for lane in lanes]
        plan = self._choose(ready, n_streams, draft_max)
        if SOURCE_MODEL not in plan.sources:
            return 0
        if self.exploring:
            return 0 if any(lane.model_behind is not None for lane in lanes) else 1
        per_token = self.draft_costs.prefill_per_token or self.draft_costs.step(1) or 0.0
        saved = sum(lane.left for lane in lanes) * (self.costs.step(n_streams) / len(lanes) - 1 / plan.rate)
        return None if saved > feed * per_token else 0

    def new_lane(self) -> Lane:
        """A new sequence's lane: its acceptance starts from the pooled evidence, worth POOLED_WEIGHT rounds."""
        width = max(1, self.rows_max - 1)
        # Its prior, where its own evidence fades back to as it writes, is what the server's drafts have shown (the
        # generic PRIOR until they showed something): faded back to the generic 0.85, a lane whose drafts were
        # accepted 65% of the time was tried again and again at two clients, where the model pays only above ~85%.
        own = {source: Acceptance(self.pooled[source].alpha(0), width).start_from(self.pooled[source], POOLED_WEIGHT)
               for source in SOURCES}
        return Lane(own, 0, {}, None)

    def plan(self, lanes: list[Lane], n_streams: int, draft_max: int, fixed: bool = False) -> BatchPlan:
        """The step's plan for `lanes` (the sequences that generate) over `n_streams` consecutive streams.
        fixed: draft draft_max tokens (within the rows' bound), from the model when it can: no cost model."""
        return self._keep(self._choose(lanes, n_streams, draft_max, fixed))

    def _choose(self, lanes: list[Lane], n_streams: int, draft_max: int, fixed: bool = False) -> BatchPlan:
        """plan() without keeping the record (drafts_wanted asks it what-if)."""
        n = len(lanes)
        r_max = max(1, min(draft_max + 1, self.rows_max // max(1, n_streams)))
        plain = BatchPlan(1, [None] * n, [0] * n)
        if r_max == 1 or not any(l.room for l in lanes):
            return plain
        if fixed:
            return self._assign(lanes, r_max, with_model=self.has_model, prefer_model=True)[0]
        v_plain = self.costs.verify[n_streams] if n_streams < len(self.costs.verify) else None
        if v_plain is None or self.costs.samples[n_streams] < 2 or self._since_plain >= REFRESH_ROUNDS:
            return plain  # the yardstick, as the single-sequence planner keeps it
        if self.exploring and any(l.model_behind is not None for l in lanes):
            # Then short drafts, to time draft passes and a small verify (as the single-sequence planner does; a
            # few, since the first pass of each batch shape has llama.cpp build its graph).
            rows = min(r_max, EXPLORE_K + 1)
            return self._assign(lanes, rows, with_model=True, prefer_model=True)[0]
        # Speculation must beat plain batching by a margin: a wrong guess costs every sequence in the batch, and
        # the estimates behind it (interpolated pass costs, a few rounds of acceptance) are noisy.
        best = BatchPlan(1, [None] * n, [0] * n, n / v_plain * BATCH_MARGIN)
        for rows in range(2, r_max + 1):
            for with_model in ((False, True) if self.has_model else (False,)):
                plan, expected, draft_rows, behind = self._assign(lanes, rows, with_model)
                cost = self.costs.step(n_streams * rows)
                if draft_rows:
                    d = self.draft_costs.step(draft_rows) or 0.0
                    first = self.draft_costs.step(draft_rows + behind) or d
                    cost += first + (rows - 2) * d
                plan.rate = expected / cost
                if plan.rate > best.rate:
                    best = plan
        return best

    def _assign(self, lanes: list[Lane], rows: int, with_model: bool, prefer_model: bool = False):
        """Each lane's source and length at `rows` rows, the one it expects most from (estimated acceptance, not
        the single-sequence planner's optimistic bound: a wrong guess here costs the whole batch; the model
        whenever it can with prefer_model): (plan, expected tokens, lanes drafting from the model, their catch-up
        tokens)."""
        sources, lengths, expected, draft_rows, behind = [], [], 0.0, 0, 0
        for lane in lanes:
            k = min(rows - 1, lane.room)
            options = [(1.0, None, 0)]
            for source, offer in (lane.offers.items() if self.has_free and k else ()):
                if offer:
                    kf = min(k, offer)
                    options.append((lane.acceptance[source].expected_tokens(kf), source, kf))
            if with_model and lane.model_behind is not None and k:
                e = lane.acceptance[SOURCE_MODEL].expected_tokens(k)
                options.append((math.inf if prefer_model else e, SOURCE_MODEL, k))
            e, source, length = max(options, key=lambda o: o[0])
            sources.append(source)
            lengths.append(length)
            expected += min(e, 1.0 + length)  # (prefer_model's inf counts as the most a draft can bring)
            if source == SOURCE_MODEL:
                draft_rows += 1
                behind += lane.model_behind
        return BatchPlan(rows, sources, lengths), expected, draft_rows, behind

    def _keep(self, plan: BatchPlan) -> BatchPlan:
        self._since_plain = 0 if plan.rows == 1 else self._since_plain + 1
        return plan

    def record_round(self, lane: Lane, source: str | None, n_drafted: int, n_accepted: int, n_new: int) -> None:
        """After a step, for one lane: what its drafts did (n_new: tokens the step added to it)."""
        for acc in lane.acceptance.values():
            acc.fade(n_new)
        if source is not None and n_drafted:
            lane.acceptance[source].record(n_drafted, n_accepted)
            # The pooled evidence fades by the tokens of rounds that drafted from the source, not by everyone's: a
            # burst of plain batching (eight users, where no draft pays) must not turn it back into the optimistic
            # prior, so a lone user after it starts from what the drafts did. (Each lane's own estimate fades by its
            # tokens, back toward the prior: within a request the source is tried again.)
            self.pooled[source].fade(n_new)
            self.pooled[source].record(n_drafted, n_accepted)


def new_acceptance(width: int) -> dict[str, Acceptance]:
    """A fresh sequence's acceptance by source, from the priors."""
    return {s: Acceptance(PRIOR[s], width) for s in SOURCES}
