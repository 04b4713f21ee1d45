"""A newcomer's first answer: `run` samples by default as llama.cpp does (temperature 0.8, top-k 40, top-p 0.95,
min-p 0.05) and prints the seed that repeats it; bench stays greedy; a summary over an answer that mostly repeats
itself says its speed is not a typical one; the install leaves out what dspark never loads."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from dspark_cli.commands.run import repeated_share

DSPARK = [shutil.which("dspark")] if shutil.which("dspark") else [sys.executable, "-m", "dspark_cli"]
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "NO_COLOR": "1"}


def summary(stderr: str) -> str:
    """run's summary line (a note may follow it)."""
    return next(line for line in reversed(stderr.splitlines()) if " tok/s" in line)


def run(*args):
    return subprocess.run(DSPARK + ["run", *args], capture_output=True, text=True, timeout=300, env=ENV)


def test_run_samples_by_default_and_its_printed_seed_repeats_the_answer(demo_paths, tiny_paths):
    first = run("Name three colours.", "-n", "16")
    assert first.returncode == 0, first.stderr
    seed = re.search(r"; seed (\d+)", summary(first.stderr))
    assert seed, first.stderr  # the summary names the seed
    again = run("Name three colours.", "-n", "16", "--seed", seed.group(1), "--json")
    record = json.loads(again.stdout)
    # The answer as printed: its text, and a newline after it unless it ended with one (a seed may draw either).
    assert first.stdout == record["text"] + ("" if record["text"].endswith("\n") else "\n")
    assert (record["temperature"], record["top_k"], record["top_p"], record["min_p"]) == (0.8, 40, 0.95, 0.05)
    # (any pair: the tiny synthetic one loads in milliseconds)
    greedy = run("-m", str(tiny_paths[0]), "-d", str(tiny_paths[1]), "Name three colours.", "-n", "4", "--temp", "0")
    assert "seed" not in summary(greedy.stderr)  # greedy: nothing to repeat


def test_a_greedy_loop_is_not_sold_as_a_typical_speed(demo_paths):
    # The demo's greedy answer to this prompt repeats one clause (the newcomer's first answer before sampling).
    # --draft-fixed: drafting every step whatever the machine's speed (the note is for speculative runs)
    r = run("Explain speculative decoding in one paragraph.", "--temp", "0", "-n", "120", "--draft-fixed")
    assert r.returncode == 0, r.stderr
    assert "not a typical speed; `dspark bench` measures that" in r.stderr


def test_repeated_share():
    loop = "It is a model that can be used to create" + " a model that can be used to create" * 4
    assert repeated_share(loop, "Explain it.") > 0.5
    prose = "The sky looks blue because air scatters short wavelengths of sunlight more than long ones, so blue fills it."
    assert repeated_share(prose, "Why is the sky blue?") < 0.1
    copied = "fix the typo in this sentence please and thank you very much"
    assert repeated_share(copied, "Echo: " + copied) > 0.5  # text copied from the prompt counts too
    assert repeated_share("too short", "") == 0.0


def test_the_install_builds_only_what_dspark_loads():
    args = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--print-cmake-args"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CMAKE_ARGS": ""}).stdout
    assert "-DLLAVA_BUILD=OFF" in args and "-DGGML_RPC=ON" in args
    full = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--print-cmake-args"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CMAKE_ARGS": "", "DSPARK_FULL_BUILD": "1"}).stdout
    assert "LLAVA_BUILD" not in full
