"""Greedy speculative decoding must reproduce the target alone token for token, on the real demo pair and
on a tiny synthetic pair whose draft is often wrong (so rejections and cache trims really happen)."""

import os

import numpy as np
import pytest

from dspark_cli.llama.quantize import requantize
from dspark_cli.engine.drafters import ModelDrafter
from dspark_cli.engine.loop import generate
from dspark_cli.llama.model import Model
from dspark_cli.prompt import build_prompt
from cores import CORES, every_core

DEMO_PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "List three facts about the Moon.",
    "Explain what a hash table is to a ten year old.",
]


def run(target, prompt, drafter=None, fixed=True, **kw):
    """The engine's mechanics at each draft length, so fixed lengths by default (the cost model would pick
    its own; its choices are tested in test_costs.py)."""
    tokens, from_draft, last = [], [], None
    for ev in generate(target, prompt, drafter=drafter, fixed=fixed, **kw):
        if ev.token is not None:
            tokens.append(ev.token)
            from_draft.append(ev.from_draft)
        last = ev
    return tokens, from_draft, last


@pytest.mark.parametrize("text", DEMO_PROMPTS)
def test_demo_pair_greedy_is_identical_to_target_alone(demo_models, text):
    target, draft = demo_models
    prompt, _ = build_prompt(target, text)
    # 64 tokens (96 before): the two answers that run to the length limit still have rejected drafts at every
    # draft_max (3-4 rounds each), and the Moon's ends at its end token (43) either way.
    base, _, base_last = run(target, prompt, max_tokens=64)
    for draft_max in (1, 4, 8):
        spec, from_draft, last = run(target, prompt, ModelDrafter(draft), max_tokens=64, draft_max=draft_max)
        assert spec == base, f"draft_max={draft_max}"
        assert last.finish_reason == base_last.finish_reason
        s = last.stats
        assert s.n_drafted > 0 and 0 < s.n_accepted <= s.n_drafted
        assert sum(from_draft) == s.n_accepted or last.finish_reason != "length"
        assert s.tokens_per_step > 1.0  # speculation did save target steps
        assert len(s.acceptance_by_position) <= draft_max


def test_a_long_draft_max_is_capped_at_the_exact_batch_size(demo_models):
    """Verify batches above EXACT_BATCH_MAX tokens would take llama.cpp's prompt kernels, which sum in another
    order: --draft-max 40 drafts at most 15 tokens a step, and the answer stays the target alone's."""
    from dspark_cli.llama.kernels import EXACT_BATCH_MAX

    target, draft = demo_models
    prompt, _ = build_prompt(target, "Count from one to forty in words, separated by commas.")
    base, _, _ = run(target, prompt, max_tokens=120)
    spec, _, last = run(target, prompt, ModelDrafter(draft), max_tokens=120, draft_max=40)
    assert spec == base
    # drafts ran past the default 8 (the draft model ends one early at its own end of answer), never past the cap
    assert 8 < max(d for d, _ in last.stats.rounds) <= EXACT_BATCH_MAX - 1


def test_tiny_pair_greedy_identity_with_many_rejections(tiny_models):
    target, draft = tiny_models
    total_drafted = total_accepted = 0
    for text in ["the cat sat on the mat", "a big red dog ran", "it was a sun day and"]:
        prompt = target.tokenize(text, add_special=True)
        base, _, _ = run(target, prompt, max_tokens=80)
        for draft_max in (2, 5):
            spec, _, last = run(target, prompt, ModelDrafter(draft), max_tokens=80, draft_max=draft_max)
            assert spec == base
            total_drafted += last.stats.n_drafted
            total_accepted += last.stats.n_accepted
    rate = total_accepted / total_drafted
    assert 0.1 < rate < 0.98, rate  # rejections happened, and so did acceptances


def test_kv_caches_consistent_after_rejections(tiny_models):
    """After a run with rejections, both caches hold exactly accepted tokens: the next logits from the
    cache equal those of a fresh evaluation of the same sequence."""
    target, draft = tiny_models
    prompt = target.tokenize("the dog ran to the big", add_special=True)
    out, _, last = run(target, prompt, ModelDrafter(draft), max_tokens=40, draft_max=6)
    assert last.stats.n_accepted < last.stats.n_drafted  # there were rejections
    seq = prompt + out
    for m in (target, draft):
        assert m.cached == seq[: len(m.cached)]
        assert m.kv_pos_max() == len(m.cached) - 1
    cached_logits = np.array(target.sync(seq, n_logits=1)[0])
    target.truncate(0)
    fresh_logits = np.array(target.sync(seq, n_logits=1)[0])
    assert np.allclose(cached_logits, fresh_logits, atol=1e-4)


def test_abandoned_generator_leaves_caches_trimmed(tiny_models):
    target, draft = tiny_models
    prompt = target.tokenize("a cat and a dog", add_special=True)
    gen = generate(target, prompt, drafter=ModelDrafter(draft), max_tokens=50, draft_max=8, fixed=True)
    got = [next(gen).token for _ in range(3)]
    gen.close()  # what Ctrl-C or a closed pipe does to the loop
    assert len(target.cached) <= len(prompt) + 3
    assert len(draft.cached) <= len(prompt) + 3
    assert target.cached == (prompt + got)[: len(target.cached)]
    assert target.kv_pos_max() == len(target.cached) - 1
    assert draft.cached == (prompt + got)[: len(draft.cached)]
    assert draft.kv_pos_max() == len(draft.cached) - 1


def test_stop_token_inside_an_accepted_draft(demo_models):
    """The demo pair answers briefly and ends with <|im_end|>; the draft proposes that end token inside a
    draft, the target accepts it, and generation stops there with the end token not printed."""
    target, draft = demo_models

    class Recording(ModelDrafter):
        proposals: list = []

        def extend(self, seq, ahead, params, rng):  # both engines draft one token at a time
            ok = super().extend(seq, ahead, params, rng)
            self.proposals.append(list(ahead.tokens))
            return ok

    prompt, _ = build_prompt(target, "Reply with only the word yes.")
    base, _, base_last = run(target, prompt, max_tokens=64)
    drafter = Recording(draft)
    spec, _, last = run(target, prompt, drafter, max_tokens=64, draft_max=8)
    assert base_last.finish_reason == "stop" and last.finish_reason == "stop"
    assert spec == base
    assert any(any(target.is_eog(t) for t in p) for p in drafter.proposals), drafter.proposals
    assert "<|im_end|>" not in target.detokenize(spec)
    assert not any(target.is_eog(t) for t in spec)


def test_finish_reasons_length_and_context(tiny_models):
    target, draft = tiny_models
    prompt = target.tokenize("the cat", add_special=True)
    out, _, last = run(target, prompt, ModelDrafter(draft), max_tokens=7, draft_max=4)
    assert len(out) == 7 and last.finish_reason == "length"
    # A context of 512 with a prompt near it: generation stops when the context is full.
    long_prompt = prompt * (500 // len(prompt))
    out, _, last = run(target, long_prompt, ModelDrafter(draft), max_tokens=1000, draft_max=4)
    assert last.finish_reason == "context"
    assert len(long_prompt) + len(out) == target.n_ctx


@pytest.fixture(scope="module")
def kquant_target(demo_paths, tmp_path_factory):
    """The demo target requantized to Q4_K_M (with Q6_K tensors), the kind of file most real targets are."""
    import llama_cpp

    out = tmp_path_factory.mktemp("kquant") / "demo-target.Q4_K_M.gguf"
    requantize(demo_paths[0], out, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    # only the batch-invariance checks use it: every core, as they run (see every_core)
    model = Model(out, role="target", n_ctx=1024, n_threads=CORES)
    yield model
    model.close()


@pytest.mark.skipif(os.environ.get("DSPARK_FAST_KERNELS") == "1", reason="built with the fast, non-batch-invariant kernels")
@pytest.mark.parametrize("fmt", ["F32", "Q4_K_M"])
@pytest.mark.all_cores
def test_build_is_batch_invariant(demo_models, kquant_target, fmt):
    """A token's logits do not depend on the batch it is decoded in: scripts/install.sh builds out llamafile's
    sgemm and the repacked gemm, and dspark keeps llama.cpp's tiled K-quant kernel off (it takes batches of
    8 or more, so 9 and 12 are checked). This is what keeps greedy output identical to the target alone
    even where its top two tokens nearly tie."""
    target = demo_models[0] if fmt == "F32" else kquant_target
    prompt, _ = build_prompt(target, "A shop sells pencils at 3 for $1. How much do 12 pencils cost?")
    seq = prompt + target.tokenize(" Twelve pencils cost four dollars, because they", add_special=False)
    with every_core(target):
        for n in (4, 9, 12):
            target.truncate(0)
            alone = np.array(target.sync(seq[: -(n - 1)], n_logits=1)[0])
            target.truncate(0)
            target.sync(seq[:-n], n_logits=0)
            in_batch = np.array(target.eval(seq[-n:], n_logits=n)[0])
            assert np.array_equal(alone, in_batch), \
                f"{fmt}, batch of {n}: max difference {abs(alone - in_batch).max()}"


@pytest.mark.skipif(os.environ.get("DSPARK_FAST_KERNELS") == "1", reason="built with the fast, non-batch-invariant kernels")
@pytest.mark.parametrize("fmt", ["F32", "Q4_K_M"])
@pytest.mark.all_cores
def test_every_row_of_a_verify_batch_is_invariant_past_256_positions(demo_models, kquant_target, fmt):
    """Each row of a batch, at positions on both sides of 256 and 512, against one-token decoding of the same
    cache: llama.cpp's CPU flash attention splits long one-token steps across threads (dspark turns it off on
    the CPU), which once moved logits by ~0.5 past position 256, and greedy outputs with them."""
    target = demo_models[0] if fmt == "F32" else kquant_target
    line = "The quick brown fox jumps over the lazy dog and keeps running through the forest. "
    seq = target.tokenize(line * 60, add_special=True)[:560]
    starts, widest = (520, 508, 300, 254, 240), 9
    with every_core(target):
        target.truncate(0)
        alone = {}
        # Up the sequence, each checked window's positions decoded one token at a time; the stretches between
        # windows go in as batches (340 one-token steps before, 45 now). Both sides of every comparison below
        # see the same cache below their window, so how that stretch was computed does not enter them.
        for start in sorted(starts):
            target.eval(seq[len(target.cached) : start], n_logits=0)
            for p in range(start, start + widest):
                alone[p] = np.array(target.eval([seq[p]], n_logits=1)[0])
        for start in starts:  # from the end down: truncating keeps one-token decoding's cache
            for n in (2, widest):
                target.truncate(start)
                rows = np.array(target.eval(seq[start : start + n], n_logits=n))
                for j in range(n):
                    assert np.array_equal(rows[j], alone[start + j]), f"{fmt}: position {start + j} in a batch of {n}"
                target.truncate(start)
        target.truncate(0)


def test_accepted_counts_only_tokens_the_answer_kept(demo_models):
    """A stop string or an end token inside an accepted draft ends the answer there: what was accepted past
    it is not counted as accepted (every accepted token is one the consumer saw, marked from_draft)."""
    target, draft = demo_models
    prompt, _ = build_prompt(target, "Count from one to twenty in words, separated by commas.")
    for stop in (("seven",), ()):
        out, from_draft, last = run(target, prompt, ModelDrafter(draft), max_tokens=80, draft_max=8, stop=stop)
        assert last.finish_reason == "stop"
        assert sum(from_draft) == last.stats.n_accepted


def test_a_draft_with_a_smaller_context_stops_drafting_not_the_answer(tiny_paths):
    target = Model(tiny_paths[0], role="target", n_ctx=512)
    draft = Model(tiny_paths[1], role="draft", n_ctx=256)
    try:
        prompt = target.tokenize("the cat sat on the mat " * 30, add_special=True)[:200]
        base, _, _ = run(target, prompt, max_tokens=200)
        out, _, last = run(target, prompt, ModelDrafter(draft), max_tokens=200, draft_max=4)
        assert out == base and len(out) == 200
        assert last.stats.n_drafted > 0  # it drafted while the draft's context had room
        assert len(draft.cached) < draft.n_ctx
    finally:
        draft.close()
        target.close()
