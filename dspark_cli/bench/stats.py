"""Benchmark statistics: one record per generation, medians over repeats, sums over prompts, and the
speedup Leviathan et al.'s formula predicts from what was measured.

How figures are formed, so they can be signed:
- Per prompt and method, each timing is the median over repeats (interleaved runs make the medians of
  the target alone and of speculation comparable); token and step counts are per-run means (identical
  across repeats when decoding is deterministic).
- A category or the whole suite sums those per-prompt medians: tokens/s there is total tokens over total
  generation seconds, so speedup is how much faster the suite as a whole ran, long answers weighing more.
- Acceptance rate is accepted/drafted. The formula needs α, the probability that a drafted token is accepted
  given that the ones before it were; accepted/drafted underestimates it (tokens drafted after a rejection
  count as rejected), so α is estimated per round as accepted / (accepted + rounds that hit a rejection),
  the maximum-likelihood estimate under the formula's own independence assumption.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable

BASELINE = "target"  # the method name of the target alone
# The target alone run again as a variant of its own (bench --methods hybrid,control): its ratio to the target
# alone in the same round would be 1.00 on a quiet machine, so its spread over the rounds is the noise a
# speculative variant's spread must be read against (a shared memory bus moves a 5-second run by 5-10%).
CONTROL = "control"


@dataclass
class RunRecord:
    """One timed generation (prompt processing excluded from t_gen)."""

    prompt_id: str
    category: str
    variant: str  # "target", "draft@8", "lookup@4"
    repeat: int
    tokens: list[int]
    n_generated: int
    n_prompt: int
    t_prompt: float
    t_gen: float
    t_draft: float
    t_target: float
    n_target_steps: int
    n_draft_steps: int
    n_drafted: int
    n_accepted: int
    drafted_at: list[int]
    accepted_at: list[int]
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted) per target step
    finish_reason: str | None = None
    engine: str = "sequential"
    draft_lengths: dict[str, int] = field(default_factory=dict)  # target steps by what they verified
    speculation_note: str | None = None
    accepted_by: dict[str, int] = field(default_factory=dict)  # accepted tokens by source (engine/costs.SOURCES)

    @property
    def rejections(self) -> int:
        return sum(1 for d, a in self.rounds if d > 0 and a < d)

    @property
    def draft_rounds(self) -> int:
        return sum(1 for d, _ in self.rounds if d > 0)


def variant_name(method: str, draft_max: int | None) -> str:
    return method if method in (BASELINE, CONTROL) else f"{method}@{draft_max}"


def parse_variant(name: str) -> tuple[str, int | None]:
    method, _, n = name.partition("@")
    return method, (int(n) if n else None)


def record_from_events(events: Iterable, *, prompt_id: str, category: str, variant: str, repeat: int) -> RunRecord:
    """A RunRecord from the engine's event stream (the closing event carries the final stats)."""
    tokens: list[int] = []
    stats = None
    finish = None
    for ev in events:
        stats = ev.stats
        if ev.token is not None:
            tokens.append(ev.token)
        if ev.finish_reason is not None:
            finish = ev.finish_reason
    if stats is None:
        raise ValueError("empty event stream")
    return RunRecord(
        prompt_id=prompt_id, category=category, variant=variant, repeat=repeat, tokens=tokens,
        n_generated=stats.n_generated, n_prompt=stats.n_prompt, t_prompt=stats.t_prompt,
        t_gen=stats.t_generation, t_draft=stats.t_draft, t_target=stats.t_target,
        n_target_steps=stats.n_target_steps, n_draft_steps=stats.n_draft_steps,
        n_drafted=stats.n_drafted, n_accepted=stats.n_accepted,
        drafted_at=list(stats.drafted_at), accepted_at=list(stats.accepted_at),
        rounds=list(stats.rounds), finish_reason=finish, engine=stats.engine,
        draft_lengths=dict(stats.draft_lengths), speculation_note=stats.speculation_note,
        accepted_by=dict(stats.accepted_by),
    )


# ------------------------------------------------------------------------------------------ aggregation


@dataclass
class Cell:
    """Medians of one prompt x variant over repeats, or a sum of such cells (a category, the suite)."""

    prompts: int = 0
    runs: int = 0
    tokens: float = 0.0
    t_gen: float = 0.0
    t_prompt: float = 0.0
    t_draft: float = 0.0
    t_target: float = 0.0
    target_steps: float = 0.0
    draft_steps: float = 0.0
    drafted: float = 0.0
    accepted: float = 0.0
    rejections: float = 0.0
    draft_rounds: float = 0.0
    drafted_at: list[float] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)

    @classmethod
    def of_runs(cls, runs: list[RunRecord]) -> "Cell":
        n = len(runs)

        def med(attr: str) -> float:
            return statistics.median(getattr(r, attr) for r in runs)

        def mean(values: Iterable[float]) -> float:
            return sum(values) / n

        width = max((len(r.drafted_at) for r in runs), default=0)
        return cls(
            prompts=1, runs=n, tokens=med("n_generated"), t_gen=med("t_gen"), t_prompt=med("t_prompt"),
            t_draft=med("t_draft"), t_target=med("t_target"),
            target_steps=mean(r.n_target_steps for r in runs), draft_steps=mean(r.n_draft_steps for r in runs),
            drafted=mean(r.n_drafted for r in runs), accepted=mean(r.n_accepted for r in runs),
            rejections=mean(r.rejections for r in runs), draft_rounds=mean(r.draft_rounds for r in runs),
            drafted_at=[mean(_at(r.drafted_at, i) for r in runs) for i in range(width)],
            accepted_at=[mean(_at(r.accepted_at, i) for r in runs) for i in range(width)],
        )

    def __add__(self, other: "Cell") -> "Cell":
        width = max(len(self.drafted_at), len(other.drafted_at))
        return Cell(
            prompts=self.prompts + other.prompts, runs=self.runs + other.runs,
            **{k: getattr(self, k) + getattr(other, k) for k in (
                "tokens", "t_gen", "t_prompt", "t_draft", "t_target", "target_steps", "draft_steps",
                "drafted", "accepted", "rejections", "draft_rounds")},
            drafted_at=[_at(self.drafted_at, i) + _at(other.drafted_at, i) for i in range(width)],
            accepted_at=[_at(self.accepted_at, i) + _at(other.accepted_at, i) for i in range(width)],
        )

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.t_gen if self.t_gen > 0 else 0.0


def _at(values: list, i: int) -> float:
    return values[i] if i < len(values) else 0


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def expected_tokens(alpha: float, gamma: float) -> float:
    """Leviathan et al.: expected tokens per target step with per-token acceptance α and draft length γ,
    the bonus token included: (1 − α^(γ+1)) / (1 − α)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1.0)) / (1.0 - alpha)


def predicted_speedup(alpha: float, gamma: float, c: float, verify_cost: float = 1.0) -> float:
    """E / (γ·c + verify_cost): verify_cost is the cost of one (γ+1)-token target batch relative to one
    single-token step (1 on a GPU that verifies for free; measured on CPU, where it is not)."""
    return expected_tokens(alpha, gamma) / (gamma * c + verify_cost)


def sequential_ceiling(alpha: float, gamma: int, step: float, draft: float, verify: float) -> float:
    """Speedup over the target alone of draft-then-verify rounds on the same cores, with no overhead: each
    round drafts γ tokens and verifies γ+1 (`verify` seconds); the draft also feeds the previous round's
    last token, one more step when the whole draft was accepted (probability α^γ). `step` is one target
    step alone, `draft` one draft step, all in seconds."""
    return expected_tokens(alpha, gamma) * step / ((gamma + alpha**gamma) * draft + verify)


def overlapped_ceiling(alpha: float, gamma: int, step: float, draft: float, verify: float) -> float:
    """Speedup over the target alone when the draft and the target run at once on separate cores, with no
    overhead and no draft lost on a failed bet: every output token passes once through the draft, and every
    γ+1-token verify (`verify` seconds on the target's share of the cores) yields E tokens, so a token costs
    at least the larger of the two. `step` is one target step alone on all the cores."""
    return step / max(draft, verify / expected_tokens(alpha, gamma))


def compare(spec: Cell, base: Cell) -> dict:
    """Every figure of one speculative cell against the target alone on the same prompts."""
    base_tps, spec_tps = base.tokens_per_second, spec.tokens_per_second
    out = {
        "prompts": spec.prompts,
        "runs": spec.runs,
        "baseline_tokens_per_second": base_tps,
        "speculative_tokens_per_second": spec_tps,
        "speedup": _div(spec_tps, base_tps),
        "tokens": spec.tokens,
        "baseline_generation_seconds": base.t_gen,
        "speculative_generation_seconds": spec.t_gen,
        "baseline_prompt_seconds": base.t_prompt,
        "speculative_prompt_seconds": spec.t_prompt,
        "acceptance_rate": _div(spec.accepted, spec.drafted) or 0.0,
        "mean_accepted_tokens": _div(spec.tokens, spec.target_steps),
        "acceptance_by_position": [a / d if d else 0.0 for a, d in zip(spec.accepted_at, spec.drafted_at)],
        "alpha": None, "mean_draft_length": None, "drafted_step_fraction": None, "cost_ratio": None, "verify_cost": None,
        "predicted_mean_accepted_tokens": None, "predicted_speedup": None,
    }
    step = _div(base.t_target, base.target_steps)  # target-alone seconds per token
    gamma = _div(spec.drafted, spec.draft_rounds)
    if not step or not gamma or not spec.target_steps:
        return out  # nothing was drafted: no formula to apply
    alpha = spec.accepted / (spec.accepted + spec.rejections) if spec.accepted + spec.rejections else 0.0
    verify = spec.t_target / spec.target_steps / step
    # Steps that drafted nothing (prompt lookup without a match, the last step before --max-tokens) gain one
    # token, not E: the formula applies to the fraction f of steps that drafted.
    f = min(1.0, spec.draft_rounds / spec.target_steps)
    if spec.draft_steps:
        c = spec.t_draft / spec.draft_steps / step
        draft_term = f * gamma * c
    else:  # a drafter without a model (prompt lookup): its whole cost per step, relative to a target step
        c = None
        draft_term = spec.t_draft / spec.target_steps / step
    e = f * expected_tokens(alpha, gamma) + (1.0 - f)
    out.update(alpha=alpha, mean_draft_length=gamma, drafted_step_fraction=f, cost_ratio=c, verify_cost=verify,
               predicted_mean_accepted_tokens=e, predicted_speedup=e / (draft_term + verify))
    return out


@dataclass
class Mismatch:
    prompt_id: str
    variant: str
    repeat: int
    position: int  # first differing token index
    baseline_tokens: int
    speculative_tokens: int
    # Filled in by the runner from the target's logits at `position`: how far apart the two candidates were.
    margin: float | None = None
    near_tie: bool | None = None


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_identity(records: list[RunRecord]) -> list[Mismatch]:
    """Every speculative output against the target alone's on the same prompt and repeat."""
    base = {(r.prompt_id, r.repeat): r.tokens for r in records if r.variant == BASELINE}
    out = []
    for r in records:
        if r.variant == BASELINE or (r.prompt_id, r.repeat) not in base:
            continue
        ref = base[(r.prompt_id, r.repeat)]
        pos = first_difference(ref, r.tokens)
        if pos is not None:
            out.append(Mismatch(r.prompt_id, r.variant, r.repeat, pos, len(ref), len(r.tokens)))
    return out


def rounds_spread(spec: list[RunRecord], base: list[RunRecord]) -> dict:
    """Per repeat (round), the speedup against the target alone in the same round and the share of target steps
    that verified a draft: how steady the result and the cost model's decisions were, not only their median."""
    alone = {r.repeat: r for r in base}
    speedups, drafted = [], []
    for r in sorted(spec, key=lambda r: r.repeat):
        b = alone.get(r.repeat)
        if b is not None and r.t_gen > 0 and b.t_gen > 0 and b.n_generated:
            speedups.append((r.n_generated / r.t_gen) / (b.n_generated / b.t_gen))
        if r.n_target_steps:
            drafted.append(r.draft_rounds / r.n_target_steps)
    return {"speedup_rounds": speedups, "drafted_fraction_rounds": drafted,
            "speedup_min": min(speedups, default=None), "speedup_max": max(speedups, default=None)}


def summarize(records: list[RunRecord], prompt_order: list[str] | None = None) -> dict:
    """Per variant: per-prompt, per-category and overall comparisons against the target alone, and the
    best variant by overall speedup."""
    cells: dict[tuple[str, str], Cell] = {}
    categories: dict[str, str] = {}
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.prompt_id, r.variant), []).append(r)
        categories[r.prompt_id] = r.category
    for key, runs in groups.items():
        cells[key] = Cell.of_runs(runs)
    prompts = prompt_order or list(dict.fromkeys(r.prompt_id for r in records))
    variants = [v for v in dict.fromkeys(r.variant for r in records) if v != BASELINE]

    result: dict = {"variants": []}
    for v in variants:
        per_prompt, by_cat_spec, by_cat_base = [], {}, {}
        total_spec, total_base = Cell(), Cell()
        for pid in prompts:
            spec, base = cells.get((pid, v)), cells.get((pid, BASELINE))
            if spec is None or base is None:
                continue
            cat = categories[pid]
            per_prompt.append({"prompt_id": pid, "category": cat, **compare(spec, base),
                               **rounds_spread(groups.get((pid, v), []), groups.get((pid, BASELINE), []))})
            by_cat_spec[cat] = by_cat_spec.get(cat, Cell()) + spec
            by_cat_base[cat] = by_cat_base.get(cat, Cell()) + base
            total_spec, total_base = total_spec + spec, total_base + base
        method, draft_max = parse_variant(v)
        runs = [r for r in records if r.variant == v]
        lengths: dict[str, int] = {}
        sources: dict[str, int] = {}
        for r in runs:
            for key, n in r.draft_lengths.items():
                lengths[key] = lengths.get(key, 0) + n
            for key, n in r.accepted_by.items():
                sources[key] = sources.get(key, 0) + n
        result["variants"].append({
            "variant": v, "method": method, "draft_max": draft_max,
            "engine": runs[0].engine if runs else None,
            # Target steps by what they verified, over every run: the cost model's choices ("none" = a plain step).
            "draft_lengths": dict(sorted(lengths.items(), key=lambda kv: -kv[1])),
            # Accepted tokens by where their draft came from (the draft model, prompt lookup, the memory).
            "accepted_by": dict(sorted(sources.items(), key=lambda kv: -kv[1])),
            # Prompts on which the cost model left speculation off for most steps, and why (first repeat's words).
            "speculation_off": {r.prompt_id: r.speculation_note for r in runs if r.speculation_note and r.repeat <= 0},
            "overall": compare(total_spec, total_base),
            "per_category": [{"category": c, **compare(by_cat_spec[c], by_cat_base[c])} for c in by_cat_spec],
            "per_prompt": per_prompt,
        })
    # The control is no contender: best only when it is all that ran.
    measured = [x for x in result["variants"] if x["overall"]["speedup"] is not None]
    ranked = [x for x in measured if x["variant"] != CONTROL] or measured
    result["best"] = max(ranked, key=lambda x: x["overall"]["speedup"])["variant"] if ranked else None
    return result
