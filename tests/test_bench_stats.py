"""Benchmark statistics on recorded event streams: medians, per-position acceptance, α, the Leviathan
formula and aggregation. Streams are built by hand the way the engine emits them (one Event per token, a
closing Event with finish_reason, the same cumulative GenerationStats object on every event)."""

from __future__ import annotations

import math

import pytest

from dspark_cli.bench.stats import (
    Cell, RunRecord, check_identity, compare, expected_tokens, first_difference, overlapped_ceiling,
    predicted_speedup, record_from_events, sequential_ceiling, summarize,
)
from dspark_cli.engine.loop import Event
from dspark_cli.engine.stats import GenerationStats


def recorded(rounds, *, t_draft_step=0.0, t_target_step=0.01, n_prompt=10, first_token=100, method="draft"):
    """An event stream for per-round (drafted, accepted). Every round yields its accepted draft tokens then
    one target token; timings are exact multiples of step costs."""
    stats = GenerationStats(method=method, n_prompt=n_prompt, t_start=0.0)
    events, tok = [], first_token
    for drafted, accepted in rounds:
        stats.record_draft(drafted, accepted)  # the engine records every target step, drafts or not
        if drafted:
            stats.n_draft_steps += drafted if method == "draft" else 0  # prompt lookup runs no model
            stats.t_draft += drafted * t_draft_step
        stats.n_target_steps += 1
        stats.t_target += t_target_step
        for i in range(accepted + 1):
            stats.n_generated += 1
            events.append(Event(tok, f"t{tok}", i < accepted, stats))
            tok += 1
    stats.t_end = stats.t_draft + stats.t_target
    events.append(Event(None, "", False, stats, "length"))
    return events


def record(rounds, variant="draft@4", prompt_id="p1", category="chat", repeat=0, **kw) -> RunRecord:
    events = recorded(rounds, **kw)
    return record_from_events(events, prompt_id=prompt_id, category=category, variant=variant, repeat=repeat)


def baseline(n_tokens, t_step=0.01, **kw) -> RunRecord:
    return record([(0, 0)] * n_tokens, variant="target", t_target_step=t_step, method="target", **kw)


# ------------------------------------------------------------------------------------------ the formula


def test_expected_tokens_limits_and_value():
    assert expected_tokens(0.0, 4) == 1.0  # nothing accepted: only the target's own token
    assert expected_tokens(1.0, 4) == 5.0  # everything accepted: γ + the bonus token
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert expected_tokens(0.8, 4) == pytest.approx(sum(0.8**i for i in range(5)))


def test_predicted_speedup_gpu_and_cpu_forms():
    e = expected_tokens(0.8, 4)
    assert predicted_speedup(0.8, 4, 0.0) == pytest.approx(e)
    assert predicted_speedup(0.8, 4, 0.1) == pytest.approx(e / 1.4)
    assert predicted_speedup(0.8, 4, 0.1, verify_cost=2.0) == pytest.approx(e / 2.4)


def test_sequential_ceiling_counts_the_extra_draft_step_of_a_full_accept():
    # α = 1: 5 tokens per round for 4 draft steps plus the bonus token's, and one verify of 2 steps.
    assert sequential_ceiling(1.0, 4, step=0.02, draft=0.005, verify=0.04) == pytest.approx(5 * 0.02 / (5 * 0.005 + 0.04))
    # α = 0: one token per round; the draft's work is all waste, and the ceiling falls below 1.
    assert sequential_ceiling(0.0, 4, step=0.02, draft=0.005, verify=0.04) == pytest.approx(0.02 / (4 * 0.005 + 0.04))


def test_overlapped_ceiling_is_bound_by_the_slower_of_draft_and_verify():
    e = expected_tokens(0.9, 6)
    # A slow draft: every token waits for it, however cheap the verify.
    assert overlapped_ceiling(0.9, 6, step=0.015, draft=0.010, verify=0.001) == pytest.approx(1.5)
    # A slow verify: tokens come at E per verify.
    assert overlapped_ceiling(0.9, 6, step=0.015, draft=0.001, verify=0.060) == pytest.approx(0.015 * e / 0.060)


# ------------------------------------------------------------------------------------- event streams


def test_record_from_events_counts_tokens_positions_and_rounds():
    r = record([(4, 4), (4, 1), (4, 0), (4, 2)])
    assert r.n_generated == 5 + 2 + 1 + 3 == len(r.tokens)
    assert r.finish_reason == "length"
    assert (r.n_drafted, r.n_accepted, r.n_target_steps) == (16, 7, 4)
    assert r.drafted_at == [4, 4, 4, 4]
    assert r.accepted_at == [3, 2, 1, 1]
    assert r.rounds == [(4, 4), (4, 1), (4, 0), (4, 2)]
    assert (r.rejections, r.draft_rounds) == (3, 4)


def test_rounds_with_an_empty_draft_are_not_drafting_rounds():
    r = record([(3, 3), (0, 0), (3, 1)])
    assert r.draft_rounds == 2 and r.rejections == 1


def test_empty_stream_is_an_error():
    with pytest.raises(ValueError):
        record_from_events([], prompt_id="p", category="c", variant="v", repeat=0)


# --------------------------------------------------------------------------------------------- medians


def test_cell_takes_medians_of_timings_over_repeats():
    runs = [baseline(10, t_step=s, repeat=i) for i, s in enumerate((0.01, 0.05, 0.02))]
    cell = Cell.of_runs(runs)
    assert cell.runs == 3 and cell.tokens == 10
    assert cell.t_gen == pytest.approx(0.2)  # the median run, not the mean (0.267): the slow outlier is ignored
    assert cell.tokens_per_second == pytest.approx(50.0)


def test_cells_add_up_per_position():
    a = Cell.of_runs([record([(2, 2)])])
    b = Cell.of_runs([record([(4, 1)])])
    s = a + b
    assert s.prompts == 2 and s.drafted_at == [2, 2, 1, 1] and s.accepted_at == [2, 1, 0, 0]


# ---------------------------------------------------------------------------------------- comparisons


def test_compare_measures_and_predicts():
    # Target alone: 0.01 s per token. Speculation: draft steps cost 0.001 s (c = 0.1), a verify step 0.015 s
    # (verify cost 1.5), four rounds of γ = 4 with 4, 1, 0, 2 accepted.
    base = Cell.of_runs([baseline(11, t_step=0.01)])
    spec = Cell.of_runs([record([(4, 4), (4, 1), (4, 0), (4, 2)], t_draft_step=0.001, t_target_step=0.015)])
    r = compare(spec, base)
    assert r["baseline_tokens_per_second"] == pytest.approx(100.0)
    assert r["speculative_tokens_per_second"] == pytest.approx(11 / (16 * 0.001 + 4 * 0.015))
    assert r["speedup"] == pytest.approx(r["speculative_tokens_per_second"] / 100.0)
    assert r["acceptance_rate"] == pytest.approx(7 / 16)
    assert r["mean_accepted_tokens"] == pytest.approx(11 / 4)
    assert r["acceptance_by_position"] == pytest.approx([3 / 4, 2 / 4, 1 / 4, 1 / 4])
    assert r["alpha"] == pytest.approx(7 / (7 + 3))  # 7 accepted, 3 rounds ended by a rejection
    assert r["mean_draft_length"] == pytest.approx(4.0)
    assert r["cost_ratio"] == pytest.approx(0.1)
    assert r["verify_cost"] == pytest.approx(1.5)
    e = expected_tokens(0.7, 4)
    assert r["predicted_mean_accepted_tokens"] == pytest.approx(e)
    assert r["predicted_speedup"] == pytest.approx(e / (4 * 0.1 + 1.5))


def test_prediction_matches_measurement_when_the_model_holds():
    # With no overhead outside draft and target time, full acceptance and exact costs, predicted = measured.
    base = Cell.of_runs([baseline(20, t_step=0.01)])
    spec = Cell.of_runs([record([(4, 4)] * 4, t_draft_step=0.002, t_target_step=0.01)])
    r = compare(spec, base)
    assert r["alpha"] == 1.0
    assert r["predicted_speedup"] == pytest.approx(r["speedup"])


def test_compare_with_no_draft_has_no_prediction():
    base = Cell.of_runs([baseline(5)])
    spec = Cell.of_runs([record([(0, 0)] * 5, variant="lookup@4", method="lookup")])
    r = compare(spec, base)
    assert r["acceptance_rate"] == 0.0 and r["predicted_speedup"] is None and r["cost_ratio"] is None


def test_summarize_aggregates_by_category_and_picks_the_best():
    records = []
    for pid, cat in (("a", "chat"), ("b", "code")):
        records.append(baseline(10, prompt_id=pid, category=cat))  # 0.1 s each
        records.append(record([(4, 4), (4, 4)], variant="draft@4", prompt_id=pid, category=cat, t_target_step=0.02))
        records.append(record([(2, 2)] * 3 + [(0, 0)], variant="draft@2", prompt_id=pid, category=cat, t_target_step=0.02))
    s = summarize(records, ["a", "b"])
    assert [v["variant"] for v in s["variants"]] == ["draft@4", "draft@2"]
    v4 = s["variants"][0]
    assert [r["category"] for r in v4["per_prompt"]] == ["chat", "code"]
    assert [r["category"] for r in v4["per_category"]] == ["chat", "code"]
    assert v4["overall"]["prompts"] == 2
    assert v4["overall"]["speedup"] == pytest.approx((20 / 0.08) / (20 / 0.2))
    assert s["best"] == "draft@4"


def test_overall_speedup_weighs_by_time_not_by_prompt():
    # A long prompt (100 tokens, 2x faster) and a short one (10 tokens, 1x): the suite ran ~1.9x faster.
    recs = [baseline(100, prompt_id="long"), baseline(10, prompt_id="short"),
            record([(1, 1)] * 50, prompt_id="long", t_target_step=0.01),
            record([(0, 0)] * 10, prompt_id="short", t_target_step=0.01)]
    overall = summarize(recs)["variants"][0]["overall"]
    assert overall["speedup"] == pytest.approx((110 / 0.6) / (110 / 1.1))


# -------------------------------------------------------------------------------------------- identity


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


def test_check_identity_pairs_by_prompt_and_repeat():
    base = baseline(5)
    same = record([(4, 4)])
    assert base.tokens == same.tokens
    diff = record([(4, 4)], variant="lookup@4", first_token=101)
    other_repeat = record([(4, 4)], repeat=1, first_token=999)  # no baseline in repeat 1: not compared
    found = check_identity([base, same, diff, other_repeat])
    assert len(found) == 1
    m = found[0]
    assert (m.prompt_id, m.variant, m.repeat, m.position) == ("p1", "lookup@4", 0, 0)


def test_no_nan_for_empty_cells():
    r = compare(Cell(), Cell())
    assert r["speedup"] is None and not any(isinstance(v, float) and math.isnan(v) for v in r.values())


def test_prediction_counts_steps_that_drafted_nothing():
    # Prompt lookup: half the steps find no match and gain one token; the other half draft 2, accept 2.
    base = Cell.of_runs([baseline(8, t_step=0.01)])
    spec = Cell.of_runs([record([(2, 2), (0, 0)] * 2, variant="lookup@2", method="lookup", t_target_step=0.01)])
    r = compare(spec, base)
    assert r["drafted_step_fraction"] == 0.5 and r["alpha"] == 1.0 and r["cost_ratio"] is None
    assert r["predicted_mean_accepted_tokens"] == pytest.approx(0.5 * 3 + 0.5 * 1) == r["mean_accepted_tokens"]
    assert r["predicted_speedup"] == pytest.approx(r["speedup"])


def test_the_spread_over_rounds_pairs_each_round_with_the_target_alone_in_it():
    from dspark_cli.bench.stats import summarize

    runs = []
    # Round 0: 2 tokens per step at the target's step cost (2x); round 1: a slow machine for both (still 2x);
    # round 2: half the steps drafted, nothing accepted (1x the tokens per step, and drafting cost nothing).
    for repeat, (t_step, rounds) in enumerate([(0.01, [(1, 1)] * 10), (0.03, [(1, 1)] * 10),
                                               (0.01, [(1, 0), (0, 0)] * 10)]):
        runs.append(baseline(20, t_step=t_step, repeat=repeat))
        runs.append(record(rounds, t_target_step=t_step, repeat=repeat))
    (row,) = summarize(runs)["variants"][0]["per_prompt"]
    assert row["speedup_rounds"] == pytest.approx([2.0, 2.0, 1.0])
    assert (row["speedup_min"], row["speedup_max"]) == pytest.approx((1.0, 2.0))
    assert row["drafted_fraction_rounds"] == pytest.approx([1.0, 1.0, 0.5])


def test_the_control_is_never_the_best_unless_alone():
    # The target alone run again (bench --methods ...,control) on a machine that sped up for it: 1.25x "faster"
    # than the target alone and than the speculative variant, and still no contender; its spread is the noise.
    from dspark_cli.bench.stats import CONTROL, variant_name

    assert variant_name(CONTROL, None) == variant_name(CONTROL, 8) == CONTROL
    runs = []
    for repeat in range(2):
        runs.append(baseline(20, repeat=repeat))
        runs.append(record([(0, 0)] * 20, variant=CONTROL, method="target", t_target_step=0.008, repeat=repeat))
        runs.append(record([(1, 0)] * 20, variant="lookup@4", method="lookup", t_target_step=0.009, repeat=repeat))
    s = summarize(runs)
    assert [v["variant"] for v in s["variants"]] == [CONTROL, "lookup@4"]
    control = s["variants"][0]
    assert control["overall"]["speedup"] == pytest.approx(1.25)
    assert control["overall"]["speedup"] > s["variants"][1]["overall"]["speedup"]
    assert control["per_prompt"][0]["speedup_rounds"] == pytest.approx([1.25, 1.25])
    assert s["best"] == "lookup@4"
    assert summarize([r for r in runs if r.variant != "lookup@4"])["best"] == CONTROL  # all that ran
