"""The public API (`import dspark_cli`), on the demo pair: the README's example runs as written, prompts as
strings or messages, KV caches reused by a growing conversation, and errors as DsparkError subclasses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import dspark_cli as dspark

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs_as_written(demo_paths, tmp_path):
    section = README.read_text().split("### From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 2 and lines[0].strip()  # the streamed answer, then the complete() line
    text, finish, tps, acc = lines[-1].rsplit(" ", 3)
    assert finish in ("stop", "length") and float(tps) > 0 and 0.0 <= float(acc) <= 1.0


@pytest.fixture(scope="module")
def pair(demo_paths):
    with dspark.load(quiet=True) as p:
        yield p


def test_strings_messages_and_raw(pair):
    a = pair.complete("Name three colours.", max_tokens=12)
    b = pair.complete([{"role": "user", "content": "Name three colours."}], max_tokens=12)
    assert a.text == b.text and a.tokens == b.tokens and a.finish_reason == "length"
    raw = pair.complete("The capital of France is", raw=True, max_tokens=4)
    assert raw.text.strip() and raw.stats.n_prompt < a.stats.n_prompt  # no template around it
    assert "Answer in French." in pair.prompt_text("Name three colours.", system="Answer in French.")
    sys_ = pair.complete("Name three colours.", system="Answer in French.", max_tokens=12)
    assert sys_.stats.n_prompt != a.stats.n_prompt


def test_a_growing_conversation_reuses_the_caches(pair):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = pair.complete(messages, max_tokens=16)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Germany?"}]
    second = pair.complete(messages, max_tokens=16)
    # The previous prompt stays in the target's cache; the previous answer's tokens are processed again, as a
    # fresh run of this prompt processes them (their keys came from verify batches: Model.prompt_plan). The
    # draft model, whose numerics never reach the output, keeps the prompt and whatever of the answer it read
    # (all of it when it drafted every step; none when the planner drafted by lookup), so it processes at most
    # what the target does.
    assert second.stats.n_prompt_evaluated <= len(first.tokens) + 20 < second.stats.n_prompt
    assert second.stats.n_prompt_evaluated_draft <= second.stats.n_prompt_evaluated
    pair.settle()  # the previous answer re-processed as a prompt batch ahead of time (what a chat does while idle)
    messages += [{"role": "assistant", "content": second.text}, {"role": "user", "content": "And of Italy?"}]
    third = pair.complete(messages, max_tokens=16)
    assert third.stats.n_prompt_evaluated < 20 < third.stats.n_prompt  # only the new turn
    unrelated = pair.complete("Write a haiku about the sea.", max_tokens=8)
    assert unrelated.stats.n_prompt_evaluated > 5  # a different prompt starts (nearly) fresh


def test_sampled_completions_follow_the_seed(pair):
    a = pair.complete("Tell me a joke.", temperature=0.9, top_p=0.95, seed=7, max_tokens=16)
    b = pair.complete("Tell me a joke.", temperature=0.9, top_p=0.95, seed=7, max_tokens=16)
    alone = pair.generate_tokens(pair.tokens("Tell me a joke."), max_tokens=16, method="target",
                                 params=dspark.SamplingParams(temperature=0.9, top_p=0.95, min_p=0.05, seed=7))
    assert a.tokens == b.tokens == [e.token for e in alone if e.token is not None]


def test_stop_strings_and_events(pair):
    full = pair.complete("Write a short story about a robot.", max_tokens=24).text
    stop = full[len(full) // 2 : len(full) // 2 + 6]  # a piece of what greedy decoding writes anyway
    events = list(pair.generate("Write a short story about a robot.", stop=[stop], max_tokens=24))
    text = "".join(e.text for e in events)
    assert text == full[: full.index(stop)] and events[-1].finish_reason == "stop"
    assert all(isinstance(e, dspark.Event) for e in events)


@pytest.mark.parametrize("call, error", [
    (lambda p: p.complete([{"role": "robot", "content": "hi"}]), dspark.UsageError),
    (lambda p: p.complete([]), dspark.UsageError),
    (lambda p: p.complete("hi", raw=True, system="be brief"), dspark.UsageError),
    (lambda p: p.complete("hi", temperature=-1), dspark.UsageError),
    (lambda p: p.complete("hi", max_tokens=0), dspark.UsageError),
    (lambda p: p.complete("word " * 5000), dspark.PromptError),
])
def test_bad_calls_are_dspark_errors(pair, call, error):
    with pytest.raises(error) as e:
        call(pair)
    assert isinstance(e.value, dspark.DsparkError) and e.value.message


def test_loading_errors_are_dspark_errors(tmp_path):
    with pytest.raises(dspark.ModelFileError):
        dspark.load(target=str(tmp_path / "missing.gguf"), quiet=True)
    with pytest.raises(dspark.UsageError):
        dspark.load(threads=0, quiet=True)


def test_the_public_surface_is_documented():
    assert set(dspark.__all__) >= {"load", "Pair", "Result", "Event", "DsparkError"}
    doc = dspark.load.__doc__
    for option in ("target", "draft", "pair", "ctx_size", "n_gpu_layers", "threads", "lookup", "pull", "offline",
                   "force", "quiet"):
        assert option in doc, option


def test_closing_the_pair_under_an_abandoned_generation_is_safe(demo_paths):
    """An answer left half-read when the pair closes: its generator trims the caches first, while the models
    exist (this used to abort llama.cpp: `dspark run ... | head` did it). In a subprocess, as an abort would
    take pytest down with it."""
    code = ("import dspark_cli as d\n"
            "p = d.load(quiet=True)\n"
            "g = p.generate('Write a long story about a dragon.', max_tokens=300)\n"
            "next(g); next(g)\n"
            "h = p.generate('And another one.', max_tokens=300)\n"  # a new one ends the abandoned one
            "next(h)\n"
            "p.close()\n"
            "print('closed cleanly')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "closed cleanly" in r.stdout, r.stderr
