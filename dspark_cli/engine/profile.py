"""What earlier runs measured on this machine for one pair: the prior a new run's cost model starts from.

A run that starts from nothing pays to learn (plain steps to time the yardstick, a short draft to time the draft
model, optimistic acceptance that a few unlucky rounds can overturn), and short answers end before the learning
pays back. A profile keeps what the cost model measured (costs.Planner: the one-token step, the verify curve,
the draft step and catch-up, acceptance by depth per drafter) so the next run drafts from its first round when
drafting paid here before, and one bad early round does not outweigh many good runs.

Robust to a shared, noisy machine:
- costs are kept relative to the one-token step V(1) of the same run (a busy memory bus slows every step alike,
  so the ratios, which are all a choice depends on, hold), each as the last KEEP_RUNS runs' values, read as their
  median: one disturbed run moves nothing;
- the absolute V(1) only anchors the scale until this run's own steps are timed (costs.StepCosts re-scales the
  profile's curve by what it measures, the yardstick re-timed every REFRESH_ROUNDS rounds);
- acceptance evidence is pooled over runs and capped at ACCEPTANCE_CAP rounds, so old runs fade as new ones come,
  and a new run takes it as a prior worth PROFILE_WEIGHT rounds of its own: its own text soon decides.

This module is pure data (no files): models/profiles.py stores profiles, keyed by the files, build and device.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .costs import PRIOR, SOURCES, Acceptance

VERSION = 1
KEEP_RUNS = 9  # runs whose cost figures are kept; the median of them is used
ACCEPTANCE_CAP = 256.0  # rounds of acceptance evidence a profile keeps (older evidence is scaled down): the last
# few answers' worth, so the prior follows what the user has been asking for lately (code all day, or prose). A
# cap of 1,024 (the long-run mix) drafted less on the code prompts and ran the suite no steadier (bench, 5 rounds)
PROFILE_WEIGHT = 8.0  # how many rounds of a run's own the profile's acceptance is worth to it
WIDTH_MAX = 64  # draft positions kept


@dataclass
class CostPrior:
    """A profile's costs as costs.StepCosts reads them: seconds of one target step, the rest relative to it."""

    v1: float
    verify: dict[int, float]  # n -> V(n) / V(1)
    draft: float | None = None  # a draft-model step / V(1)
    catchup_one: float | None = None
    catchup_per_token: float | None = None
    prefill_per_token: float | None = None


@dataclass
class CostProfile:
    runs: int = 0  # runs absorbed
    figures: dict[str, list[float]] = field(default_factory=dict)  # "v1" (seconds), "verify.N", "draft", ... (ratios)
    acceptance: dict[str, Acceptance] = field(default_factory=dict)

    # ---- reading ------------------------------------------------------------------------------------------
    def _median(self, key: str) -> float | None:
        values = self.figures.get(key)
        return statistics.median(values) if values else None

    def prior(self) -> CostPrior | None:
        """The costs to start from, or None while no run timed a one-token step."""
        v1 = self._median("v1")
        if v1 is None:
            return None
        verify = {int(k.split(".", 1)[1]): self._median(k) for k in self.figures if k.startswith("verify.")}
        verify[1] = 1.0
        return CostPrior(v1, verify, *(self._median(k) for k in ("draft", "catchup_one", "catchup_per_token",
                                                                 "prefill_per_token")))

    def acceptance_prior(self, source: str) -> Acceptance | None:
        acc = self.acceptance.get(source)
        return acc if acc is not None and acc.evidence > 0 else None

    # ---- learning -----------------------------------------------------------------------------------------
    def absorb(self, planner) -> bool:
        """Take what one finished run's planner (costs.Planner) measured. Costs count only from a run that timed
        its own one-token step (they are kept relative to it); acceptance from any run. True if anything was
        learned."""
        learned = False
        costs = planner.costs
        # A figure timed once in a run is left out: a step size's first pass has llama.cpp build its graph (tens
        # of times a step, seen here), and one timing cannot tell.
        v1 = costs.verify[1] if costs.samples[1] >= 2 else None
        if v1:
            self._add("v1", v1)
            for n in range(2, len(costs.verify)):
                if costs.verify[n] is not None and costs.samples[n] >= 2:
                    self._add(f"verify.{n}", costs.verify[n] / v1)
            figures = {"draft": costs.draft if costs.draft_samples >= 2 else None,
                       "catchup_one": costs.catchup_one, "catchup_per_token": costs.catchup_per_token,
                       "prefill_per_token": costs.prefill_per_token}
            for key, value in figures.items():
                if value is not None:
                    self._add(key, value / v1)
            learned = True
        for source, acc in planner.acceptance.items():
            if acc.total_evidence > 0:
                mine = self.acceptance.setdefault(source, Acceptance(PRIOR[source], 0))
                mine.add_totals(acc)
                mine.cap(ACCEPTANCE_CAP)
                learned = True
        if learned:
            self.runs += 1
        return learned

    def _add(self, key: str, value: float) -> None:
        if math.isfinite(value) and value > 0:
            self.figures[key] = (self.figures.get(key, []) + [value])[-KEEP_RUNS:]

    # ---- storage shape ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "runs": self.runs,
            "figures": self.figures,
            "acceptance": {s: {"reached": a.reached, "accepted": a.accepted} for s, a in self.acceptance.items()},
        }

    @classmethod
    def from_dict(cls, data) -> "CostProfile":
        """ValueError for anything but a profile this version wrote (a corrupt or foreign file)."""
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a dspark cost profile of this version")
        runs, figures, acceptance = data.get("runs"), data.get("figures"), data.get("acceptance")
        if not isinstance(runs, int) or runs < 0 or not isinstance(figures, dict) or not isinstance(acceptance, dict):
            raise ValueError("a cost profile needs runs, figures and acceptance")
        out = cls(runs=runs)
        for key, values in figures.items():
            if key.startswith("verify."):
                n = key.split(".", 1)[1]
                if not n.isdigit() or not 2 <= int(n) <= WIDTH_MAX + 1:
                    raise ValueError(f"bad figure {key!r}")
            elif key not in ("v1", "draft", "catchup_one", "catchup_per_token", "prefill_per_token"):
                raise ValueError(f"unknown figure {key!r}")
            if (not isinstance(values, list) or not values
                    or not all(_positive(v) for v in values)):
                raise ValueError(f"figure {key!r} must be a list of positive numbers")
            out.figures[key] = [float(v) for v in values][-KEEP_RUNS:]
        for source, entry in acceptance.items():
            if source not in SOURCES or not isinstance(entry, dict):
                raise ValueError(f"unknown drafter {source!r}")
            reached, accepted = entry.get("reached"), entry.get("accepted")
            if (not isinstance(reached, list) or not isinstance(accepted, list) or len(reached) != len(accepted)
                    or len(reached) > WIDTH_MAX or not all(_non_negative(v) for v in reached + accepted)
                    or any(a > r + 1e-9 for a, r in zip(accepted, reached))):
                raise ValueError(f"bad acceptance for {source!r}")
            acc = Acceptance(PRIOR[source], 0)
            acc.reached, acc.accepted = [float(v) for v in reached], [float(v) for v in accepted]
            out.acceptance[source] = acc
        return out


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
