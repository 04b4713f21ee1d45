"""Cumulative counters for one generation. The engine updates one instance in place and every event
carries it; `as_dict()` is what --json, bench and chat print."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .costs import draft_parts

# Why a generation ended: the one set of reasons (the engine's first three; the chat's last two), as
# Event.finish_reason, `run --json`'s finish_reason and a transcript's records say them.
FINISH_STOP = "stop"  # an end-of-generation token or a stop string
FINISH_LENGTH = "length"  # --max-tokens reached
FINISH_CONTEXT = "context"  # the context window is full
FINISH_INTERRUPTED = "interrupted"  # Ctrl-C during the answer
FINISH_ERROR = "error"  # the process is ending on a failure mid-answer (an RPC server went away)
# GenerationStats.exact when no verify batch runs at all: nothing to prove.
EXACT_ALONE = "yes (the target alone)"


class Rates:
    """tokens/s, acceptance rate and tokens per target step, from the counters the class holds
    (n_generated, t_generation, n_drafted, n_accepted, n_target_steps): one generation or a session."""

    @property
    def tokens_per_second(self) -> float:
        t = self.t_generation
        return self.n_generated / t if t > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens gained per target step, the bonus token included (target alone = 1.00)."""
        return self.n_generated / self.n_target_steps if self.n_target_steps else 0.0


@dataclass
class GenerationStats(Rates):
    method: str = "target"  # "target" (alone), "draft" (draft model), "lookup" (prompt lookup) or "hybrid" (both)
    engine: str = "sequential"  # which loop ran the rounds (engine.ENGINE_SEQUENTIAL, the only one)
    n_prompt: int = 0  # prompt tokens
    n_prompt_evaluated: int = 0  # prompt tokens the target actually processed (cache reuse skips the rest)
    n_prompt_evaluated_draft: int = 0  # prompt tokens the draft model processed (it reuses its cache too)
    n_generated: int = 0  # tokens yielded to the consumer
    n_drafted: int = 0
    n_accepted: int = 0
    n_target_steps: int = 0  # target decode calls during generation (one verify batch = one step)
    n_draft_steps: int = 0  # draft decode calls during generation
    drafted_at: list[int] = field(default_factory=list)  # per draft position: tokens drafted there
    accepted_at: list[int] = field(default_factory=list)  # per draft position: of those, accepted
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted) per target step
    draft_lengths: dict[str, int] = field(default_factory=dict)  # target steps by the draft planned for them: "none", "draft@3"…
    accepted_by: dict[str, int] = field(default_factory=dict)  # accepted tokens by source: "draft", "lookup", "memory"
    speculation_note: str | None = None  # why the cost model left speculation off, when it did
    exact: str = ""  # the exactness proof's verdict for this target here ("proven (batches <= 16)", "no - ..."), or
    # EXACT_ALONE; "" when the caller did not say
    batch_max: int = 1  # the most generations that shared one target pass with this one (batched serving)
    t_prompt: float = 0.0  # seconds processing the prompt (target and draft)
    t_draft: float = 0.0  # seconds drafting during generation
    t_target: float = 0.0  # seconds in target verification during generation
    t_start: float = field(default_factory=time.perf_counter)  # generation start (after the prompt)
    t_end: float | None = None

    @property
    def t_generation(self) -> float:
        return (self.t_end if self.t_end is not None else time.perf_counter()) - self.t_start

    @property
    def n_prompt_cached(self) -> int:
        """Prompt tokens the target did not process: a cache held them (its own, or another slot's copied over).
        0 until the prompt is in."""
        return max(0, self.n_prompt - self.n_prompt_evaluated) if self.n_prompt_evaluated else 0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.n_prompt_evaluated / self.t_prompt if self.t_prompt > 0 else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def record_draft(self, n_drafted: int, n_accepted: int, source: str | None = None,
                     segments: list[tuple[str, int]] | None = None) -> None:
        """One round: `source` drafted n_drafted tokens, n_accepted accepted; `segments`, where the drafts came
        from in order as (source, tokens), when several sources made them (costs.Planner.record_round)."""
        self.rounds.append((n_drafted, n_accepted))
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted
        for name, _, got, _ in draft_parts(segments, source, n_drafted, n_accepted):
            if got:
                self.accepted_by[name] = self.accepted_by.get(name, 0) + got
        if len(self.drafted_at) < n_drafted:
            grow = n_drafted - len(self.drafted_at)
            self.drafted_at.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for i in range(n_drafted):
            self.drafted_at[i] += 1
            if i < n_accepted:
                self.accepted_at[i] += 1

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "engine": self.engine,
            "n_prompt_tokens": self.n_prompt,
            "n_prompt_evaluated": self.n_prompt_evaluated,
            "n_tokens": self.n_generated,
            "drafted": self.n_drafted,
            "accepted": self.n_accepted,
            "acceptance_rate": round(self.acceptance_rate, 4) if self.n_drafted else None,  # nothing drafted: n/a
            "target_steps": self.n_target_steps,
            "draft_steps": self.n_draft_steps,
            "tokens_per_step": round(self.tokens_per_step, 4),
            "acceptance_by_position": [round(x, 4) for x in self.acceptance_by_position],
            "draft_lengths": dict(self.draft_lengths),
            "accepted_by": dict(self.accepted_by),
            "speculation_note": self.speculation_note,
            "exact": self.exact or None,
            "batch_max": self.batch_max,
            "tokens_per_second": round(self.tokens_per_second, 3),
            "prompt_seconds": round(self.t_prompt, 4),
            "prompt_tokens_per_second": round(self.prompt_tokens_per_second, 2),
            "generation_seconds": round(self.t_generation, 4),
            "draft_seconds": round(self.t_draft, 4),
            "target_seconds": round(self.t_target, 4),
        }
