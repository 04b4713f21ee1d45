"""`dspark chat` driven like a person would: the real console script in a pseudo-terminal (pexpect), on the
demo pair, plus one piped run. Assertions are on behaviour (the summary lines' token counts, the
transcript), never on timings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dspark_cli.llama.kernels import EXACT_BATCH_MAX

pexpect = pytest.importorskip("pexpect")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SUMMARY = re.compile(r"(\d+) tokens · ([\d.]+) tok/s · acceptance (\d+)% · ([\d.]+) tokens/step · "
                     r"prompt (\d+) new of (\d+) tokens in ([\d.]+)s")
PROMPT = ">>> "


def _env(tmp_path, **extra):
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm", "XDG_STATE_HOME": str(tmp_path / "state"), **extra}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def _spawn(tmp_path, *args, width=120, env=None):
    # One thread: two cores are shared, and llama.cpp's threads spin badly when they are oversubscribed.
    child = pexpect.spawn(sys.executable, ["-m", "dspark_cli", "chat", "-t", "1", "--temp", "0", *args], env=env or _env(tmp_path),
                          dimensions=(40, width), encoding="utf-8", timeout=90)
    child.expect_exact(PROMPT)
    return child


def _say(child, text) -> str:
    """Send one line, wait for the next prompt, return what was printed in between, escapes removed."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    return ANSI.sub("", child.before).replace("\r", "")


def _summary(out: str) -> dict:
    m = SUMMARY.findall(out)
    assert m, out
    n, tps, acc, tps_step, evaluated, n_prompt, t_prompt = m[-1]
    return {"n": int(n), "tok_s": float(tps), "evaluated": int(evaluated), "n_prompt": int(n_prompt), "t_prompt": float(t_prompt)}


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_turns_reuse_the_cache_and_land_in_the_transcript(tmp_path):
    transcript = tmp_path / "t.jsonl"
    child = _spawn(tmp_path, "-n", "24", "--transcript", str(transcript))
    out1 = _say(child, "What is the capital of France?")
    assert "Paris" in out1
    s1 = _summary(out1)
    assert s1["tok_s"] > 0 and s1["evaluated"] == s1["n_prompt"]  # the first turn processes everything

    out2 = _say(child, "And of Germany?")
    s2 = _summary(out2)
    # Turn 2 processes only its own tokens: its prompt minus turn 1's prompt and answer (plus the last
    # answer token when that one was sampled by the target and so never evaluated), or a fast batch's
    # EXACT_BATCH_MAX + 1 when fewer: while the user typed, the chat re-processed turn 1's answer as a fresh run
    # of this prompt would (Pair.settle).
    new = s2["n_prompt"] - (s1["n_prompt"] + s1["n"])
    assert s2["evaluated"] - max(new, EXACT_BATCH_MAX + 1) in (0, 1)
    assert s2["evaluated"] < 20 < s2["n_prompt"]

    stats = _say(child, "/stats")
    m = re.search(r"target processed (\d+), draft processed (\d+)", stats)
    assert m and int(m.group(1)) == s1["evaluated"] + s2["evaluated"]
    # The draft reuses its cache as well: beyond what the target processed, at most the answer tokens it sat
    # out (rounds the cost model ran without it), never the conversation again.
    assert int(m.group(2)) <= int(m.group(1)) + s1["n"] + 2 < s1["n_prompt"] + s2["n_prompt"]
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    recs = _records(transcript)
    assert [(r["role"], r.get("finish_reason")) for r in recs] == [("user", None), ("assistant", "stop")] * 2
    assert recs[0]["content"] == "What is the capital of France?" and "Paris" in recs[1]["content"]
    assert recs[2]["content"] == "And of Germany?"
    assert recs[3]["stats"]["prompt_evaluated"] == s2["evaluated"]
    # readline history survives the session
    assert "And of Germany?" in (tmp_path / "state" / "dspark" / "chat_history").read_text()
    (tmp_path / "turns.txt").write_text(f"turn1 {s1}\nturn2 {s2}\n")  # the numbers, for the record


def test_ctrl_c_stops_the_answer_then_chat_goes_on(tmp_path):
    import signal

    transcript = tmp_path / "t.jsonl"
    # Ctrl-C as a terminal's foreground job gets it: a test run in the background of a script has SIGINT
    # ignored, which the chat would inherit (and then ignore Ctrl-C at its prompt); a handler here, any, is
    # the default again in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        child = _spawn(tmp_path, "-n", "1000", "--transcript", str(transcript))
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        _interrupt_then_go_on(child, transcript)
    finally:
        child.close(force=True)  # whatever happened above: the chat does not outlive the test


def _interrupt_then_go_on(child, transcript):
    # An answer that does not end by itself (greedy, the demo pair counts on past 1000, a token per byte or so):
    # 1000 tokens take seconds even on a fast machine, against the milliseconds between the status line and the
    # Ctrl-C below, loaded machine or not. (Not more: each turn reserves room for --max-tokens in the context, and
    # the long message below must still fit.)
    child.sendline("Write the numbers from 1 to 1000, separated by commas.")
    # The live status line (tok/s, then the tokens so far and the seconds), which only shows while tokens
    # stream; not the summary line after the answer, which also says tok/s.
    child.expect(r"tok/s · [^\r\n]*\d+ tokens · [\d.]+s")
    child.sendintr()
    child.expect_exact(PROMPT)
    out = ANSI.sub("", child.before)
    assert "interrupted" in out
    printed = _summary(out)["n"]
    assert 0 < printed < 1000

    child.sendline("What is the capital of \\")  # a trailing backslash continues the message
    child.expect_exact("... ")
    out = _say(child, "France?")
    assert "Paris" in out and "interrupted" not in out

    # A long message: one Ctrl-C stops its prompt processing (between llama.cpp batches); the caches must
    # come out of that consistent for the next answer.
    child.sendline("Summarize this: " + "the cat sat on the mat and looked at the dog. " * 180)
    child.expect_exact("processing")
    child.sendintr()
    child.expect_exact(PROMPT)
    assert "interrupted" in ANSI.sub("", child.before)
    assert "new conversation" in _say(child, "/reset")
    # Same words as a fresh chat gives (first test): the caches came through the interruption intact.
    assert "The capital of France is Paris." in _say(child, "What is the capital of France?")
    # Ctrl-C at the prompt: the first only warns, the second leaves.
    child.sendintr()
    child.expect("Ctrl-C again")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    recs = _records(transcript)
    story = recs[1]
    assert story["role"] == "assistant" and story["finish_reason"] == "interrupted"
    assert story["content"].strip() and story["stats"]["tokens"] == printed
    assert recs[2] == {**recs[2], "role": "user", "content": "What is the capital of \nFrance?"}
    assert recs[3]["finish_reason"] == "stop" and "Paris" in recs[3]["content"]
    assert recs[5] == {**recs[5], "role": "assistant", "finish_reason": "interrupted"}
    assert recs[6] == {"event": "reset"}
    assert recs[8]["finish_reason"] == "stop" and "Paris" in recs[8]["content"]


def test_context_overflow_drops_old_turns_on_a_narrow_terminal(tmp_path):
    transcript, saved = tmp_path / "t.jsonl", tmp_path / "saved.jsonl"
    child = _spawn(tmp_path, "-n", "48", "-c", "256", "--highlight", "--transcript", str(transcript),
                   "--system", "You are a travel guide.", width=50)
    dropped_at = None
    for i, city in enumerate(["Paris", "Berlin", "Rome", "Madrid", "Lisbon"]):
        child.sendline(f"Tell me about {city}.")
        child.expect_exact(PROMPT)
        raw = child.before
        out = ANSI.sub("", raw).replace("\r", "")
        assert "tok/s" in out
        # Narrow: every line fits 50 columns; NO_COLOR: no colour codes, the draft's tokens underlined.
        assert all(len(line) <= 50 for line in re.split(r"[\r\n]", ANSI.sub("", raw))), raw
        assert not re.search(r"\x1b\[(3\d|9\d|38;)", raw) and "\x1b[4m" in raw
        if "dropped" in out:
            dropped_at = i
            assert "context full" in out and "system prompt stays" in " ".join(out.split())
            break
    assert dropped_at is not None and dropped_at >= 2
    out = _say(child, "/stats")
    assert "turns dropped" in out
    # An answer after the drop streams as usual and processes only its own tokens again.
    child.sendline("Thanks!")
    child.expect_exact(PROMPT)
    m = re.search(r"prompt (\d+)/(\d+)", ANSI.sub("", child.before))
    assert m and int(m.group(1)) < 30 < int(m.group(2)) <= 256
    assert "saved" in _say(child, f"/save {saved}")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    # Nothing lost: both files hold every turn, the dropped ones included, after the system prompt.
    for path in (transcript, saved):
        recs = _records(path)
        assert recs[0] == {**recs[0], "role": "system", "content": "You are a travel guide."}
        users = [r["content"] for r in recs if r.get("role") == "user"]
        assert users[0] == "Tell me about Paris." and users[-1] == "Thanks!" and len(users) == dropped_at + 2


def test_piped_stdin_prints_only_the_answers(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dspark_cli", "chat", "-t", "1", "--temp", "0", "-n", "24"],
        input="What is the capital of France?\n\nAnd of Germany?\n/stats\n",
        capture_output=True, text=True, env=_env(tmp_path), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["The capital of France is Paris.", "The capital of Germany is Berlin."]
    lines = [line for line in proc.stderr.splitlines() if "tok/s" in line and "prompt" in line and "new of" in line]
    assert len(lines) == 2
    s1, s2 = (_summary(line) for line in lines)
    new = s2["n_prompt"] - (s1["n_prompt"] + s1["n"])  # (settled between the turns: see the test above)
    assert s2["evaluated"] - max(new, EXACT_BATCH_MAX + 1) in (0, 1)
    assert "target processed" in proc.stderr  # /stats went to stderr, not into the answers


def _colour_env(tmp_path, **extra):
    env = _env(tmp_path, **extra)
    if "NO_COLOR" not in extra:
        env.pop("NO_COLOR")  # the live line is off with NO_COLOR
    return env


def test_run_in_a_terminal_shows_a_live_status_line(tmp_path):
    """`dspark run` with a terminal: tok/s, acceptance and tokens per step are redrawn under the streaming
    text, then replaced by the summary line; the answer itself is printed whole."""
    # The live line is drawn at the first token and then at most every REFRESH_S: 16 tokens show it.
    child = pexpect.spawn(sys.executable, ["-m", "dspark_cli", "run", "-t", "1", "--temp", "0", "-n", "16",
                                           "Write a short story about a robot learning to paint."],
                          env=_colour_env(tmp_path), dimensions=(40, 120), encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    out = ANSI.sub("", child.before).replace("\r", "")
    assert "tok/s · acceptance" in out  # the live line (its long form), redrawn while the answer streamed
    assert re.search(r"16 tokens, [\d.]+ tok/s, acceptance", out)  # the summary replaced it


def test_run_piped_with_stderr_on_a_terminal_keeps_stdout_clean(tmp_path):
    answer = tmp_path / "answer.txt"
    cmd = f"{sys.executable} -m dspark_cli run -t 1 -n 16 'Write a short story about a robot.' > {answer}"
    child = pexpect.spawn("bash", ["-c", cmd], env=_colour_env(tmp_path), dimensions=(40, 120), encoding="utf-8",
                          timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    screen = ANSI.sub("", child.before)
    assert "tok/s" in screen  # the status and summary lines, on the terminal (stderr)
    text = answer.read_text()
    assert text.strip() and "tok/s" not in text and "\x1b" not in text  # stdout: the answer only


def test_run_with_no_color_or_json_shows_no_live_line(tmp_path, tiny_paths):
    # Any pair will do (the tiny synthetic one loads in milliseconds): a live line would show from the start, as
    # "processing the prompt", whatever the model.
    pair = ["-m", str(tiny_paths[0]), "-d", str(tiny_paths[1])]
    for extra, env in ((["--json"], {}), ([], {"NO_COLOR": "1"}), ([], {"TERM": "dumb"})):
        child = pexpect.spawn(sys.executable, ["-m", "dspark_cli", "run", *pair, "-t", "1", "--temp", "0", "-n", "16",
                                               *extra, "Hello"],
                              env=_colour_env(tmp_path, **env), dimensions=(40, 120), encoding="utf-8", timeout=120)
        child.expect(pexpect.EOF)
        child.close()
        out = child.before
        assert child.exitstatus == 0
        assert "processing the prompt" not in out and "\x1b[2K" not in out  # no line was redrawn
