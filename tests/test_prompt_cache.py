"""A target's cached prefix is reused only as a fresh run would have computed it (Model.prompt_plan): whatever the
cache held before (another prompt sharing a system prefix, a previous answer), the next prompt's logits are
bit-identical to a fresh run's. llama.cpp's fast prompt kernels and dspark's exact verify kernels round
differently (the demo target's keys move by ~0.005, the real target's by ~0.4), so reusing a prefix computed
by the other kind, or processing a short tail with the other kind, would change the answer at near-ties."""

from __future__ import annotations

import numpy as np
import pytest

from dspark_cli.llama.kernels import EXACT_BATCH_MAX
from dspark_cli.llama.model import Model

TEXT = ("Write a Python function that checks whether a string is a palindrome, and explain each line of it in "
        "detail, with examples of inputs and outputs. Then do the same for anagrams. ") * 3


@pytest.fixture
def target(demo_models):
    """The session's demo target: each test's reference is computed from scratch (from_scratch) on it before or
    after the cache under test is built, never in between (one model, not a second copy of the same file)."""
    return demo_models[0]


def next_logits(model: Model, prompt: list[int]) -> np.ndarray:
    """The logits after `prompt`, as the engine gets them: the prompt but its last token, then that one."""
    model.sync(prompt[:-1], n_logits=0)
    return model.sync(prompt, n_logits=1)[0].copy()


def from_scratch(model: Model, prompt: list[int]) -> np.ndarray:
    model.truncate(0)
    return next_logits(model, prompt)


@pytest.mark.parametrize("tail", [3, EXACT_BATCH_MAX - 1, EXACT_BATCH_MAX, EXACT_BATCH_MAX + 1, 40])
def test_a_prompt_sharing_a_prefix_with_the_cache_gets_a_fresh_runs_logits(target, tail):
    base = target.tokenize(TEXT, add_special=True)
    other = base[: len(base) - tail] + target.tokenize(" And now something different entirely.", add_special=False)
    fresh = from_scratch(target, other)
    from_scratch(target, base)  # the cache holds `base`: `other` shares all but its tail
    got = next_logits(target, other)
    assert np.array_equal(got, fresh)


def test_a_resent_conversation_gets_a_fresh_runs_logits(target):
    """The cache holds a prompt and an answer decoded one token at a time (verify-sized batches); the prompt
    that extends them is answered as a fresh run of it would be: the answer's tokens are processed again."""
    prompt = target.tokenize(TEXT, add_special=True)
    target.truncate(0)
    seq = list(prompt)
    target.sync(seq[:-1], n_logits=0)
    for _ in range(24):  # an answer, one token at a time, as the engine's plain steps make it
        seq.append(int(np.argmax(target.sync(seq, n_logits=1)[0])))
    resent = seq + target.tokenize(" Thanks! One more question:", add_special=False)
    got = next_logits(target, resent)
    assert np.array_equal(got, from_scratch(target, resent))


def test_settle_makes_the_answer_reusable_and_stays_exact(target):
    """settle() re-processes an answer's tokens as a prompt batch: the resend then processes only its new
    tokens, and still gets a fresh run's logits."""
    prompt = target.tokenize(TEXT, add_special=True)
    target.truncate(0)
    seq = list(prompt)
    target.sync(seq[:-1], n_logits=0)
    for _ in range(24):
        seq.append(int(np.argmax(target.sync(seq, n_logits=1)[0])))
    target.truncate(len(seq) - 1)
    assert target.settle() > 0
    assert target.settle() == 0  # nothing left to do
    resent = seq + target.tokenize(" Thanks! One more question about the last one, please:", add_special=False)
    keep, batches = target.prompt_plan(resent[:-1])
    new = len(resent) - len(seq)
    # Only the new tokens, or the last EXACT_BATCH_MAX + 1 when they are fewer (a fresh run's fast batch).
    assert keep == len(seq) - 1 - max(0, EXACT_BATCH_MAX + 1 - new)
    assert sum(batches) == len(resent) - 1 - keep
    got = next_logits(target, resent)
    assert np.array_equal(got, from_scratch(target, resent))


def test_short_prompts_and_tails_are_cut_as_a_fresh_run_cuts_them(target):
    """prompt_plan on an empty cache is a fresh run's cut: n_batch chunks, the last as it falls."""
    target.truncate(0)
    n_batch = target.n_batch
    for n in (5, EXACT_BATCH_MAX, EXACT_BATCH_MAX + 1, n_batch, n_batch + 3, n_batch + 40):
        keep, batches = target.prompt_plan(list(range(10, 10 + n)))
        assert keep == 0 and sum(batches) == n
        assert [b > EXACT_BATCH_MAX for b in batches] == [True] * (n // n_batch) + (
            [n % n_batch > EXACT_BATCH_MAX] if n % n_batch else [])
