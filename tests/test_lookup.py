"""The prompt-lookup drafter: n-gram matching over the prompt and the text so far."""

from dspark_cli.engine.drafters import PromptLookupDrafter, lookup
from dspark_cli.engine.loop import generate
from dspark_cli.prompt import build_prompt


def test_lookup_finds_the_latest_longest_match():
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup(seq, 3, ngram_max=3, ngram_min=2) == [7, 8, 5]  # latest earlier match of [1, 2, 3]
    assert lookup([4, 5, 6, 4, 5], 4, ngram_max=3, ngram_min=2) == [6, 4, 5]
    assert lookup([1, 2, 3, 4], 4) == []  # the tail occurs nowhere else
    assert lookup([7, 7], 2, ngram_min=1) == [7]


def test_lookup_agrees_with_its_definition_on_random_texts():
    """The byte search (4 bytes a token, matches only on token boundaries) against the definition written plainly:
    for n from 4 down to 2, the latest start s (seq[s:s + n] == seq[-n:], s + n < len(seq)) gives what follows."""
    import random

    def plainly(seq, n_max, ngram_max=4, ngram_min=2):
        for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
            for s in range(len(seq) - 1 - n, -1, -1):
                if seq[s : s + n] == seq[-n:]:
                    return seq[s + n : s + n + n_max]
        return []

    rng = random.Random(3)
    for trial in range(3000):
        # Few distinct ids make many matches; ids sharing bytes (256, 65536 + 1, ...) make off-boundary byte matches.
        alphabet = rng.choice([[1, 2, 3], [0, 1, 256, 257, 65537, 16777216], list(range(50)), [7, 7 * 256, 7 * 65536]])
        seq = [rng.choice(alphabet) for _ in range(rng.randint(0, 60))]
        n_max = rng.randint(0, 10)
        assert lookup(seq, n_max) == (plainly(seq, n_max) if n_max > 0 and len(seq) >= 3 else []), (seq, n_max)


def test_lookup_speeds_up_copying_and_stays_exact(demo_models):
    target, _ = demo_models
    # Raw text that continues by repeating itself: the answer copies from the prompt.
    line = "Monday: water the plants, feed the cat, call the bank, buy bread and milk.\n"
    prompt, _ = build_prompt(target, line * 3 + "Monday:", raw=True)
    base = [e.token for e in generate(target, prompt, max_tokens=48) if e.token is not None]

    def run(fixed):
        last, out = None, []
        for e in generate(target, prompt, drafter=PromptLookupDrafter(), max_tokens=48, draft_max=8, fixed=fixed):
            if e.token is not None:
                out.append(e.token)
            last = e
        return out, last.stats

    # Drafting 8 every round, the copied text is proposed and accepted: tokens per step is then a fact of the
    # drafts, not of timings (the cost model's own choice of length depends on how loaded the machine is).
    out, s = run(fixed=True)
    assert out == base
    assert s.method == "lookup" and s.acceptance_rate > 0.5 and s.tokens_per_step > 2.0, s.as_dict()
    # With the cost model choosing, the answer is the same and lookup still drafts.
    out, s = run(fixed=False)
    assert out == base
    assert s.method == "lookup" and s.n_drafted > 0 and s.n_accepted > 0, s.as_dict()
