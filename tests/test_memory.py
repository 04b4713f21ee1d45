"""The drafting memory (engine/memory.py): earlier answers drafted from, bounded, exact."""

from __future__ import annotations

import pytest

import dspark_cli as dspark
from dspark_cli.bench.suite import REPETITIVE
from dspark_cli.engine.drafters import PromptLookupDrafter, make_drafter
from dspark_cli.engine.loop import generate
from dspark_cli.engine.memory import KEY, PROMPT_TAIL, DraftMemory
from dspark_cli.engine.sampling import SamplingParams
from dspark_cli.prompt import build_prompt

ANSWER = [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]
HEADER = [7, 8, 9]  # the chat template's assistant header, the same before every answer


def test_recalls_what_followed_the_longest_earlier_match():
    m = DraftMemory(1 << 20)
    m.add([1, 2, 3] + HEADER + ANSWER, n_prompt=6)
    # A new request, another prompt, the same header: the earlier answer is the draft.
    assert m.recall([4, 5, 6] + HEADER, 4) == ANSWER[:4]
    assert m.recall([4, 5, 6] + HEADER + ANSWER[:5], 8) == ANSWER[5:]  # it stops where the text ended
    assert m.recall([4, 5, 6, 7, 8], 4) == []  # fewer than KEY tokens in common: no match
    assert m.recall([99, 98, 97], 4) == []
    assert m.recall(HEADER, 0) == []


def test_the_longest_match_wins_and_split_evidence_stops_the_draft():
    m = DraftMemory(1 << 20)
    m.add([1, 1] + HEADER + [60, 61, 62, 63], n_prompt=5)
    m.add([2, 2] + HEADER + [70, 71, 72, 73], n_prompt=5)
    # Both match the header alone (3 tokens) and disagree at once: no draft rather than a guess.
    assert m.recall([5, 5] + HEADER, 4) == []
    # One matches further back: it alone is the evidence.
    assert m.recall([2, 2] + HEADER, 4) == [70, 71, 72, 73]
    m.add([3, 3] + HEADER + [70, 71, 80], n_prompt=5)
    # Two of three agree on 70, 71; past that the two split: the draft stops there.
    assert m.recall([5, 5] + HEADER, 4) == [70, 71]


def test_resumes_an_earlier_text_after_a_stretch_that_differs():
    m = DraftMemory(1 << 20)
    # A record: a field's name, its value (new each time), the next field's name, another value, the end.
    m.add([1, 1] + HEADER + [19, 20, 21, 22, 23, 100, 101, 30, 31, 32, 33, 34, 110, 40, 41, 42], n_prompt=5)
    now = [2, 2] + HEADER + [19, 20, 21, 22, 23, 200, 201, 30]
    # Its last tokens (a value, then the next field's first token) occur nowhere: no unbroken match.
    assert m.recall(now, 4) == []
    # Across the value, the record agrees on `30` and on five tokens before it: the next field's name follows.
    assert m.resume(now, 3) == [31, 32, 33]
    assert m.resume(now + [31, 32, 33, 34, 210], 3) == []  # `210` is the next value: no earlier text holds it
    assert m.resume(now + [31, 32, 33, 34, 210, 40], 2) == [41, 42]  # past it, 1 + 5 agree: the record's end
    # Too little agreement around the stretch (1 + 3 tokens, under two keys): no proposal.
    assert m.resume([5, 5, 21, 22, 23, 200, 201, 30], 3) == []
    # The chat header before every answer is no evidence: opening words line up with any other answer's.
    header = [7, 8, 9, 10, 11, 12]
    m.add([1, 1] + header + [60, 61, 62, 63], n_prompt=8)
    assert m.resume([2, 2] + header + [70, 61], 2) == []
    assert m.resume(now, 0) == [] and m.resume([], 3) == []


def test_resume_leaves_a_true_split_alone():
    m = DraftMemory(1 << 20)
    m.add([1, 1] + HEADER + [20, 21, 22, 23, 24, 25, 60, 61], n_prompt=5)
    m.add([1, 1] + HEADER + [20, 21, 22, 23, 24, 25, 70, 71], n_prompt=5)
    # Both texts agree with this one for eleven tokens and part right here: no guess, from either method.
    now = [1, 1] + HEADER + [20, 21, 22, 23, 24, 25]
    assert m.recall(now, 2) == [] and m.resume(now, 2) == []
    # One of them, across a differing token (25 -> 26), agrees at once: resume follows it.
    assert m.resume([1, 1] + HEADER + [20, 21, 22, 23, 24, 26, 70], 1) == [71]


def test_keeps_the_answer_and_the_prompts_end_only():
    m = DraftMemory(1 << 20)
    prompt = list(range(1000, 1000 + 3 * PROMPT_TAIL))
    m.add(prompt + ANSWER, n_prompt=len(prompt))
    assert m.n_tokens == PROMPT_TAIL + len(ANSWER)
    assert m.recall(prompt[:KEY + 1], 4) == []  # the prompt's start is prompt lookup's, not kept again
    m.add(prompt, n_prompt=len(prompt))  # no answer (an error before the first token): nothing to keep
    assert len(m) == 1


def test_evicts_the_oldest_at_the_bound():
    bound = 64 << 10
    m = DraftMemory(bound)
    texts = [[10_000 + 50 * i + j for j in range(100)] for i in range(60)]  # each shares half its keys
    for text in texts:
        m.add(text, n_prompt=0)
        assert m.nbytes <= bound
    assert 1 < len(m) < len(texts)
    assert m.recall(texts[-1][:KEY], 3) == texts[-1][KEY:KEY + 3]  # the newest is kept
    assert m.recall(texts[0][:KEY], 3) == []  # the oldest is gone, index and all
    assert all(p >= m.base for index in (m.index, m.after) for postings in index.values() for p in postings)
    m.clear()
    assert len(m) == 0 and m.recall(texts[-1][:KEY], 3) == []
    huge = list(range(20_000, 30_000))
    m.add(huge, n_prompt=0)  # more than the bound holds: its end is kept
    assert m.nbytes <= bound and m.recall(huge[-10:-7], 2) == huge[-7:-5] and m.recall(huge[:3], 2) == []


def _answer(target, prompt, drafter=None, params=SamplingParams(), **kw):
    tokens, last = [], None
    for ev in generate(target, prompt, drafter=drafter, params=params, **kw):
        if ev.token is not None:
            tokens.append(ev.token)
        last = ev
    return tokens, last.stats


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, top_p=0.95,
                                                                     min_p=0.05, seed=7)], ids=["greedy", "sampled"])
def test_a_request_drafts_from_an_earlier_answer_and_stays_exact(demo_models, params):
    target, _ = demo_models
    prompt, _ = build_prompt(target, "List the planets of the solar system, one per line.")
    # 32 tokens an answer (48 before): the second still has rounds of 6 drafted from memory to count
    alone, _ = _answer(target, prompt, params=params, max_tokens=32)
    drafter = PromptLookupDrafter()
    drafter.memory = DraftMemory(1 << 20)
    first, stats = _answer(target, prompt, drafter, params, max_tokens=32, draft_max=6, fixed=True)
    assert first == alone and "memory" not in stats.accepted_by  # nothing remembered yet
    assert len(drafter.memory) == 1
    # The same request again (a retry, a second user): the memory drafts the answer it gave before.
    again, stats = _answer(target, prompt, drafter, params, max_tokens=32, draft_max=6, fixed=True)
    assert again == alone
    assert stats.accepted_by.get("memory", 0) >= len(alone) // 2, stats.as_dict()
    assert any(k.startswith("memory@") for k in stats.draft_lengths)


def _records_exact(target, drafter, params, records) -> tuple[dict[str, int], dict[str, int]]:
    """Each record's answer drafted with `drafter` (--draft-fixed, 6 a round) is the target alone's: returns the
    accepted tokens by source and the rounds by what they drafted, over all records."""
    accepted, rounds = {}, {}
    for _, _, text in records:
        prompt, _ = build_prompt(target, text)
        alone, _ = _answer(target, prompt, params=params, max_tokens=64)
        spec, stats = _answer(target, prompt, drafter, params, max_tokens=64, draft_max=6, fixed=True)
        assert spec == alone
        for counts, new in ((accepted, stats.accepted_by), (rounds, stats.draft_lengths)):
            for key, n in new.items():
                counts[key] = counts.get(key, 0) + n
    return accepted, rounds


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, seed=3)],
                         ids=["greedy", "sampled"])
def test_records_of_one_schema_resume_the_earlier_records_and_stay_exact(demo_models, params):
    target, _ = demo_models
    drafter = PromptLookupDrafter()
    drafter.memory = DraftMemory(1 << 20)
    # Three records the demo target writes in one layout (the others vary).
    accepted, _ = _records_exact(target, drafter, params, REPETITIVE[2:5])
    # After each record's new values, the earlier records' next field names were drafted and accepted.
    assert accepted.get("memory-resumed", 0) > 0, accepted


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, seed=3)],
                         ids=["greedy", "sampled"])
def test_the_draft_model_goes_on_from_the_memory_and_stays_exact(demo_models, params):
    # A chain (costs.Plan.then): the memory's tokens (a record's keys), then the model's from there (its values),
    # verified in one target step. --draft-fixed drafts a chain whenever the memory offers fewer than draft_max
    # (the draft model without prompt lookup, whose longer offers would take the whole draft).
    target, draft = demo_models
    drafter = make_drafter("draft", model=draft, memory=DraftMemory(1 << 20))
    # Five records: where two earlier records agree, the memory stops at a value.
    accepted, rounds = _records_exact(target, drafter, params, REPETITIVE[1:6])
    chains = sum(n for name, n in rounds.items() if "+draft@" in name)
    assert chains > 0 and accepted.get("draft", 0) > 0, (chains, accepted)
    assert accepted.get("memory", 0) + accepted.get("memory-resumed", 0) > 0, accepted


def test_the_pair_remembers_across_calls_unless_off(demo_paths):
    question = "Name three colours of the rainbow."
    with dspark.load(demo_paths[0], draft="lookup", ctx_size=512, quiet=True) as pair:
        first = pair.complete(question, max_tokens=24, fixed=True, draft_max=6)
        second = pair.complete(question, max_tokens=24, fixed=True, draft_max=6)
        assert second.tokens == first.tokens
        assert second.stats.accepted_by.get("memory", 0) > 0, second.stats.as_dict()
    with dspark.load(demo_paths[0], draft="lookup", ctx_size=512, memory_mb=0, quiet=True) as pair:
        assert pair.drafter.memory is None
        pair.complete(question, max_tokens=24, fixed=True, draft_max=6)
        r = pair.complete(question, max_tokens=24, fixed=True, draft_max=6)
        assert r.tokens == first.tokens and "memory" not in r.stats.accepted_by


def test_batched_requests_draft_from_earlier_ones(demo_paths):
    question = "Write the numbers from one to ten in words, separated by commas."
    with dspark.load(demo_paths[0], draft="none", ctx_size=512, quiet=True) as pair:
        alone = pair.complete(question, max_tokens=32).tokens
    with dspark.load(demo_paths[0], draft="lookup", ctx_size=512, parallel=2, quiet=True) as pair:
        first = pair.complete(question, max_tokens=32, fixed=True, draft_max=6)
        second = pair.complete(question, max_tokens=32, fixed=True, draft_max=6)
    assert first.tokens == second.tokens == alone
    assert second.stats.accepted_by.get("memory", 0) > 0, second.stats.as_dict()


def test_make_drafter_shares_the_memory_given():
    memory = DraftMemory(1 << 20)
    assert make_drafter("lookup", memory=memory).memory is memory
    assert make_drafter("lookup").memory is None


# ---- the memory on disk (--draft-cache) ---------------------------------------------------------------------

def _run(*args):
    import subprocess
    import sys

    # 12 tokens (24 before): a second run still drafts 10 of them from the memory the first left
    return subprocess.run([sys.executable, "-m", "dspark_cli", "run", "--draft", "lookup", "--temp", "0", "-n", "12",
                           "--draft-fixed", "--draft-max", "6", "--ctx-size", "512", "--json", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


def _warnings(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if "warning:" in ln]


def test_the_draft_cache_carries_the_memory_to_the_next_process(tmp_path):
    import json

    cache = tmp_path / "memory.bin"
    first = _run("--draft-cache", str(cache), "Name three colours of the rainbow.")
    assert first.returncode == 0, first.stderr
    assert cache.read_bytes().startswith(b"DSPARK-DRAFT-MEMORY\n") and not _warnings(first)
    again = _run("--draft-cache", str(cache), "Name three colours of the rainbow.")
    assert again.returncode == 0, again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert b["text"] == a["text"]
    assert b["accepted_by"].get("memory", 0) > 0, b
    assert list(tmp_path.iterdir()) == [cache]  # no temporary file left beside it


@pytest.fixture(scope="module")
def good_draft_cache(tmp_path_factory) -> bytes:
    """What a run from no cache writes for "Say hello." (greedy: the same bytes every time), checked once to be
    one the next run reads and drafts from, without a warning."""
    import json

    cache = tmp_path_factory.mktemp("good-cache") / "memory.bin"
    assert _run("--draft-cache", str(cache), "Say hello.").returncode == 0
    good = cache.read_bytes()
    ok = _run("--draft-cache", str(cache), "Say hello.")
    assert not _warnings(ok) and json.loads(ok.stdout)["accepted_by"].get("memory", 0) > 0
    return good


def test_the_draft_cache_keeps_where_each_answer_starts(tmp_path):
    from dspark_cli.models.draft_cache import DraftCache

    m = DraftMemory(1 << 20)
    m.add(list(range(100, 140)) + HEADER + ANSWER, n_prompt=43)  # a long prompt: its last PROMPT_TAIL tokens kept
    m.add([1, 2] + HEADER + ANSWER, n_prompt=5)
    m.add(ANSWER, n_prompt=0)
    assert m.heads() == [PROMPT_TAIL, 5, 0]
    DraftCache(tmp_path / "m.bin", "v").write(m)
    again = DraftMemory(1 << 20)
    assert DraftCache(tmp_path / "m.bin", "v").read(again, quiet=True) == 3
    assert again.heads() == m.heads() and list(again.tokens) == list(m.tokens)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "version", "heads"])
def test_a_bad_draft_cache_is_ignored_with_one_warning_and_replaced(tmp_path, good_draft_cache, damage):
    import json

    # One run a damage (three before): the good file is made and read back once for all four (good_draft_cache),
    # and the replacement is checked to be that very file.
    cache = tmp_path / "memory.bin"
    data = good_draft_cache
    magic, header, body = data.split(b"\n", 2)
    if damage == "truncated":
        data = data[:-3]
    elif damage == "foreign":
        data = magic + b"\n" + json.dumps({**json.loads(header), "vocab": "0" * 32}).encode() + b"\n" + body
    elif damage == "version":
        data = magic + b"\n" + json.dumps({**json.loads(header), "version": 99}).encode() + b"\n" + body
    elif damage == "heads":  # an answer said to start past its text's end
        data = magic + b"\n" + json.dumps({**json.loads(header), "heads": [10 ** 6]}).encode() + b"\n" + body
    cache.write_bytes(data)
    proc = _run("--draft-cache", str(cache), "Say hello.")
    assert proc.returncode == 0, proc.stderr
    assert len(_warnings(proc)) == 1 and "ignoring the draft cache" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["text"]
    assert "memory" not in json.loads(proc.stdout)["accepted_by"]  # it started empty
    assert cache.read_bytes() == good_draft_cache  # replaced at exit by a good one: what a run from none writes


@pytest.mark.parametrize("content", [b"my precious notes\n", b"\x00\xff" * 50])
def test_a_file_that_is_not_a_draft_cache_is_never_written_over(tmp_path, content):
    """--draft-cache pointed at another program's file (a typo, a wrong path): its bytes stay as they were."""
    cache = tmp_path / "notes.txt"
    cache.write_bytes(content)
    proc = _run("--draft-cache", str(cache), "Say hello.")
    assert proc.returncode == 0, proc.stderr
    assert len(_warnings(proc)) == 1 and "left as it is" in proc.stderr, proc.stderr
    assert cache.read_bytes() == content


def test_a_draft_cache_that_cannot_be_written_warns_once(tmp_path):
    proc = _run("--draft-cache", str(tmp_path), "Say hello.")  # a directory
    assert proc.returncode == 0, proc.stderr
    assert len(_warnings(proc)) == 1 and "cannot be saved" in proc.stderr, proc.stderr


def test_draft_cache_needs_the_memory(tmp_path):
    proc = _run("--draft-cache", str(tmp_path / "m.bin"), "--draft-memory", "0", "Say hello.")
    assert proc.returncode == 2 and "--draft-memory 0" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--draft-cache", "", "Say hello.")
    assert proc.returncode == 2 and "--draft-cache needs a file name" in proc.stderr and "Traceback" not in proc.stderr
