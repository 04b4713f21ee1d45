"""The cost model on costs it is told: what it chooses on a GPU-like and a CPU-like cost curve, with a free
drafter, with catch-up costs, and how its estimates learn, fade and resist an outlier. No timing here: the
machine's own costs are measured by the benchmarks (scripts/bench_vs_llamacpp.py, dspark bench)."""

from __future__ import annotations

import pytest

from dspark_cli.engine.costs import (EXPLORE_K, EXPLORE_PASSES, PAYBACK_HALF_LIFE, SOURCE_LOOKUP, SOURCE_MEMORY, SOURCE_MODEL, Acceptance,
                                    BatchPlanner, Plan, Planner, StepCosts)

V1 = 0.030  # a 30 ms one-token target step


def told(planner: Planner, verify: dict[int, float], draft: float | None = None, catchup: float | None = None):
    for _ in range(8):  # enough samples for the running averages to settle on what they are told
        for n, s in verify.items():
            planner.costs.record_verify(n, s)
        if draft is not None:
            planner.costs.record_draft(draft)
        if catchup is not None:
            planner.costs.record_catchup(1, catchup)
            planner.costs.record_catchup(10, 10 * catchup / 4)
    return planner


def accept(planner: Planner, source: str, alpha: float, rounds: int = 200, k: int = 6):
    """Feed `rounds` rounds whose drafts are each accepted with probability alpha (in expectation)."""
    import random

    rng = random.Random(0)
    for _ in range(rounds):
        n = 0
        while n < k and rng.random() < alpha:
            n += 1
        planner.acceptance[source].record(k, n)


def gpu_like(n: int) -> float:
    return V1 * (1 + 0.03 * (n - 1))  # a batch costs about one step


def cpu_like(n: int) -> float:
    return V1 * (1 + 0.8 * (n - 1)) if n > 1 else V1  # every extra token costs most of a step


def test_the_first_rounds_time_two_plain_steps_then_a_short_draft():
    p = Planner(8, has_model=True, has_free=True)
    assert (p.plan({}, 0).source, p.plan({}, 0).k) == (None, 0)
    p.costs.record_verify(1, 10 * V1)  # the first step builds llama.cpp's graph: slow, and not the yardstick
    assert (p.plan({}, 0).source, p.plan({}, 0).k) == (None, 0)
    p.costs.record_verify(1, V1)
    assert p.costs.step(1) == V1  # of the first two timings the smaller stands
    first = p.plan({}, 0)
    assert (first.source, first.k) == (SOURCE_MODEL, EXPLORE_K)


def test_a_plain_step_now_and_then_keeps_the_yardstick_current():
    from dspark_cli.engine.costs import REFRESH_ROUNDS

    p = told(Planner(8, True, False), {n: gpu_like(n) for n in range(1, 10)}, draft=0.05 * V1)
    accept(p, SOURCE_MODEL, 0.9)
    sources = [p.plan({}, 0).source for _ in range(3 * REFRESH_ROUNDS)]
    plain = [i for i, s in enumerate(sources) if s is None]
    assert 2 <= len(plain) <= 4 and all(b - a == REFRESH_ROUNDS + 1 for a, b in zip(plain, plain[1:]))


def test_a_flat_verify_and_a_cheap_draft_draft_long():
    p = told(Planner(8, True, False), {n: gpu_like(n) for n in range(1, 10)}, draft=0.05 * V1)
    accept(p, SOURCE_MODEL, 0.9)
    plan = p.plan({}, 0)
    assert plan.source == SOURCE_MODEL and plan.k >= 6
    assert plan.rate > 3 / V1


def test_a_steep_verify_turns_speculation_off_and_says_why():
    p = told(Planner(8, True, False), {n: cpu_like(n) for n in range(1, 10)}, draft=0.5 * V1)
    accept(p, SOURCE_MODEL, 0.85)
    plan = p.plan({}, 0)
    assert plan.source is None and plan.k == 0
    assert p.off_reason.startswith("speculation off: a verify of") and "target steps" in p.off_reason
    # Even a perfect draft cannot pay for a draft step of half a target step plus such a verify.
    accept(p, SOURCE_MODEL, 1.0, rounds=2000)
    assert p.plan({}, 0).source is None


def test_free_lookup_pays_where_the_draft_model_does_not():
    p = told(Planner(8, True, True), {n: V1 * (1 + 0.4 * (n - 1)) for n in range(1, 10)}, draft=0.5 * V1)
    accept(p, SOURCE_MODEL, 0.8)
    accept(p, SOURCE_LOOKUP, 0.95)
    with_match = p.plan({SOURCE_LOOKUP: 8}, 0)
    assert with_match.source == SOURCE_LOOKUP and with_match.k >= 4
    assert p.plan({SOURCE_LOOKUP: 3}, 0).k <= 3  # never more than the match offers
    assert p.plan({}, 0).source is None  # no match: the model does not pay here either


def test_catching_the_draft_model_up_counts_but_only_the_reentry_window():
    from dspark_cli.engine.costs import REENTRY_WINDOW

    p = told(Planner(8, True, False), {n: gpu_like(n) for n in range(1, 10)}, draft=0.1 * V1, catchup=2 * V1)
    accept(p, SOURCE_MODEL, 0.7)
    assert p.plan({}, 0).source == SOURCE_MODEL
    assert p.plan({}, REENTRY_WINDOW).source is None  # a catch-up dearer than the round gains: not worth it
    # However long the model sat unused, it comes back over the last REENTRY_WINDOW tokens (drafters.rewind):
    # the cost of coming back is bounded, so a long pause cannot keep it out for good.
    cheap = told(Planner(8, True, False), {n: gpu_like(n) for n in range(1, 10)}, draft=0.1 * V1, catchup=0.01 * V1)
    accept(cheap, SOURCE_MODEL, 0.7)
    assert cheap.plan({}, 100_000).source == SOURCE_MODEL


def test_fixed_lengths_ignore_the_costs():
    p = told(Planner(5, True, True, fixed=True), {n: cpu_like(n) for n in range(1, 10)}, draft=V1)
    assert (p.plan({}, 0).source, p.plan({}, 0).k) == (SOURCE_MODEL, 5)
    q = Planner(5, False, True, fixed=True)
    assert (q.plan({SOURCE_LOOKUP: 2}, 0).source, q.plan({SOURCE_LOOKUP: 2}, 0).k) == (SOURCE_LOOKUP, 2)
    assert q.plan({}, 0).source is None


def test_one_bad_round_does_not_end_the_draft_model():
    p = told(Planner(8, True, False), {n: gpu_like(n) for n in range(1, 10)}, draft=0.2 * V1)
    p.acceptance[SOURCE_MODEL].record(2, 0)  # the first round: nothing accepted
    assert p.plan({}, 0).source == SOURCE_MODEL  # little evidence: still worth trying


def test_evidence_fades_so_a_drafter_left_aside_comes_back():
    acc = Acceptance(0.85, 8)
    for _ in range(20):
        acc.record(4, 0)
    low = acc.alpha(0)
    assert low < 0.2
    acc.fade(400)  # a few hundred tokens later: the text moved on
    assert acc.alpha(0) > 0.7
    assert acc.alpha(0, optimistic=True) >= acc.alpha(0)


def test_expected_tokens_matches_leviathan_for_a_constant_rate():
    acc = Acceptance(0.8, 8)
    for _ in range(5000):
        acc.record(8, 8)
        acc.record(8, 0)  # position 0 accepted half the time, the deeper ones always once reached
    assert acc.alpha(0) == pytest.approx(0.5, abs=0.01)
    assert acc.expected_tokens(3) == pytest.approx(1 + 0.5 * 3, abs=0.05)


def test_step_costs_interpolate_extrapolate_and_resist_an_outlier():
    c = StepCosts(8)
    assert c.step(1) is None
    c.record_verify(1, 0.03)
    assert c.step(5) == pytest.approx(0.03 * (1 + 0.05 * 4))  # the slope guess, one size known
    c.record_prefill(100, 1.0)  # a prompt of 100 tokens in a second: 10 ms a token in a batch
    assert c.step(5) == pytest.approx(0.03 + 4 * 0.01)
    c.record_verify(3, 0.07)
    assert c.step(2) == pytest.approx(0.05)  # between measured sizes
    assert c.step(5) == pytest.approx(0.11)  # past them, on their line
    c.record_verify(3, 5.0)  # a round the OS preempted
    assert c.step(3) < 0.07 * 2 * 1.01


def test_a_draft_models_first_step_building_its_graph_does_not_stand():
    c = StepCosts(8)
    c.record_verify(1, V1)
    c.record_draft(0.9 * V1)  # the first draft step: the draft model's graph is built in it
    c.record_draft(0.3 * V1)
    assert c.draft_step() == pytest.approx(0.3 * V1)  # the smaller of the first two (averaged: 0.75 V1)
    c.record_draft(0.4 * V1)
    assert c.draft_step() == pytest.approx(0.3 * V1 + 0.25 * 0.1 * V1)  # then a running average
    slow_second = StepCosts(8)
    slow_second.record_draft(0.3 * V1)
    slow_second.record_draft(0.9 * V1)  # a preempted second step: the first stands
    assert slow_second.draft_step() == pytest.approx(0.3 * V1)


def test_lookup_is_judged_in_hindsight_at_every_depth():
    p = Planner(8, False, True)
    seq = [1, 2, 3]
    p.hindsight(seq, {SOURCE_LOOKUP: [7, 8, 9]})  # proposed after [1, 2, 3]
    seq += [7, 8]
    p.hindsight(seq, {SOURCE_LOOKUP: []})  # not settled yet: 7 and 8 right, 9 unknown
    assert p.acceptance[SOURCE_LOOKUP].evidence == 0
    seq += [4]
    p.hindsight(seq, {SOURCE_LOOKUP: []})  # 9 was wrong: two accepted, the third rejected
    acc = p.acceptance[SOURCE_LOOKUP]
    assert (acc.reached[:3], acc.accepted[:3]) == ([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])


def test_chosen_lengths_are_counted_for_the_report():
    p = told(Planner(8, True, False), {n: cpu_like(n) for n in range(1, 10)}, draft=0.5 * V1)
    for _ in range(3):
        p.record_round(p.plan({}, 0), 0, 0, 1)
    p.plan({}, 0)  # planned, never run: not a round
    assert p.chosen_lengths == {"none": 3}


def test_each_free_source_has_its_own_acceptance():
    from dspark_cli.engine.costs import SOURCE_MEMORY

    p = told(Planner(8, True, True), {n: V1 * (1 + 0.4 * (n - 1)) for n in range(1, 10)}, draft=0.5 * V1)
    accept(p, SOURCE_MODEL, 0.6)
    accept(p, SOURCE_LOOKUP, 0.2)
    accept(p, SOURCE_MEMORY, 0.95)
    both = p.plan({SOURCE_LOOKUP: 8, SOURCE_MEMORY: 8}, 0)
    assert both.source == SOURCE_MEMORY and both.k >= 4  # the memory, right where lookup is not
    assert p.plan({SOURCE_LOOKUP: 8}, 0).source is None  # lookup alone does not pay here
    # Both are judged in hindsight, each on its own proposal.
    seq = [1, 2, 3]
    p.hindsight(seq, {SOURCE_LOOKUP: [9], SOURCE_MEMORY: [7]})
    lookup = p.acceptance[SOURCE_LOOKUP].reached[0] - p.acceptance[SOURCE_LOOKUP].accepted[0]
    memory = p.acceptance[SOURCE_MEMORY].accepted[0]
    p.hindsight(seq + [7], {})  # 7 came: lookup's 9 was wrong, the memory's 7 right
    assert p.acceptance[SOURCE_LOOKUP].reached[0] - p.acceptance[SOURCE_LOOKUP].accepted[0] == lookup + 1
    assert p.acceptance[SOURCE_MEMORY].accepted[0] == memory + 1


# ---- the batch planner (several sequences in one pass: engine/batch.py) ----------------------------------------

def batch_lanes(planner, n: int, room: int = 4, behind=None, left: int = 256) -> list:
    lanes = []
    for _ in range(n):
        lane = planner.new_lane()
        lane.room, lane.model_behind, lane.left = room, behind, left
        lanes.append(lane)
    return lanes


def batch_told(planner, verify, draft_pass, alpha: float):
    """Pass costs by total rows (target and draft) and the draft model's acceptance, as a server measures them."""
    for _ in range(8):
        for n in range(1, 17):
            planner.costs.record_verify(n, verify(n))
        for w in range(1, 17):
            planner.record_draft_pass(w, draft_pass(w))
    for _ in range(40):
        planner.pooled[SOURCE_MODEL].record(4, int(alpha * 4))
    return planner


def cpu_draft(w: int) -> float:
    return 0.5 * V1 * (1 + 0.3 * (w - 1))


def gpu_draft(w: int) -> float:
    return 0.1 * V1 * (1 + 0.02 * (w - 1))


def test_batched_prompts_reach_the_draft_model_only_where_it_would_pay():
    """A prompt goes through the draft model only where a plan would draft from it for some sequence were the
    prompts in, and the tokens left to write repay the prompts' pass: on a CPU at 4 sequences none, ever (no
    re-tries: a prompt the plan would not draft from is wasted); on a GPU all of them. While the draft's costs
    are unknown, one prompt, to explore with."""
    cpu = BatchPlanner(16, 64, has_model=True, has_free=False)
    lanes = batch_lanes(cpu, 4)
    assert cpu.exploring and cpu.drafts_wanted(lanes, 4, 4) == 0  # plain steps first: the yardstick
    for _ in range(2):
        cpu.costs.record_verify(4, cpu_like(4))
    assert cpu.drafts_wanted(lanes, 4, 4) == 1  # exploring: one prompt, not every sequence's
    lanes[2].model_behind = 0
    assert cpu.drafts_wanted(lanes, 4, 4) == 0  # it is in: the next steps explore with it
    plan = cpu.plan(lanes, 4, 4)
    assert plan.sources[2] == SOURCE_MODEL and plan.rows > 1
    for _ in range(EXPLORE_PASSES - 1):
        cpu.record_draft_pass(4 + 40, cpu_draft(44))  # a pass wider than any timed width counts too
        assert cpu.exploring
    cpu.record_draft_pass(4, cpu_draft(4))
    assert not cpu.exploring
    batch_told(cpu, cpu_like, cpu_draft, alpha=0.75)
    lanes[2].model_behind = None
    assert cpu.plan(batch_lanes(cpu, 4, behind=0), 4, 4).rows == 1  # with every prompt in: plain batching
    assert [cpu.drafts_wanted(lanes, 4, 4) for _ in range(300)] == [0] * 300
    # --draft-fixed drafts from the model whatever it costs: its prompts go in
    assert cpu.drafts_wanted(lanes, 4, 4, fixed=True) is None

    gpu = batch_told(BatchPlanner(16, 64, has_model=True, has_free=False), gpu_like, gpu_draft, alpha=0.75)
    assert SOURCE_MODEL in gpu.plan(batch_lanes(gpu, 4, behind=0), 4, 4).sources
    assert gpu.drafts_wanted(batch_lanes(gpu, 4), 4, 4, feed=4 * 100) is None
    # ... unless what the model saves over the tokens the sequences may still write does not repay the prompts'
    # pass: a lone request near its end, its whole text yet to go through the draft
    gpu.draft_costs.record_prefill(100, 100 * gpu_draft(1) / 4)
    assert gpu.drafts_wanted(batch_lanes(gpu, 1, left=200), 1, 4, feed=100) is None
    assert gpu.drafts_wanted(batch_lanes(gpu, 1, left=3), 1, 4, feed=400) == 0


def test_batched_prompts_stop_where_the_earlier_ones_were_not_repaid():
    """The what-if can find the model worth its prompts at a load where its steps then save less than the prompts
    cost (on the 2-core CPU at 2 clients, round after round): the record of what they paid back there stops the
    next prompt; a load where they were repaid keeps feeding the model; a shortfall fades as tokens are generated
    at that load, so the model is tried there again."""
    gpu = batch_told(BatchPlanner(16, 64, has_model=True, has_free=False), gpu_like, gpu_draft, alpha=0.75)
    gpu.draft_costs.record_prefill(100, 100 * gpu_draft(1) / 4)
    lanes = batch_lanes(gpu, 2)
    assert gpu.drafts_wanted(lanes, 2, 4, feed=40) is None  # nothing on record: the what-if decides
    v2 = gpu.costs.step(2)
    gpu.record_feed(2, 3 * v2)  # three steps' worth of prompts...
    gpu.record_step(2, 4, 0.5 * v2)  # ... of which the model's steps saved half a step
    for _ in range(50):
        gpu.record_step(2, 2, None)  # plain steps: no drafts from the model
    assert gpu.drafts_wanted(lanes, 2, 4, feed=40) == 0
    assert gpu.drafts_wanted(lanes, 4, 4, feed=40) is None  # another load: its own record
    gpu.record_feed(1, 2 * v2)
    gpu.record_step(1, 5, 3 * v2)  # repaid at one client: it feeds on
    assert gpu.drafts_wanted(batch_lanes(gpu, 1), 1, 4, feed=20) is None
    # The shortfall halves every PAYBACK_HALF_LIFE tokens generated at that load: 2.5 steps' worth is under an
    # eighth of a step (noise) after log2(20) = 4.3 half-lives, and the model is tried again.
    generated = 100  # the plain steps above
    while gpu.drafts_wanted(lanes, 2, 4, feed=40) == 0:
        gpu.record_step(2, 2, None)
        generated += 2
    assert 4 * PAYBACK_HALF_LIFE < generated < 5 * PAYBACK_HALF_LIFE
    # A step whose drafts from the model lost time adds to the shortfall.
    gpu.record_step(2, 2, -v2)
    assert gpu.drafts_wanted(lanes, 2, 4, feed=40) == 0


def test_batched_pooled_acceptance_ages_by_drafted_rounds_only():
    """The pooled evidence a new request starts from fades by the tokens of rounds that drafted from the source:
    a long burst of plain batching (where no draft pays) leaves it as the drafts left it, not back at the prior;
    a lane's own estimate still fades by its tokens, back toward its prior, which for a lane started after the
    server measured something is that measure."""
    planner = BatchPlanner(16, 64, has_model=True, has_free=False)
    lane = batch_lanes(planner, 1)[0]
    for i in range(40):
        planner.record_round(lane, SOURCE_MODEL, 4, i % 3 == 0, 1 + (i % 3 == 0))  # drafts mostly rejected
    learned = planner.pooled[SOURCE_MODEL].alpha(0)
    own = lane.acceptance[SOURCE_MODEL].alpha(0)
    assert learned < 0.5
    for _ in range(2000):  # eight users' plain steps: no drafts
        planner.record_round(lane, None, 0, 0, 1)
    assert planner.pooled[SOURCE_MODEL].alpha(0) == learned
    assert lane.acceptance[SOURCE_MODEL].alpha(0) > own + 0.2  # (its own evidence faded toward the prior)
    newcomer = planner.new_lane()
    assert newcomer.acceptance[SOURCE_MODEL].alpha(0) < 0.6
    # ... and a newcomer's own prior, where its evidence fades back to as it writes, is the server's: not 0.85
    for _ in range(400):
        planner.record_round(newcomer, None, 0, 0, 1)
    assert abs(newcomer.acceptance[SOURCE_MODEL].alpha(0) - learned) < 0.01


# ---- chains: a free source's tokens, then the draft model's -------------------------------------------------

def test_where_verify_is_flat_the_model_goes_on_from_the_memory():
    # The memory knows a record's next key (4 tokens, free), the model its value: one verify takes both.
    def planner(chains: bool) -> Planner:
        p = told(Planner(8, True, True, chains=chains), {n: gpu_like(n) for n in range(1, 10)}, draft=0.05 * V1,
                 catchup=0.05 * V1)
        accept(p, SOURCE_MODEL, 0.9)
        accept(p, SOURCE_MEMORY, 0.95)
        return p

    plan = planner(True).plan({SOURCE_MEMORY: 4}, 0)
    assert (plan.source, plan.k) == (SOURCE_MEMORY, 4) and plan.then >= 2, plan
    assert plan.name == f"memory@4+draft@{plan.then}"
    alone = planner(False).plan({SOURCE_MEMORY: 4}, 0)  # a draft of another vocabulary cannot read target tokens
    assert alone.then == 0 and alone.rate < plan.rate


def test_where_verify_is_steep_a_short_free_draft_beats_a_chain():
    # This VM's real pair: V(n) = V(1) (1 + 0.3 (n - 1)), a draft step 0.4 V(1), catching up 0.1 V(1) a token.
    p = told(Planner(8, True, True, chains=True), {n: V1 * (1 + 0.3 * (n - 1)) for n in range(1, 10)},
             draft=0.4 * V1, catchup=0.4 * V1)
    accept(p, SOURCE_MODEL, 0.99)
    accept(p, SOURCE_MEMORY, 0.9)
    plan = p.plan({SOURCE_MEMORY: 3}, 0)
    assert (plan.source, plan.then) == (SOURCE_MEMORY, 0), plan


def test_each_source_of_a_round_learns_its_own_part():
    p = Planner(8, True, True, chains=True)
    chain = Plan(SOURCE_MEMORY, 3, then=2)
    segments = [(SOURCE_MEMORY, 3), (SOURCE_MODEL, 2)]
    p.record_round(chain, 5, 1, 2, segments)  # the memory's second token was wrong: the model's part never judged
    memory, model = p.acceptance[SOURCE_MEMORY], p.acceptance[SOURCE_MODEL]
    assert memory.total_reached[:3] == [1, 1, 0] and memory.total_accepted[:2] == [1, 0]
    assert model.total_evidence == 0
    p.record_round(chain, 5, 4, 5, segments)  # the memory's three right, then the model's first
    assert memory.total_accepted[:3] == [2, 1, 1]
    assert model.total_reached[:2] == [1, 1] and model.total_accepted[:2] == [1, 0]
    # A free tail after the model's tokens learns from its own first token too.
    p.record_round(Plan(SOURCE_MODEL, 2), 5, 5, 6, [(SOURCE_MODEL, 2), (SOURCE_LOOKUP, 3)])
    assert p.acceptance[SOURCE_LOOKUP].total_accepted[:3] == [1, 1, 1]
    assert p.chosen_lengths == {"memory@3+draft@2": 2, "draft@2": 1}  # each round under its plan (as planned)


def test_free_tokens_go_on_from_the_model_where_they_pay():
    def planner(verify) -> Planner:
        p = told(Planner(8, True, True, chains=True), {n: verify(n) for n in range(1, 10)}, draft=0.05 * V1)
        accept(p, SOURCE_MODEL, 0.95)
        accept(p, SOURCE_MEMORY, 0.95)
        return p

    drafted = [(SOURCE_MODEL, 2)]  # the model wrote a value; the memory knows the next key
    p = planner(gpu_like)
    plan = p.plan({}, 0)
    assert plan.source == SOURCE_MODEL
    assert p.tail(plan, drafted, {SOURCE_MEMORY: 4}) == (SOURCE_MEMORY, 4)
    p.record_round(plan, 6, 6, 7, drafted + [(SOURCE_MEMORY, 4)])
    assert plan.name == f"draft@{plan.k}+memory@4" and p.chosen_lengths == {plan.name: 1}  # the report says so
    # Every extra verify token costing 0.8 of a step: a token at 95% beats the target alone's rate, not a round's
    # expected 1.2 tokens a step.
    assert planner(cpu_like).tail(Plan(SOURCE_MODEL, 2), drafted, {SOURCE_MEMORY: 4}) == (SOURCE_MEMORY, 1)
    assert planner(cpu_like).tail(Plan(SOURCE_MODEL, 2, rate=1.2 / V1), drafted, {SOURCE_MEMORY: 4}) is None
    # Never past draft_max.
    assert planner(gpu_like).tail(Plan(SOURCE_MODEL, 6), [(SOURCE_MODEL, 6)], {SOURCE_MEMORY: 4}) == (SOURCE_MEMORY, 2)
    assert planner(gpu_like).tail(Plan(SOURCE_MODEL, 2), drafted, {}) is None


def test_a_fixed_length_drafts_the_longest_offer_then_the_model():
    offers = {SOURCE_LOOKUP: 2, SOURCE_MEMORY: 4}
    plan = Planner(6, True, True, chains=True, fixed=True).plan(offers, 0)
    assert (plan.source, plan.k, plan.then) == (SOURCE_MEMORY, 4, 2)
    assert Planner(6, True, True, chains=True, fixed=True).plan({SOURCE_MEMORY: 9}, 0).then == 0  # offer fills it
    model = Planner(6, True, True, fixed=True).plan(offers, 0)  # no chains: the model alone, as before
    assert (model.source, model.k, model.then) == (SOURCE_MODEL, 6, 0)
