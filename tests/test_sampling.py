"""The sampling math on its own: distributions after temperature/top-k/top-p, and the speculative
acceptance rule checked against the exact target distribution."""

import numpy as np
import pytest
from scipy import stats as sps

from dspark_cli.errors import UsageError
from dspark_cli.sampling import SamplingParams, probabilities, sample_from, verify_greedy, verify_sampled


def test_probabilities_temperature_top_k_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = probabilities(logits, SamplingParams(temperature=1.0))
    assert np.allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert np.allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8 <= 0.85
    assert np.allclose(p, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    cold = probabilities(logits, SamplingParams(temperature=0.5))
    assert cold[0] > 0.5 and np.isclose(cold.sum(), 1.0)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -3}]
)
def test_impossible_params_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


def test_verify_greedy_longest_prefix():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 9]) == 2
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == 3
    assert verify_greedy([1], []) == 0


def _random_dist(rng, n, sharp=1.0):
    x = rng.standard_normal(n) * sharp
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_speculative_sampling_first_token_follows_target(deterministic_draft):
    """Whatever the draft proposes, the first token out is distributed as p (chi-square, 20k draws)."""
    rng = np.random.default_rng(0)
    n = 12
    p = _random_dist(rng, n, 1.5)
    q = _random_dist(rng, n, 1.5)  # a draft that disagrees a lot
    draws = 20000
    counts = np.zeros(n)
    accepted = 0
    for _ in range(draws):
        if deterministic_draft:
            x, q_rows = 3, None
        else:
            x, q_rows = sample_from(q, rng), q[None, :]
        n_acc, nxt = verify_sampled(np.stack([p, p]), [x], q_rows, rng)
        first = x if n_acc == 1 else nxt
        accepted += n_acc
        counts[first] += 1
    chi2, pval = sps.chisquare(counts, p * draws)
    assert pval > 1e-3, (chi2, pval)
    expected_accept = p[3] if deterministic_draft else np.minimum(p, q).sum()
    assert abs(accepted / draws - expected_accept) < 0.02


def test_bonus_token_comes_from_the_last_row():
    rng = np.random.default_rng(1)
    p0 = np.array([0.0, 1.0, 0.0])  # the draft's token 1 is always accepted
    bonus = np.array([0.25, 0.25, 0.5])
    counts = np.zeros(3)
    for _ in range(8000):
        n_acc, nxt = verify_sampled(np.stack([p0, bonus]), [1], np.array([[0.0, 1.0, 0.0]]), rng)
        assert n_acc == 1
        counts[nxt] += 1
    assert sps.chisquare(counts, bonus * 8000).pvalue > 1e-3


def test_rejection_never_returns_the_rejected_token_when_p_is_below_q():
    rng = np.random.default_rng(2)
    p = np.array([0.1, 0.9])
    q = np.array([0.9, 0.1])
    for _ in range(2000):
        n_acc, nxt = verify_sampled(np.stack([p, p]), [0], q[None, :], rng)
        if n_acc == 0:
            assert nxt == 1  # the residual max(0, p - q) has no mass on token 0
