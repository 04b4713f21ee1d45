"""scripts/memory_ceiling.py: its oracle (the cheapest rounds that write an answer when it knows which drafts are
right) on costs it is told, and the script end to end on the tiny synthetic pair (real llama.cpp steps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "memory_ceiling.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("memory_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def told(slope: float, draft: float, per_token: float, width: int = 4) -> dict:
    return {"verify": {n: 1.0 + slope * (n - 1) for n in range(1, width + 2)}, "draft": draft, "catchup": per_token}


def test_without_right_drafts_every_token_is_a_target_step(script):
    assert script.cheapest(10, [0] * 10, [0] * 10, told(0.3, 0.4, 0.1), 4) == pytest.approx(10.0)
    assert script.cheapest(10, None, None, told(0.3, 0.4, 0.1), 4) == pytest.approx(10.0)


def test_free_right_drafts_on_a_flat_verify_take_a_round_per_width(script):
    runs = [10 - i for i in range(10)]  # every proposal right to the answer's end
    # 10 tokens in rounds of 4 drafts + the target's own: 2 rounds of 5.
    assert script.cheapest(10, None, runs, told(0.0, 0.4, 0.1), 4) == pytest.approx(2.0)
    # The model's drafts cost its steps: 2 rounds, each 4 draft steps.
    assert script.cheapest(10, runs, None, told(0.0, 0.4, 0.1), 4) == pytest.approx(2.0 + 2 * 4 * 0.4)


def test_the_memory_knows_the_keys_and_the_model_the_values(script):
    # Positions 0-2 a key (the memory right there), 3-4 a value (the model's), 5-7 the next key, 8-9 a value.
    memory = [3, 2, 1, 0, 0, 3, 2, 1, 0, 0]
    model = [0, 0, 0, 2, 1, 0, 0, 0, 2, 1]
    c = told(0.05, 0.2, 0.05, width=8)
    alone = {name: script.cheapest(10, mo, me, c, 8) for name, mo, me in
             (("model", model, None), ("memory", None, memory), ("combined", model, memory))}
    assert alone["combined"] < min(alone["model"], alone["memory"])
    # A key, then the value from the model, then the next key as a tail: 9 drafts exceed the width of 8, so two
    # rounds at least, each a verify of at most 9 tokens.
    assert alone["combined"] >= 2 * 1.0


def test_the_script_reports_ceilings_from_real_steps(tiny_paths):
    target, draft = tiny_paths
    r = subprocess.run([sys.executable, str(SCRIPT), "--target", str(target), "--draft", str(draft), "-n", "8",
                        "--reps", "1", "--draft-max", "3", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ceiling"]["target"] == pytest.approx(1.0)
    assert sorted(out["costs"]["verify"]) == ["1", "2", "3", "4"] and out["costs"]["draft"] > 0
    # The combined drafter can do whatever either does alone.
    assert out["ceiling"]["combined"] >= max(out["ceiling"]["model"], out["ceiling"]["memory"]) - 1e-9
    assert "request 10 of 10" in r.stderr
    half = subprocess.run([sys.executable, str(SCRIPT), "--target", str(target)], capture_output=True, text=True,
                          timeout=120)
    assert half.returncode == 2 and "give both --target and --draft" in half.stderr
    missing = subprocess.run([sys.executable, str(SCRIPT), "--target", str(target.parent / "none.gguf"), "--draft",
                              str(draft)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("memory_ceiling: error: target file not found")
