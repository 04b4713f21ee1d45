"""scripts/spec_ceiling.py on the tiny synthetic pair: it measures real steps with real llama.cpp, and the
ceilings it prints are the bench_stats formulas applied to the costs it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli.bench.stats import overlapped_ceiling, sequential_ceiling

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "spec_ceiling.py"


def run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_ceilings_follow_from_the_measured_costs(tiny_paths):
    target, draft = tiny_paths
    r = run("--target", str(target), "--draft", str(draft), "--threads", "2", "--reps", "1", "--draft-max", "2",
            "--seconds", "0.2", "--alpha", "0.5,0.9", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["threads"] == 2 and out["split"] == [1, 1]
    sec = out["seconds"]
    for key in ("step", "draft_all", "verify_all_1", "verify_all_2", "verify_split_2", "draft_split_2"):
        assert sec[key] > 0
    assert [row["alpha"] for row in out["ceilings"]] == [0.5, 0.9]
    for row in out["ceilings"]:
        a = row["alpha"]
        for k in (1, 2):
            assert row["sequential"][str(k)] == pytest.approx(
                sequential_ceiling(a, k, sec["step"], sec["draft_all"], sec[f"verify_all_{k}"]))
            assert row["overlapped"][str(k)] == pytest.approx(
                overlapped_ceiling(a, k, sec["step"], sec[f"draft_split_{k}"], sec[f"verify_split_{k}"]))
    # More acceptance can only raise a ceiling.
    lo, hi = out["ceilings"]
    assert all(hi["sequential"][k] > lo["sequential"][k] for k in ("1", "2"))


def test_report_and_bad_flags(tiny_paths):
    target, draft = tiny_paths
    r = run("--target", str(target), "--draft", str(draft), "--threads", "2", "--reps", "1", "--draft-max", "1",
            "--seconds", "0.1", "--alpha", "0.9")
    assert r.returncode == 0, r.stderr
    assert "ceiling over the target alone" in r.stdout and "alpha 0.90: sequential" in r.stdout
    assert "round 1 of 1" in r.stderr and "round" not in r.stdout
    bad = run("--target", str(target), "--draft", str(draft), "--alpha", "1.5")
    assert bad.returncode == 2 and "--alpha values must be in [0, 1)" in bad.stderr
    half = run("--target", str(target))
    assert half.returncode == 2 and "give both --target and --draft" in half.stderr
    missing = run("--target", str(target.parent / "none.gguf"), "--draft", str(draft))
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("spec_ceiling: error: target file not found")
