"""The batched engine (engine/batch.py) on the real demo pair: several generations in one pair of contexts, each
identical to the same generation run alone through engine/loop.py (greedy token for token, seeded sampling
token for token), whatever shares its passes: queued jobs, a job cancelled mid-answer, a free slot inside the
batch's range, a conversation resent with one more turn (which processes only its new tokens)."""

from __future__ import annotations

import os
import time

import pytest

from dspark_cli.engine.batch import COPIES_TRUSTED, COPY_RETIME, Job, Scheduler
from dspark_cli.engine.drafters import make_drafter
from dspark_cli.engine.loop import generate
from dspark_cli.engine.sampling import SamplingParams
from dspark_cli.llama.kernels import EXACT_BATCH_MAX
from dspark_cli.llama.model import Model
from dspark_cli.prompt import ChatTemplate, tokenize_prompt
from dspark_cli.steplog import StepLog

QUESTIONS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a refrigerator works, step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "List ten fruits, one per line.",
    "Count from one to twenty in words.",
]


@pytest.fixture(scope="module")
def batch_models(demo_paths):
    target = Model(demo_paths[0], role="target", n_ctx=1024, n_seq=4)
    draft = Model(demo_paths[1], role="draft", n_ctx=1024, n_seq=4, separate=False)
    yield target, draft
    draft.close()
    target.close()


@pytest.fixture
def scheduler(batch_models):
    target, draft = batch_models
    for slot in range(target.n_seq):  # empty slots: jobs arriving together take them in order
        target.truncate(0, slot)
        draft.truncate(0, slot)
    s = Scheduler(target, make_drafter("hybrid", draft))
    yield s
    s.close()


def prompts(target: Model) -> list[list[int]]:
    template = ChatTemplate(target)
    return [tokenize_prompt(target, template.render([{"role": "user", "content": q}]).text) for q in QUESTIONS]


def lone(demo_models, prompt, params, max_tokens) -> list[int]:
    target, draft = demo_models
    return [ev.token for ev in generate(target, prompt, drafter=make_drafter("hybrid", draft), params=params,
                                        max_tokens=max_tokens) if ev.token is not None]


def tokens_of(job: Job) -> list[int]:
    return [ev.token for ev in job.events() if ev.token is not None]


def wait_for(condition, what: str) -> None:
    """Until condition() holds (a state; the bound only keeps a broken scheduler from hanging the run)."""
    deadline = time.time() + 300
    while not condition():
        assert time.time() < deadline, f"waited five minutes for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_six_jobs_on_four_slots_each_as_alone(demo_models, batch_models, scheduler, temperature):
    """Greedy and seeded sampling: six requests at once on four slots (two wait for a slot), each answer the
    lone engine's, token for token, and the first four shared their target passes."""
    ps = prompts(batch_models[0])
    params = [SamplingParams(temperature=temperature, seed=11 + i) for i in range(len(ps))]
    # 24 tokens an answer (40 before): the last two still wait for a slot, the first four still share passes
    jobs = [Job(p, sp, 24, (), 8) for p, sp in zip(ps, params)]
    scheduler.submit(*jobs)  # all arrive before the scheduler's first step
    got = [tokens_of(j) for j in jobs]
    assert got == [lone(demo_models, p, sp, 24) for p, sp in zip(ps, params)]
    assert all(j.stats.batch_max >= 2 for j in jobs[:4])
    assert scheduler.active == 0


def test_a_cancelled_job_frees_its_slot_and_the_others_lose_nothing(demo_models, batch_models, scheduler):
    """The middle one of three leaves after its first tokens: a free slot inside the range the other two
    still span (padded rows there), and both answers stay the lone ones."""
    ps = prompts(batch_models[0])[:3]
    greedy = SamplingParams()
    jobs = [Job(p, greedy, 32, (), 8) for p in ps]  # 32 tokens (48 before): the two go on long past the cancel
    scheduler.submit(*jobs)
    events = jobs[1].events()
    next(events)
    next(events)
    scheduler.cancel(jobs[1])
    wait_for(lambda: jobs[1].finished, "the cancelled job to leave its slot")
    assert [j.slot for j in jobs] == [0, 1, 2] and scheduler.slots[1] is None
    assert tokens_of(jobs[0]) == lone(demo_models, ps[0], greedy, 32)
    assert tokens_of(jobs[2]) == lone(demo_models, ps[2], greedy, 32)
    # Its cache keeps only what was delivered (a resend can reuse it), nothing past it.
    target = batch_models[0]
    assert len(target.seq_cached[1]) <= jobs[1].seen
    assert target.kv_pos_max(1) == len(target.seq_cached[1]) - 1


def test_a_resent_conversation_processes_only_its_new_tokens(demo_models, batch_models, scheduler):
    """Turn two extends turn one's prompt and answer: it goes to the slot holding them and the target processes
    only the new tokens, while another job generates beside it; both turns equal the lone engine's two turns
    (which reuse their cache the same way)."""
    target = batch_models[0]
    ps = prompts(target)
    greedy = SamplingParams()
    first = Job(ps[0], greedy, 24, (), 8)
    scheduler.submit(first)
    answer = tokens_of(first)
    wait_for(lambda: scheduler.settling == 0, "the idle scheduler to settle the answer for reuse")
    more = target.tokenize("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n",
                           add_special=False)
    second_prompt = ps[0] + answer + more
    other = Job(ps[3], greedy, 24, (), 8)  # beside turn two, as long as it (40 before)
    second = Job(second_prompt, greedy, 24, (), 8)
    scheduler.submit(second, other)
    assert tokens_of(second) == lone_two_turns(demo_models, ps[0], second_prompt, greedy)
    assert second.slot == first.slot
    assert second.stats.n_prompt_evaluated <= max(len(more), EXACT_BATCH_MAX + 1) + 1
    assert tokens_of(other) == lone(demo_models, ps[3], greedy, 24)


def test_new_jobs_take_neighbouring_slots(demo_models, batch_models, scheduler):
    """A free slot between busy ones is padded in every step, so newcomers take neighbouring slots even where other
    slots' caches hold less to throw away: with short answers cached in slots 0 and 3 and long ones in 1 and 2, two
    jobs arriving together take 0 and 1 (their caches alone would have chosen 0 and 3, and every step would have
    padded two free streams). Each answer is still the lone one's."""
    target = batch_models[0]
    ps = prompts(target)
    greedy = SamplingParams()
    earlier = [Job(p, greedy, n, (), 8) for p, n in zip(ps[:4], (1, 48, 48, 1))]
    scheduler.submit(*earlier)
    for job in earlier:
        tokens_of(job)
    assert [j.slot for j in earlier] == [0, 1, 2, 3]
    wait_for(lambda: scheduler.settling == 0, "the idle scheduler to settle the answers")
    cached = [len(target.seq_cached[s]) for s in range(4)]
    assert cached[0] + 40 < cached[1] and cached[3] + 40 < cached[2]
    jobs = [Job(p, greedy, 40, (), 8) for p in ps[4:6]]
    scheduler.submit(*jobs)
    got = [tokens_of(j) for j in jobs]
    assert sorted(j.slot for j in jobs) in ([0, 1], [2, 3])
    assert got == [lone(demo_models, p, greedy, 40) for p in ps[4:6]]


SYSTEM = ("You are the assistant of a small bakery in Lyon. Answer in plain sentences, name every ingredient, give "
          "quantities in grams, and never use lists, tables or headings.")


def with_system(target: Model, question: str) -> list[int]:
    text = ChatTemplate(target).render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    return tokenize_prompt(target, text.text)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_prompt_copies_the_prefix_another_slot_holds(demo_models, batch_models, scheduler, temperature):
    """Three jobs with one system prompt arrive together: the first processes it, the others copy it from the
    first's slot (Scheduler._borrow) and process only their own questions, in slots of their own; each answer is
    the lone engine's, greedy and seeded sampling alike."""
    target = batch_models[0]
    ps = [with_system(target, q) for q in QUESTIONS[:3]]
    shared = len(os.path.commonprefix(ps))
    assert shared > 2 * (EXACT_BATCH_MAX + 1)  # (a copy then saves tokens whatever prompt_plan leaves to process)
    params = [SamplingParams(temperature=temperature, seed=5 + i) for i in range(3)]
    jobs = [Job(p, sp, 24, (), 8) for p, sp in zip(ps, params)]
    scheduler.submit(*jobs)
    got = [tokens_of(j) for j in jobs]
    assert len({j.slot for j in jobs}) == 3
    assert jobs[0].stats.n_prompt_evaluated == len(ps[0])
    for job, p in zip(jobs[1:], ps[1:]):
        assert job.stats.n_prompt_evaluated <= len(p) - shared + EXACT_BATCH_MAX + 1
    assert got == [lone(demo_models, p, sp, 24) for p, sp in zip(ps, params)]


def test_the_same_prompt_twice_copies_all_of_it(demo_models, batch_models, scheduler):
    """Two clients send the very same prompt: the second copies all of it but its last token (which its first
    step reads, as a lone run's does), so it has no prompt batch of its own; then a third, with the same prompt
    again, copies from either. Each answers as alone."""
    target = batch_models[0]
    p = with_system(target, QUESTIONS[4])
    jobs = [Job(p, SamplingParams(), 16, (), 8) for _ in range(3)]
    scheduler.submit(*jobs)
    got = [tokens_of(j) for j in jobs]
    assert [j.stats.n_prompt_evaluated for j in jobs] == [len(p), 1, 1]
    assert got == [lone(demo_models, p, SamplingParams(), 16)] * 3


def test_no_copy_where_it_would_cost_more_than_it_saves(demo_models, batch_models, scheduler):
    """A copy timed as dearer than the whole prompt (as a huge context's stream on a slow bus would be): the second
    job processes its whole prompt itself, and still answers as alone."""
    target = batch_models[0]
    ps = [with_system(target, q) for q in QUESTIONS[:2]]
    scheduler.copy_seconds, scheduler.copies_timed, scheduler.copies_refused = 3600.0, COPIES_TRUSTED, 0
    jobs = [Job(p, SamplingParams(), 16, (), 8) for p in ps]
    scheduler.submit(*jobs)
    got = [tokens_of(j) for j in jobs]
    assert [j.stats.n_prompt_evaluated for j in jobs] == [len(p) for p in ps]
    assert got == [lone(demo_models, p, SamplingParams(), 16) for p in ps]
    assert scheduler.copies_refused == 1


def test_a_copy_timed_too_dear_is_timed_again_now_and_then(demo_models, batch_models, scheduler):
    """A timing only overestimates a copy (a busy machine, a small batch's fixed cost), and a refused copy is never
    timed: so one copy in COPY_RETIME refused is taken anyway, and its timing replaces the dear one."""
    target = batch_models[0]
    ps = [with_system(target, q) for q in QUESTIONS[2:4]]
    scheduler.copy_seconds, scheduler.copies_timed, scheduler.copies_refused = 3600.0, COPIES_TRUSTED, COPY_RETIME - 1
    jobs = [Job(p, SamplingParams(), 16, (), 8) for p in ps]
    scheduler.submit(*jobs)
    got = [tokens_of(j) for j in jobs]
    assert jobs[0].stats.n_prompt_evaluated == len(ps[0]) and jobs[1].stats.n_prompt_evaluated < len(ps[1]) - 16
    assert scheduler.copies_timed == COPIES_TRUSTED + 1 and scheduler.copy_seconds < 3600.0
    assert got == [lone(demo_models, p, SamplingParams(), 16) for p in ps]


@pytest.mark.parametrize("separate", [True, False])
def test_a_copied_prefix_gives_a_fresh_runs_logits(demo_paths, separate):
    """Model.copy_prefix: a sequence given another's prefix, then its own rest, reads bit for bit the logits a
    fresh sequence computing the whole prompt reads (separate streams: copied whole, then cut); in a shared pool
    (the draft's: the donor's cells tagged) the same up to the pool's own summation order. The donor keeps its
    own."""
    import numpy as np

    model = Model(demo_paths[0], role="target", n_ctx=512, n_seq=3, separate=separate)

    def answer_logits(prompt: list[int], seq: int):  # as a lone run: the prompt (prompt_plan), then its last token
        model.sync(prompt[:-1], n_logits=0, seq=seq)
        return model.eval(prompt[-1:], n_logits=1, seq=seq)[0].copy()

    try:
        a, b = (with_system(model, q) for q in QUESTIONS[:2])
        answer_logits(a, 0)
        donor, n_keep = model.donor(b[:-1], 1)
        assert donor == 0 and n_keep >= len(os.path.commonprefix([a, b])) - EXACT_BATCH_MAX - 1
        model.copy_prefix(0, 1, n_keep)
        assert model.seq_cached[1] == b[:n_keep] and model.kv_pos_max(1) == n_keep - 1
        assert model.prompt_plan(b[:-1], 1)[0] == n_keep
        copied, fresh = answer_logits(b, 1), answer_logits(b, 2)
        if separate:
            assert np.array_equal(copied, fresh)
        else:  # a pool interleaves its sequences' cells (no lone run's order, a draft's): the same keys, other sums
            assert np.abs(copied - fresh).max() < 0.1 and copied.argmax() == fresh.argmax()
        assert model.seq_cached[0] == a and model.kv_pos_max(0) == len(a) - 1
        assert model.donor(b[:-1], 2) == (-1, 0)  # nothing holds more than its own cache now
    finally:
        model.close()


def lone_two_turns(demo_models, prompt, second_prompt, params) -> list[int]:
    target, draft = demo_models
    drafter = make_drafter("hybrid", draft)
    for _ in generate(target, prompt, drafter=drafter, params=params, max_tokens=24):
        pass
    return [ev.token for ev in generate(target, second_prompt, drafter=drafter, params=params, max_tokens=24)
            if ev.token is not None]


def test_closing_ends_every_job_with_an_error(batch_models):
    from dspark_cli.errors import UsageError

    target, draft = batch_models
    s = Scheduler(target, make_drafter("hybrid", draft))
    job = Job(prompts(target)[5], SamplingParams(), 400, (), 8)
    s.submit(job)
    events = job.events()
    next(events)
    s.close()
    with pytest.raises(UsageError, match="closed"):
        for _ in events:
            pass
    with pytest.raises(UsageError, match="closed"):
        s.submit(Job([1, 2, 3], SamplingParams(), 4, (), 8))


def test_the_step_log_says_where_the_time_went(batch_models, tmp_path, monkeypatch):
    """DSPARK_STEP_LOG ({pid} in its name): a JSON line per prompt batch and step, whose tokens add up to the
    answers', and scripts/step_log_report.py reads it; a log that cannot be written costs one warning, no run."""
    import json
    import subprocess
    import sys

    target, draft = batch_models
    for slot in range(target.n_seq):
        target.truncate(0, slot)
        draft.truncate(0, slot)
    monkeypatch.setenv("DSPARK_STEP_LOG", str(tmp_path / "steps-{pid}.jsonl"))
    s = Scheduler(target, make_drafter("hybrid", draft), step_log=StepLog.from_environment())
    try:
        jobs = [Job(p, SamplingParams(), 16, (), 8) for p in prompts(target)[:2]]
        s.submit(*jobs)
        answers = [tokens_of(j) for j in jobs]
    finally:
        s.close()
    path = tmp_path / f"steps-{os.getpid()}.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "step"]
    # Every token came from a step (an end token counts there, not in the answer).
    assert sum(len(a) for a in answers) <= sum(e["tokens"] for e in steps) <= sum(len(a) + 1 for a in answers)
    assert max(e["jobs"] for e in steps) == 2 and all(e["target_s"] > 0 and e["python_s"] >= 0 for e in steps)
    # (the second copies the chat template's prefix from the first: processed tokens, the pending last one aside)
    assert sum(e["tokens"] for e in events if e["kind"] == "prompt") == sum(j.stats.n_prompt_evaluated - 1 for j in jobs)
    out = subprocess.run([sys.executable, "scripts/step_log_report.py", str(path)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert f"{len(steps)} steps" in out and "2 streams" in out and "prompt passes: 2" in out

    monkeypatch.setenv("DSPARK_STEP_LOG", str(tmp_path / "no-such-dir" / "steps.jsonl"))
    assert StepLog.from_environment() is None
