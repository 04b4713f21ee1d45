"""With temperature > 0, speculative sampling must follow the target's own distribution exactly. Checked
end to end on a tiny real model pair whose draft disagrees often: the joint distribution of the first two
generated tokens (covering acceptance, rejection with residual sampling, and the bonus token) against
probabilities computed from the target alone."""

import numpy as np
import pytest
from scipy import stats as sps
from synthetic import perturbed, vocab, weights, write_model

from dspark_cli.drafters import ModelDrafter
from dspark_cli.engine import generate
from dspark_cli.model import Model
from dspark_cli.sampling import SamplingParams, probabilities


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])


def first_tokens(target, prompt, drafter, params, n, overlap):
    out = [e.token for e in generate(target, prompt, drafter=drafter, params=params, max_tokens=n, draft_max=2,
                                     overlap=overlap)]
    return [t for t in out if t is not None][:n]


@OVERLAP
def test_joint_distribution_of_two_tokens_matches_target(tmp_path, tiny_models, overlap):
    target, _ = tiny_models
    n_vocab = len(vocab()[0])
    # A draft far from the target, so rejections are common.
    far = write_model(tmp_path / "far.gguf", perturbed(weights(1234, n_vocab), 7, 0.15))
    draft = Model(far, role="draft", n_ctx=512)
    try:
        prompt = target.tokenize("the red hat", add_special=True)
        base = SamplingParams(temperature=1.3, top_k=4)
        p1 = probabilities(np.array(target.sync(prompt, 1)[0]), base)
        expected = {}
        for a in np.flatnonzero(p1):
            p2 = probabilities(np.array(target.sync(prompt + [int(a)], 1)[0]), base)
            for b in np.flatnonzero(p2):
                expected[(int(a), int(b))] = p1[a] * p2[b]
        drafter = ModelDrafter(draft)
        draws = 2500
        counts = dict.fromkeys(expected, 0)
        drafted = accepted = 0
        for seed in range(draws):
            params = SamplingParams(temperature=1.3, top_k=4, seed=seed)
            last = None
            toks = []
            for e in generate(target, prompt, drafter=drafter, params=params, max_tokens=3, draft_max=2,
                              overlap=overlap):
                if e.token is not None:
                    toks.append(e.token)
                last = e
            counts[(toks[0], toks[1])] += 1
            drafted += last.stats.n_drafted
            accepted += last.stats.n_accepted
        keys = sorted(expected)
        obs = np.array([counts[k] for k in keys], dtype=float)
        exp = np.array([expected[k] for k in keys]) * draws
        assert sum(exp) > 0.999 * draws
        chi2, pval = sps.chisquare(obs, exp)
        assert pval > 1e-3, (chi2, pval, list(zip(keys, obs, exp)))
        assert 0.15 < accepted / drafted < 0.95  # both acceptance and rejection paths were taken
    finally:
        draft.close()


@OVERLAP
def test_seed_makes_a_sampled_run_reproducible(tiny_models, overlap):
    """Also when overlapped, where how many tokens get drafted ahead depends on timing: every random draw
    is keyed by the position it decides (PositionRng), not taken from a running generator."""
    target, draft = tiny_models
    prompt = target.tokenize("a dog sat", add_special=True)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    a = first_tokens(target, prompt, ModelDrafter(draft), params, 30, overlap)
    for _ in range(3):
        assert first_tokens(target, prompt, ModelDrafter(draft), params, 30, overlap) == a
    c = first_tokens(target, prompt, ModelDrafter(draft), SamplingParams(temperature=1.0, top_p=0.9, seed=43), 30,
                     overlap)
    assert len(a) == 30
    assert a != c
