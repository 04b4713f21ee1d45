"""Turning logits into tokens, and the speculative acceptance rule.

Greedy (temperature 0) picks the argmax. Otherwise temperature, top-k and top-p shape a distribution; the same
shaping is applied to the target's p and the draft's q, which is what keeps speculative sampling exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature):
            raise UsageError(f"--temp must be a finite number (0 or more), got {self.temperature}")
        if self.temperature < 0:
            raise UsageError(f"--temp must be 0 or more, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise UsageError(f"--seed must be 0 or more, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution the sampler draws from: softmax(logits / T) restricted by top-k then top-p,
    renormalized. Returns float64 of the full vocabulary size (zeros outside the kept set)."""
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    n = x.shape[0]
    keep: np.ndarray | None = None
    if 0 < params.top_k < n:
        keep = np.argpartition(-x, params.top_k - 1)[: params.top_k]
    if params.top_p < 1.0:
        cand = keep if keep is not None else np.arange(n)
        z = x[cand]
        order = np.argsort(-z, kind="stable")
        z = z[order]
        pz = np.exp(z - z[0])
        pz /= pz.sum()
        # Smallest prefix whose mass reaches top_p (always at least one token).
        cut = int(np.searchsorted(np.cumsum(pz), params.top_p) + 1)
        keep = cand[order[: min(cut, len(order))]]
    if keep is None:
        p = np.exp(x - x.max())
    else:
        p = np.zeros(n, dtype=np.float64)
        xk = x[keep]
        p[keep] = np.exp(xk - xk.max())
    p /= p.sum()
    return p


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from an (unnormalized, non-negative) weight vector."""
    c = np.cumsum(p)
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return min(i, len(p) - 1)


class PositionRng:
    """Random numbers keyed by (seed, stream, position) instead of drawn from one running generator.

    The overlapped engine drafts ahead while the target verifies, so how many draft tokens get sampled (and
    thrown away) depends on timing. Keying every draw by the position it decides keeps a seeded run
    reproducible anyway. It stays exact: a position's draws decide only that position, and once decided
    the position never changes, so no draw is seen twice by the acceptance rule."""

    DRAFT, TARGET = 1, 2

    def __init__(self, seed: int | None):
        self.seed = int(np.random.SeedSequence().entropy % (1 << 63)) if seed is None else seed

    def draft(self, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.DRAFT, pos])

    def target(self, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.TARGET, pos])


def verify_greedy(target_argmax: list[int], drafted: list[int]) -> int:
    """Number of drafted tokens the target agrees with, in order. target_argmax[i] is the target's choice
    at the position of drafted[i]."""
    n = 0
    for want, got in zip(target_argmax, drafted):
        if want != got:
            break
        n += 1
    return n


def verify_sampled(
    p_rows: np.ndarray,
    drafted: list[int],
    q_rows: np.ndarray | list[np.ndarray] | None,
    rng: np.random.Generator | list[np.random.Generator],
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    p_rows: (len(drafted) + 1, V) target distributions; row i is at the position of drafted[i], the last
    row follows the whole draft. q_rows: the draft's distributions for drafted[i], or None for a
    deterministic drafter (q is one-hot on the drafted token, as for prompt lookup).
    Returns (n_accepted, next_token): the next token is the residual sample after a rejection, or the
    bonus token from the last row when every drafted token was accepted. The result is distributed exactly
    as sampling from p one token at a time. `rng` is one generator, or one per row (see PositionRng).
    """
    rngs = rng if isinstance(rng, list) else [rng] * (len(drafted) + 1)
    for i, x in enumerate(drafted):
        rng = rngs[i]
        p = p_rows[i]
        qx = 1.0 if q_rows is None else float(q_rows[i][x])
        px = float(p[x])
        if qx > 0.0 and rng.random() * qx < px:  # accept with probability min(1, p(x)/q(x))
            continue
        if q_rows is None:
            residual = p.copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p - q_rows[i], 0.0)
        if residual.sum() <= 0.0:  # p == q up to rounding: rejection had probability ~0; fall back to p
            residual = p
        return i, sample_from(residual, rng)
    return len(drafted), sample_from(p_rows[len(drafted)], rngs[len(drafted)])
