"""Interleaved benchmark runs: the target alone and each speculative variant on the same prompts, same
settings and seed, with loaded models reused throughout.

Order: a warm-up run of every variant (untimed: first-touch page faults, thread pools and allocator
growth would otherwise land on whoever runs first), then for each repeat and prompt every variant back to
back, the order reversed on odd repeats (A B, B A, ...) so slow drift and any order effect fall on both
sides alike. Every run starts from an empty KV cache in both models, so no run reuses another's prompt.

A variant with the drafting memory ("hybrid+memory") has a memory of its own, emptied at the start of every
repeat: within a repeat each prompt may draft from the answers to the prompts before it (a sequence of similar
requests, as a user or a server sends them), never from its own answer in an earlier repeat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .prompts import BenchPrompt
from .stats import (BASELINE, CONTROL, Mismatch, RunRecord, check_identity, parse_variant, record_from_events, summarize,
                          variant_name)
from ..engine.drafters import METHOD_LOOKUP, METHODS, make_drafter, split_method
from ..engine.memory import DraftMemory
from ..engine.loop import generate
from ..errors import PromptError, UsageError
from ..loader import DEFAULT_MEMORY_MB, Loaded
from ..prompt import build_prompt
from ..engine.sampling import SamplingParams

WARMUP_TOKENS = 32
# Two greedy candidates whose target logits are closer than this are a floating-point tie: llama.cpp's CPU
# kernels accumulate in a different order for a 1-token step than for a (γ+1)-token verify batch, and
# differences of ~1e-4 can flip such a tie. Reported as a near-tie, still as not identical.
NEAR_TIE_LOGITS = 0.01

@dataclass
class BenchConfig:
    prompts: list[BenchPrompt]
    methods: list[str]
    draft_max: list[int]
    repeats: int = 3
    warmup: bool = True
    max_tokens: int = 128
    params: SamplingParams = SamplingParams(temperature=0.0, seed=0)
    raw: bool = False
    fixed: bool = False  # --draft-fixed: every step drafts draft_max (no cost model)

    @property
    def variants(self) -> list[tuple[str, int | None]]:
        return [(BASELINE, None)] + [(m, n) for m in self.methods for n in ([None] if m == CONTROL else self.draft_max)]

    @property
    def total_runs(self) -> int:
        n = len(self.variants)
        return (n if self.warmup else 0) + self.repeats * len(self.prompts) * n


@dataclass
class BenchRun:
    records: list[RunRecord]
    mismatches: list[Mismatch] | None  # None: not checked (sampling is not expected to match)
    prompt_tokens: dict[str, int]
    texts: dict[str, str]  # the target alone's answer to each prompt (first repeat)
    wall_seconds: float
    confirmation: list[RunRecord]  # after a sweep: the best variant and the target alone measured again
    warmup_seconds: float = 0.0
    templated: bool = True


def drafters_for(loaded: Loaded, methods: list[str], draft_p_min: float = 0.0,
                memory_mb: int = DEFAULT_MEMORY_MB) -> dict:
    out = {}
    for name in methods:
        if name == CONTROL:  # the target alone again: no drafter
            continue
        m, with_memory = split_method(name)
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
        if loaded.verify_max == 1:  # --exact where no verify batch is proven exact: nothing but the target runs
            raise UsageError(f"--exact: no verify batch is proven exact here ({loaded.exactness.why()}), so no "
                             "method can speculate; without --exact, bench shows what speculation does anyway")
        if m != METHOD_LOOKUP and loaded.draft_model is None:
            raise UsageError(f"--methods {m} needs a draft model; pass --draft PATH or use --methods lookup")
        memory = DraftMemory(memory_mb << 20) if with_memory else None
        through_text = loaded.target if loaded.drafter is not None and loaded.drafter.through_text else None
        out[name] = make_drafter(m, loaded.draft_model, draft_p_min, memory=memory, through_text_for=through_text)
    return out


def run_bench(loaded: Loaded, config: BenchConfig, *, draft_p_min: float = 0.0, memory_mb: int = DEFAULT_MEMORY_MB,
              on_run: Callable[[str, str, int], None] | None = None) -> BenchRun:
    """on_run(prompt_id, variant, repeat) is called after every run (repeat -1 for warm-up): for progress.
    memory_mb: the bound of each "+memory" variant's drafting memory."""
    drafters = drafters_for(loaded, config.methods, draft_p_min, memory_mb)
    memories = [d.memory for d in drafters.values() if d.memory is not None]
    tokenized: list[tuple[BenchPrompt, list[int]]] = []
    templated = True
    for bp in config.prompts:
        toks, used = build_prompt(loaded.target, bp.text, raw=config.raw)
        templated = templated and used
        if len(toks) >= loaded.target.n_ctx:  # say so now, not after the prompts before it have run
            raise PromptError(f"prompt {bp.id} is {len(toks)} tokens but the context holds {loaded.target.n_ctx}",
                              hint="raise --ctx-size or shorten the prompt")
        tokenized.append((bp, toks))

    def one(bp: BenchPrompt, toks: list[int], method: str, n: int | None, repeat: int, max_tokens: int) -> RunRecord:
        # A fresh KV state per run: no run may reuse a cached prompt or answer from the previous one.
        loaded.target.truncate(0)
        if loaded.draft_model is not None:
            loaded.draft_model.truncate(0)
        drafter = drafters.get(method)  # None: the target alone (BASELINE, CONTROL)
        events = generate(loaded.target, toks, drafter=drafter, params=config.params,
                          max_tokens=max_tokens, draft_max=n or 1, fixed=config.fixed, profile=loaded.profile,
                          verify_max=loaded.verify_max, exact=loaded.exact_label)
        rec = record_from_events(events, prompt_id=bp.id, category=bp.category,
                                 variant=variant_name(method, n), repeat=repeat)
        if on_run is not None:
            on_run(bp.id, rec.variant, repeat)
        return rec

    t0 = time.perf_counter()
    if config.warmup:
        bp, toks = tokenized[0]
        for method, n in config.variants:
            one(bp, toks, method, n, -1, min(config.max_tokens, WARMUP_TOKENS))
    t1 = time.perf_counter()

    def timed(variants: list[tuple[str, int | None]]) -> list[RunRecord]:
        out = []
        for repeat in range(config.repeats):
            for memory in memories:
                memory.clear()  # a repeat's prompts draft from the answers before them in it, not from their own
            k = repeat % len(variants)  # the order rotates every repeat, so no variant always goes first
            for bp, toks in tokenized:
                for method, n in variants[k:] + variants[:k]:
                    out.append(one(bp, toks, method, n, repeat, config.max_tokens))
        return out

    records = timed(config.variants)
    confirmation: list[RunRecord] = []
    if sum(method != CONTROL for method, _ in config.variants) > 2:
        # A sweep: the best variant is the one that scored highest, so its score is biased upward (it won
        # partly by luck). It is measured again, fresh, against the target alone, and that is the figure.
        best = summarize(records, [bp.id for bp in config.prompts])["best"]
        if best is not None:
            confirmation = timed([(BASELINE, None), parse_variant(best)])
    wall = time.perf_counter() - t1

    mismatches = check_identity(records) + check_identity(confirmation) if config.params.greedy else None
    if mismatches:
        _classify(loaded, dict((bp.id, t) for bp, t in tokenized), records, mismatches)
    texts = {r.prompt_id: loaded.target.detokenize(r.tokens)
             for r in records if r.variant == BASELINE and r.repeat == 0}
    return BenchRun(records, mismatches, {bp.id: len(t) for bp, t in tokenized}, texts, wall, confirmation,
                    warmup_seconds=t1 - t0, templated=templated)


CALIBRATION_TIMINGS = 4  # timed steps per size when calibrating (after one untimed: its graph is built then)


def calibration_plan(loaded: Loaded, width: int) -> tuple[list[int], int]:
    """The text a calibration times its steps on (the derived draft's calibration text: every sweep sees the same,
    whatever the bench's prompts) and the verify width it can time (at most `width` drafted tokens, within the
    exact verify bound on the CPU): (tokens, width)."""
    from ..models.derive import CALIBRATION

    target = loaded.target
    tokens = target.tokenize(CALIBRATION, add_special=False)
    if loaded.verify_max is not None:
        width = min(width, loaded.verify_max - 1)
    return tokens, max(1, min(width, len(tokens) - 33, target.n_batch - 1))


def calibrate(loaded: Loaded, tokens: list[int], width: int) -> None:
    """Start the pair's cost profile afresh from an explicit sweep (calibration_plan's tokens and width): the
    target's steps over 1..width+1 tokens, the draft model's one-token step and catch-up, each timed
    CALIBRATION_TIMINGS times after an untimed one. The bench's runs then add their acceptance (and costs) to it, as
    any run does."""
    from ..engine.costs import Planner
    from ..engine.profile import CostProfile

    if loaded.profile is None:
        return
    target, draft = loaded.target, loaded.draft_model
    planner = Planner(width, has_model=draft is not None, has_free=True)
    head = tokens[:32]

    def timed(model, base: list[int], extra: list[int], n_logits: int) -> float:
        model.truncate(len(base))
        t0 = time.perf_counter()
        model.sync(base + extra, n_logits=n_logits)
        return time.perf_counter() - t0

    target.truncate(0)
    t0 = time.perf_counter()
    target.sync(head, n_logits=1)
    planner.costs.record_prefill(len(head), time.perf_counter() - t0)
    for n in range(1, width + 2):
        for i in range(CALIBRATION_TIMINGS + 1):
            seconds = timed(target, head, tokens[32:32 + n], n)
            if i:
                planner.costs.record_verify(n, seconds)
    target.truncate(0)
    if draft is not None:
        draft.truncate(0)
        draft.sync(head, n_logits=1)
        for i in range(CALIBRATION_TIMINGS + 1):
            one = timed(draft, head, tokens[32:33], 1)
            batch = timed(draft, head, tokens[32:48], 0)
            if i:
                planner.costs.record_draft(one)
                planner.costs.record_catchup(1, one)
                planner.costs.record_catchup(16, batch)
        draft.truncate(0)
    loaded.profile.profile = CostProfile()
    loaded.profile.absorb(planner)


def _classify(loaded: Loaded, prompts: dict[str, list[int]], records: list[RunRecord], mismatches: list[Mismatch]) -> None:
    """Give each mismatch the target's logit margin between the two outputs' tokens at the divergence (the
    top two when one output ended there): a near-tie points at batch-size numerics, a wide margin at a bug."""
    tokens = {(r.prompt_id, r.variant, r.repeat): r.tokens for r in records}
    seen: dict[tuple[str, str, int], tuple[float, bool]] = {}
    for m in mismatches:
        base = tokens[(m.prompt_id, BASELINE, m.repeat)]
        spec = tokens[(m.prompt_id, m.variant, m.repeat)]
        key = (m.prompt_id, m.variant, m.position)
        if key not in seen:
            loaded.target.truncate(0)
            # Like the target alone's own step: the context in one pass, the last token in a batch of one.
            logits = np.asarray(loaded.target.sync(prompts[m.prompt_id] + base[: m.position], n_logits=1)[0],
                                dtype=np.float64)
            if m.position < len(base) and m.position < len(spec):
                margin = abs(logits[base[m.position]] - logits[spec[m.position]])
            else:
                top2 = np.sort(logits)[-2:]
                margin = float(top2[1] - top2[0])
            seen[key] = (float(margin), bool(margin < NEAR_TIE_LOGITS))
        m.margin, m.near_tie = seen[key]
    loaded.target.truncate(0)
