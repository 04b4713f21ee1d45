"""The sampling math on its own: the shaped distribution (llama.cpp's filter order), the keyed Gumbel draw
that every engine and drafter picks tokens with, and the agreement rule."""

import numpy as np
import pytest
from scipy import stats as sps

from dspark_cli.errors import UsageError
from dspark_cli.engine.sampling import Noise, SamplingParams, pick, probabilities, verify


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


def test_filters_run_on_the_raw_distribution_in_llama_cpp_order():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    # min-p keeps tokens >= 0.25 x 0.5 = 0.125 of the raw distribution, whatever the temperature.
    for t in (0.3, 1.0, 3.0):
        p = probabilities(logits, SamplingParams(temperature=t, min_p=0.25))
        assert np.flatnonzero(p).tolist() == [0, 1, 2]
    # top-p is measured before the temperature: at T=3 the same three tokens survive as at T=1.
    p = probabilities(logits, SamplingParams(temperature=3.0, top_p=0.8))
    assert np.flatnonzero(p).tolist() == [0, 1, 2]
    hot = np.exp(np.log([0.5, 0.2, 0.15]) / 3.0)
    assert np.allclose(p[:3], hot / hot.sum())
    # top-k, then top-p on what top-k kept (renormalized): 0.5/0.7 alone reaches 0.7.
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.7))
    assert np.flatnonzero(p).tolist() == [0]


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    rng = np.random.default_rng(3)
    for scale in (0.5, 3.0, 8.0):
        x = (rng.standard_normal(50_000) * scale).astype(np.float32)
        p = probabilities(x, SamplingParams(temperature=1.0, top_p=0.9, min_p=0.0))  # top-p alone
        z = np.exp(x.astype(np.float64) - x.max())
        z /= z.sum()
        order = np.lexsort((np.arange(len(z)), -z))
        cut = int(np.searchsorted(np.cumsum(z[order]), 0.9) + 1)
        assert set(np.flatnonzero(p).tolist()) == set(order[:cut].tolist())


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
               {"min_p": 1.0}, {"min_p": -0.1}, {"seed": -3}]
)
def test_impossible_params_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


def test_verify_longest_agreeing_prefix():
    assert verify([5, 6, 7, 8], [5, 6, 9]) == 2
    assert verify([5, 6, 7, 8], [5, 6, 7]) == 3
    assert verify([1], []) == 0


def _random_logits(rng, n, sharp=1.5):
    return rng.standard_normal(n) * sharp


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6),
                                    SamplingParams(temperature=1.3, top_p=0.9, min_p=0.02)], ids=["T1", "topk", "topp-minp"])
def test_pick_draws_exactly_from_the_distribution(params):
    """Every position's Gumbel-max draw is distributed as p (chi-square over 20k positions), including the
    rare tokens that share the aggregated "rest" draw."""
    rng = np.random.default_rng(0)
    logits = _random_logits(rng, 40, 2.5)
    logits[-10:] -= 16  # ten tokens far below the top: they can only come out of the "rest"
    p = probabilities(logits, params)
    noise = Noise(11)
    draws = 20000
    counts = np.bincount([pick(logits, params, noise, pos) for pos in range(draws)], minlength=len(p))
    keep = p > 0
    assert counts[~keep].sum() == 0
    exp = p[keep] * draws
    pooled = exp < 5  # chi-square needs expected counts >= 5: pool the rare tokens into one cell
    obs = np.append(counts[keep][~pooled], counts[keep][pooled].sum())
    exp = np.append(exp[~pooled], exp[pooled].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert sps.chisquare(obs, exp).pvalue > 1e-3


def test_the_same_noise_couples_close_distributions():
    """Draft and target pick with the same noise: for close p and q they mostly agree, as often as the Gumbel
    coupling promises (sum_i 1 / sum_j max(p_j/p_i, q_j/q_i)), and the target's pick follows p alone."""
    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=1.0, min_p=0.0)  # the whole distributions, as the formula has them
    lp = _random_logits(rng, 30)
    lq = lp + rng.standard_normal(30) * 0.2
    p, q = probabilities(lp, params), probabilities(lq, params)
    promised = sum(1.0 / np.maximum(p / p[i], q / q[i]).sum() for i in range(len(p)))
    noise = Noise(7)
    n = 20000
    agree = sum(pick(lp, params, noise, pos) == pick(lq, params, noise, pos) for pos in range(n))
    assert abs(agree / n - promised) < 0.015
    assert np.minimum(p, q).sum() - promised < 0.05  # close to the best any coupling can do


def test_a_draft_vocabulary_larger_than_the_target_s():
    """Padded vocabularies (Qwen2.5 7B+: 152,064 tokens, 0.5B: 151,936): a drafted id the target does not
    have is never its pick, and the target's pick only depends on its own logits."""
    rng = np.random.default_rng(9)
    lp = _random_logits(rng, 20)
    lq = np.concatenate([lp, [10.0] * 4])  # the draft puts most mass on ids 20..23
    params = SamplingParams(temperature=1.0)
    noise = Noise(3)
    for pos in range(200):
        t = pick(lp, params, noise, pos)
        d = pick(lq, params, noise, pos)
        assert t < 20
        assert verify([t], [d]) == (1 if d == t else 0)


def test_noise_is_the_same_on_every_call_and_differs_by_seed_and_position():
    a, b = Noise(1), Noise(1)
    ids = np.arange(1000)
    assert np.array_equal(a.gumbel(5, ids), b.gumbel(5, ids))
    assert not np.array_equal(a.gumbel(5, ids), a.gumbel(6, ids))
    assert not np.array_equal(a.gumbel(5, ids), Noise(2).gumbel(5, ids))
    u = a._uniform(0, np.arange(100_000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
