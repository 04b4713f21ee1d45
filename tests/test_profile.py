"""Cost profiles: what one run's cost model measured is the next run's prior (it drafts from its first round), robust
to a disturbed run, stored per files/build/device, and a corrupt or foreign profile is ignored with one warning.
A draft model left unused for long comes back over a bounded window of recent tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import dspark_cli as dspark
from dspark_cli.engine.costs import (MODEL_RETRY, SOURCE_LOOKUP, SOURCE_MODEL, Planner)
from dspark_cli.engine.loop import DEFAULT_DRAFT_MAX
from dspark_cli.engine.profile import KEEP_RUNS, CostProfile

V1 = 0.030


def measured_planner(v1: float = V1, verify_slope: float = 0.1, draft: float = 0.2, alpha: float = 0.8) -> Planner:
    """A planner after a run that timed these costs and saw this acceptance (k = 4 drafts)."""
    p = Planner(8, has_model=True, has_free=True)
    for _ in range(4):
        for n in (1, 3, 5):
            p.costs.record_verify(n, v1 * (1 + verify_slope * (n - 1)))
        p.costs.record_draft(draft * v1)
    for i in range(100):
        p.acceptance[SOURCE_MODEL].record(4, 4 if (i % 10) < alpha * 10 else 0)
    return p


def test_a_profile_starts_the_next_planner_drafting_at_once():
    fresh = Planner(8, has_model=True, has_free=True)
    assert fresh.plan({}, 0).source is None  # from nothing: the yardstick first
    profile = CostProfile()
    assert profile.absorb(measured_planner())
    p = Planner(8, has_model=True, has_free=True, profile=profile)
    first = p.plan({}, 0)
    assert first.source == SOURCE_MODEL and first.k >= 2  # no plain steps, no short exploratory draft
    assert p.costs.step(5) == pytest.approx(V1 * 1.4)
    # The profile's acceptance is a prior worth a few rounds: this run's own evidence soon outweighs it.
    assert p.acceptance[SOURCE_MODEL].evidence == pytest.approx(8.0)


def test_the_machine_slowing_down_rescales_the_profile():
    profile = CostProfile()
    profile.absorb(measured_planner())
    p = Planner(8, has_model=True, has_free=True, profile=profile)
    for _ in range(12):  # this run's steps of 3 take three times what the profile says
        p.costs.record_verify(3, 3 * V1 * 1.2)
    assert p.costs.step(1) == pytest.approx(3 * V1, rel=0.05)  # V(1), never timed in this run, follows
    assert p.costs.draft_step() == pytest.approx(3 * 0.2 * V1, rel=0.05)


def test_costs_are_medians_of_recent_runs_so_one_disturbed_run_moves_nothing():
    profile = CostProfile()
    for _ in range(4):
        profile.absorb(measured_planner(verify_slope=0.1))
    profile.absorb(measured_planner(verify_slope=2.0))  # a run the OS disturbed
    assert profile.prior().verify[5] == pytest.approx(1.4)
    for _ in range(3 * KEEP_RUNS):
        profile.absorb(measured_planner(verify_slope=0.5))
    assert profile.prior().verify[5] == pytest.approx(3.0)  # old runs fall out
    assert profile.runs == 5 + 3 * KEEP_RUNS


def test_a_drafter_turned_off_is_tried_again_at_falling_rates():
    p = Planner(8, has_model=True, has_free=False)
    for _ in range(4):
        for n in range(1, 10):
            p.costs.record_verify(n, V1 * (1 + 0.9 * (n - 1)))  # a steep CPU verify: the model never pays
        p.costs.record_draft(0.6 * V1)
    for _ in range(50):
        p.acceptance[SOURCE_MODEL].record(4, 0)
    tries = [i for i in range(2000) if p.plan({}, 3).source == SOURCE_MODEL]
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(tries) >= 4  # never locked out
    assert gaps == sorted(gaps) and gaps[0] >= MODEL_RETRY  # a falling rate...
    assert max(gaps) <= 513  # ...bounded


def test_round_trip_and_corrupt_dicts_are_refused():
    profile = CostProfile()
    profile.absorb(measured_planner())
    again = CostProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.prior() == profile.prior() and again.runs == 1
    assert again.acceptance[SOURCE_MODEL].reached == profile.acceptance[SOURCE_MODEL].reached
    for bad in ({}, {"version": 99}, {**profile.to_dict(), "figures": {"v1": [-1.0]}},
                {**profile.to_dict(), "figures": {"nonsense": [1.0]}},
                {**profile.to_dict(), "acceptance": {SOURCE_LOOKUP: {"reached": [1.0], "accepted": [2.0]}}}):
        with pytest.raises(ValueError):
            CostProfile.from_dict(bad)


# ---- end to end, on the demo pair (and the tiny synthetic one where any pair will do) ------------------------------


@pytest.fixture()
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_PROFILES", str(tmp_path))
    return tmp_path


PROMPT = "List the days of the week."


def test_a_profile_written_by_one_run_is_read_by_the_next(demo_paths, profiles):
    with dspark.load(draft="none", quiet=True) as alone:
        reference = alone.complete(PROMPT, max_tokens=40).tokens
    runs, after_first = [], None
    for _ in range(2):
        with dspark.load(quiet=True) as pair:
            result = pair.complete(PROMPT, max_tokens=40)
        assert result.tokens == reference  # exact, with or without a prior
        runs.append(result.stats.rounds)
        if after_first is None:
            (path,) = profiles.glob("*.json")
            after_first = CostProfile.from_dict(json.loads(path.read_text()))
    files = list(profiles.glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["runs"] == 2 and stored["key"]["draft"]["name"].endswith(".gguf")
    assert runs[0][0][0] == 0  # the first run's first round: a plain step, timing the yardstick
    # The next one's first round is the profile's choice: where what the first run timed says the draft model
    # pays (on the demo pair, unless the machine was loaded while it timed), it drafts at once. A prompt-lookup
    # match can only add options, so the model's option winning on its own means a draft whatever the prompt.
    choice = Planner(DEFAULT_DRAFT_MAX, has_model=True, has_free=True, profile=after_first).plan({}, 0)
    if choice.source == SOURCE_MODEL:
        assert runs[1][0][0] > 0


def _run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "dspark_cli", "run", "--temp", "0", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _tiny(paths) -> list[str]:
    """-m/-d for the tiny synthetic pair: its runs write and read profiles as the demo pair's do, in milliseconds."""
    return ["-m", str(paths[0]), "-d", str(paths[1])]


def test_a_corrupt_or_foreign_profile_is_ignored_with_one_warning(tiny_paths, profiles):
    env = {**os.environ, "DSPARK_PROFILES": str(profiles)}
    first = _run_cli(*_tiny(tiny_paths), PROMPT, "-n", "16", env=env)
    assert first.returncode == 0, first.stderr
    (path,) = profiles.glob("*.json")
    good = json.loads(path.read_text())
    for content in ("{not json", json.dumps({**good, "key": {**good["key"], "threads": 999}}),
                    json.dumps({**good, "figures": {"v1": ["fast"]}})):
        path.write_text(content)
        r = _run_cli(*_tiny(tiny_paths), PROMPT, "-n", "16", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == first.stdout  # the answer, unchanged
        warnings = [ln for ln in r.stderr.splitlines() if "cost profile" in ln]
        assert len(warnings) == 1 and "ignoring" in warnings[0], r.stderr
        assert "Traceback" not in r.stderr
        assert json.loads(path.read_text())["runs"] == 1  # replaced by this run's, valid again


def test_the_draft_model_rewinds_to_a_window_of_recent_tokens(demo_models):
    from dspark_cli.engine.drafters import Draft, ModelDrafter
    from dspark_cli.engine.sampling import Noise, SamplingParams

    target, draft = demo_models
    drafter = ModelDrafter(draft)
    seq = target.tokenize("The quick brown fox jumps over the lazy dog. " * 8, add_special=False)
    drafter.prepare(seq[:10], target.n_vocab)
    assert drafter.behind(seq) == len(seq) - 10  # it saw seq[:9]
    drafter.rewind(seq, 16)
    assert drafter.behind(seq) == 16  # however far behind, it catches up on 16 tokens
    n, _ = drafter.catch_up(seq)
    assert n == 16 and drafter.behind(seq) == 0
    ahead = Draft([])
    assert drafter.extend(seq, ahead, SamplingParams(), Noise(None)) and len(ahead.tokens) == 1
    drafter.release(seq, 10)
    assert draft.seq_cached[0] == seq[len(seq) - 17:]  # the window, and the token its draft came after
    drafter.prepare(seq, target.n_vocab)  # a new generation: the whole sequence again
    assert drafter.start == 0 and drafter.behind(seq) == 0


def test_a_sizes_first_timing_does_not_override_the_profile():
    # A step size's first pass in a run builds llama.cpp's graph (measured: several times a step): alone, that one
    # timing would turn a profitable draft length off for the whole answer.
    profile = CostProfile()
    profile.absorb(measured_planner())
    p = Planner(8, has_model=True, has_free=True, profile=profile)
    p.costs.record_verify(3, 10 * V1)
    assert p.costs.step(3) == pytest.approx(V1 * 1.2)
    p.costs.record_verify(3, 1.3 * V1)
    assert p.costs.step(3) == pytest.approx(1.3 * V1)  # two timings: the smaller stands, as without a profile
    p.costs.record_draft(5 * V1)
    assert p.costs.draft_step() == pytest.approx(0.2 * V1, rel=0.2)


def test_a_few_tokens_behind_cost_no_catch_up_round():
    from dspark_cli.engine.costs import FOLD_CATCHUP

    profile = CostProfile()
    profile.absorb(measured_planner())
    p = Planner(8, has_model=True, has_free=False, profile=profile)
    near = p._options({}, FOLD_CATCHUP)[0]
    far = p._options({}, FOLD_CATCHUP + 1)[0]
    # Up to FOLD_CATCHUP tokens go through the draft model in its first draft step's batch, as measured in D.
    assert near.rate == pytest.approx(p._options({}, 0)[0].rate)
    assert far.rate < near.rate


def test_a_folder_that_cannot_hold_profiles_is_said_once_at_load(tiny_paths, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "DSPARK_PROFILES": str(blocker / "profiles")}
    r = _run_cli(*_tiny(tiny_paths), PROMPT, "-n", "16", env=env)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "cost profile" in ln]
    assert len(lines) == 1 and "cannot keep cost profiles" in lines[0], r.stderr
    assert r.stderr.index(lines[0]) < r.stderr.index("tokens,")  # before the answer, not in the middle of it
