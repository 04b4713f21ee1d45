"""`dspark bench` end to end: the real console script on the real demo pair (kept short: two prompts, 16
tokens, one repeat; CI has two cores), and bad input rejected before any model loads. No timing asserts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

PROMPTS = [
    {"question_id": "sea", "category": "chat", "turns": ["Write a haiku about the sea."]},
    {"question_id": "paris", "category": "qa", "turns": ["The capital of France is Paris. What is the capital of France?"]},
]


def dspark(*args, env_extra=None, timeout=900):
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "160"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return f


# --------------------------------------------------------------------------- bad input, before loading


def _rejected_early(proc, code, *needles):
    assert proc.returncode == code, proc.stderr
    assert "loading target" not in proc.stderr  # nothing was loaded
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("dspark: error:")]) == 1


def test_missing_prompts_file(tmp_path):
    _rejected_early(dspark("bench", "--prompts", str(tmp_path / "nope.jsonl")), 5, "not found", "nope.jsonl")


def test_empty_prompts_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("", encoding="utf-8")
    _rejected_early(dspark("bench", "--prompts", str(f)), 5, "empty")


def test_malformed_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(PROMPTS[0]) + "\n" + '{"turns": "not a list"}\n', encoding="utf-8")
    _rejected_early(dspark("bench", "--prompts", str(f)), 5, "line 2")


@pytest.mark.parametrize("value", ["0", "2,0,4", "4,x"])
def test_bad_draft_length(value):
    _rejected_early(dspark("bench", "--draft-max", value), 2, "--draft-max")


def test_unwritable_output_paths(tmp_path):
    _rejected_early(dspark("bench", "--json", str(tmp_path / "no" / "such" / "dir.json")), 2, "--json", "does not exist")
    _rejected_early(dspark("bench", "--csv", str(tmp_path)), 2, "--csv", "directory")


def test_draft_method_needs_a_draft_model():
    _rejected_early(dspark("bench", "--draft", "lookup", "--methods", "draft"), 2, "--methods draft")
    _rejected_early(dspark("bench", "--methods", "medusa"), 2, "unknown method")


# ------------------------------------------------------------------------------------ on the demo pair


def test_bench_on_the_demo_pair(demo_paths, prompts_file, tmp_path):
    out_json, out_csv = tmp_path / "bench.json", tmp_path / "bench.csv"
    # Fixed draft lengths for both commands: the cost model decides by timing, so its acceptance figures differ
    # run to run (its tokens do not), and this test compares bench's figures with run's.
    proc = dspark("bench", "--prompts", str(prompts_file), "--max-tokens", "16", "--repeats", "1", "--draft-fixed",
                  "--json", str(out_json), "--csv", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out_json.read_text(encoding="utf-8"))

    for key in ("speedup", "baseline_tokens_per_second", "speculative_tokens_per_second", "acceptance_rate",
                "mean_accepted_tokens", "predicted_speedup", "cost_ratio", "verify_cost", "alpha"):
        assert isinstance(rep[key], (int, float)) and rep[key] > 0, key
    assert 0 < rep["acceptance_rate"] <= 1
    assert rep["mean_accepted_tokens"] >= 1.0  # the bonus token alone makes 1.00
    assert rep["identical"] is True and rep["mismatches"] == []
    assert rep["best"]["variant"] == "hybrid@8"
    assert [(r["prompt_id"], r["category"]) for r in rep["per_prompt"]] == [("sea", "chat"), ("paris", "qa")]
    assert all(r["identical"] is True and r["acceptance_by_position"] for r in rep["per_prompt"])
    assert {r["category"] for r in rep["per_category"]} == {"chat", "qa"}
    setup = rep["setup"]
    assert setup["target"]["quantization"] == "F32" and setup["draft"]["quantization"] == "Q4_1"
    assert setup["exact"] == "proven (batches <= 16)" and setup["exactness"]["bound"] == 16  # the proof at load
    assert setup["ctx_size"] == 4096 and "cpu" in setup["machine"]
    # Interleaved runs: the target alone and hybrid@8 alternate, one each per prompt after the warm-up.
    assert [(r["prompt_id"], r["variant"]) for r in rep["runs"]] == [
        ("sea", "target"), ("sea", "hybrid@8"), ("paris", "target"), ("paris", "hybrid@8")]
    assert all(r["engine"] == "sequential" for r in rep["runs"])

    with out_csv.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt_id"] for r in rows] == ["sea", "paris"] and rows[0]["category"] == "chat"

    # The table on stdout, the identity verdict, and the chart.
    assert "hybrid@8 vs the target alone" in proc.stdout
    assert "identical" in proc.stdout and "Speedup by category" in proc.stdout

    # The same prompt through `dspark run` gives the same tokens, acceptance and tokens per step.
    run = dspark("run", "--temp", "0", "--json", "--max-tokens", "16", "--draft-fixed", PROMPTS[0]["turns"][0])
    assert run.returncode == 0, run.stderr
    one = json.loads(run.stdout)
    row = rep["per_prompt"][0]
    assert one["text"] == rep["baseline_texts"]["sea"]
    assert one["n_tokens"] == row["tokens"]
    assert one["acceptance_rate"] == pytest.approx(row["acceptance_rate"], abs=1e-3)
    assert one["tokens_per_step"] == pytest.approx(row["mean_accepted_tokens"], abs=1e-3)


# The real command, with one token of the first speculative output changed before the identity check (the
# corruption lives here, in the test, not in the shipped runner).
CORRUPTING = """
import sys
from dspark_cli import cli
from dspark_cli.bench import runner, stats
done = []
def corrupt_then_check(records):
    for r in records:
        if not done and r.variant != stats.BASELINE:
            r.tokens = [r.tokens[0] + 1] + r.tokens[1:] if r.tokens else [0]
            done.append(1)
    return stats.check_identity(records)
runner.check_identity = corrupt_then_check
sys.argv = ["dspark"] + sys.argv[1:]
cli.main()
"""


def test_a_mismatched_output_is_reported(demo_paths, prompts_file, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("Name three colours.\n", encoding="utf-8")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-c", CORRUPTING, "bench", "--prompts", str(one), "--max-tokens", "8",
                           "--repeats", "1", "--no-warmup", "--methods", "draft,lookup", "--draft-max", "2,4",
                           "--json", "-"], capture_output=True, text=True, env=env, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)  # stdout holds nothing but the JSON; the table went to stderr
    assert rep["identical"] is False
    assert len(rep["mismatches"]) == 1
    m = rep["mismatches"][0]
    assert (m["prompt_id"], m["variant"], m["position"]) == ("line-1", "draft@2", 0)
    assert m["near_tie"] is False and rep["identical_up_to_near_ties"] is False  # a changed clear choice
    assert "NOT IDENTICAL" in proc.stderr and "not lossless" in proc.stderr
    # The sweep: four variants, one marked best.
    assert [v["variant"] for v in rep["variants"]] == ["draft@2", "draft@4", "lookup@2", "lookup@4"]
    assert rep["best"]["variant"] in {v["variant"] for v in rep["variants"]}
    assert "Speedup by method and draft length" in proc.stderr and "★" in proc.stderr


def test_calibrate_starts_the_cost_profile_afresh_from_a_sweep(tmp_path, tiny_paths):
    # Any pair calibrates alike: the tiny synthetic one loads and steps in milliseconds.
    profiles = tmp_path / "profiles"
    text = "Summarize in one sentence: " + "The lighthouse was built on a reef that the sea covers at high tide. " * 4
    f = tmp_path / "long.txt"
    f.write_text(text + "\n", encoding="utf-8")
    for calibrate in (False, True):
        r = dspark("bench", "-m", str(tiny_paths[0]), "-d", str(tiny_paths[1]), "--prompts", str(f), "-r", "1",
                   "--no-warmup", "-n", "8", "--draft-max", "4",
                   *(["--calibrate"] if calibrate else []), env_extra={"DSPARK_PROFILES": str(profiles)})
        assert r.returncode == 0, r.stderr
        (path,) = profiles.glob("*.json")
        data = json.loads(path.read_text())
        if not calibrate:  # a mark in the old profile: a 9-second step no run here measures
            data["figures"]["v1"] = [9.0]
            path.write_text(json.dumps(data))
    assert "calibrating: timing target steps of 1 to 5 tokens" in r.stderr
    assert 9.0 not in data["figures"]["v1"]  # afresh: nothing of the old profile is left
    assert 2 <= data["runs"] <= 3  # the sweep, the target alone's run, and the hybrid's if it learned anything
    assert {f"verify.{n}" for n in range(2, 6)} <= set(data["figures"]) and "draft" in data["figures"]


def test_suite_and_memory_flags_are_checked_before_loading(prompts_file):
    _rejected_early(dspark("bench", "--suite", "nope"), 2, "unknown suite")
    _rejected_early(dspark("bench", "--suite", "repetitive", "--prompts", str(prompts_file)), 2, "--suite and --prompts")
    _rejected_early(dspark("bench", "--methods", "hybrid+memory", "--draft-memory", "0"), 2, "memory is off")
    _rejected_early(dspark("bench", "--draft-memory", "-1"), 2, "--draft-memory")


def test_a_control_runs_the_target_alone_again_and_shows_the_noise(prompts_file):
    """--methods lookup,control: the target alone a second time, in the rotation like any variant, checked
    identical to the first (the target is deterministic), never the best, its spread over the rounds shown per
    prompt beside the speculative one's; and no sweep confirmation (one contender)."""
    proc = dspark("bench", "--prompts", str(prompts_file), "--draft", "lookup", "--methods", "lookup,control",
                  "--draft-max", "4", "--max-tokens", "8", "--repeats", "2", "--no-warmup", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["identical"] is True and report["best"]["variant"] == "lookup@4"
    assert report["confirmed"] is None
    control = next(v for v in report["variants"] if v["variant"] == "control")
    assert [len(r["speedup_rounds"]) for r in control["per_prompt"]] == [2, 2]
    assert control["accepted_by"] == {} and control["overall"]["acceptance_rate"] == 0.0  # nothing drafted
    # Round 0 runs target, lookup, control; round 1 starts one later.
    assert [r["variant"] for r in report["runs"] if r["prompt_id"] == "sea"] == [
        "target", "lookup@4", "control", "lookup@4", "control", "target"]
    table = dspark("bench", "--prompts", str(prompts_file), "--draft", "lookup", "--methods", "control,lookup",
                   "--draft-max", "4", "--max-tokens", "4", "--repeats", "1", "--no-warmup")
    assert table.returncode == 0, table.stderr
    assert "noise" in table.stdout and "lookup@4 vs the target alone" in table.stdout
    bad = dspark("bench", "--prompts", str(prompts_file), "--methods", "control+memory")
    assert bad.returncode == 2 and "unknown method 'control+memory'" in bad.stderr


def test_repetitive_suite_drafts_from_the_memory_and_says_so():
    # Each repeat empties the memory: the first record has nothing to recall, the later ones their predecessors.
    proc = dspark("bench", "--suite", "repetitive", "--draft", "lookup", "--methods", "lookup+memory",
                  "--draft-fixed", "--draft-max", "4", "--repeats", "1", "--no-warmup", "--max-tokens", "20",
                  "--json", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["identical"] is True
    runs = {r["prompt_id"]: r for r in report["runs"] if r["variant"] == "lookup+memory@4"}
    assert len(runs) == 10 and "memory" not in runs["record-1"]["accepted_by"]
    assert sum(r["accepted_by"].get("memory", 0) for r in runs.values()) > 0, runs
    assert "memory" in report["variants"][0]["accepted_by"]
    assert "accepted tokens by source" in proc.stderr
