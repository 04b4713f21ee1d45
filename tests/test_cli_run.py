"""`dspark run` through the real console script: streams, JSON, stdin, and every bad input ending in one
line on stderr and a non-zero exit, never a traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

DSPARK = [shutil.which("dspark")] if shutil.which("dspark") else [sys.executable, "-m", "dspark_cli"]
ENV = {**os.environ, "NO_COLOR": "1"}


def dspark(*args, input=None, timeout=300):
    return subprocess.run(
        DSPARK + list(args), input=input if input is not None else b"", stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=timeout, env=ENV,
    )


def one_error_line(r, code, *fragments):
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dspark: error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], err
    assert r.stdout == b""


def test_stream_to_stdout_summary_to_stderr_and_identical_to_target_alone(demo_paths):
    spec = dspark("run", "Name three colours.", "-n", "24", "--temp", "0")
    alone = dspark("run", "Name three colours.", "-n", "24", "--temp", "0", "--draft", "none")
    assert spec.returncode == 0 and alone.returncode == 0, spec.stderr
    assert spec.stdout == alone.stdout and spec.stdout.strip()
    err = spec.stderr.decode()
    assert "tok/s" in err and "acceptance" in err and "tokens/step" in err
    assert "tok/s" not in spec.stdout.decode()
    assert "target alone" in alone.stderr.decode()


def test_json_output(demo_paths):
    r = dspark("run", "Name three colours.", "-n", "24", "--temp", "0", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)  # stdout is exactly one JSON object
    for key in ("text", "n_tokens", "tokens_per_second", "drafted", "accepted", "acceptance_rate",
                "tokens_per_step", "finish_reason", "acceptance_by_position", "seed"):
        assert key in rec, key
    assert rec["n_tokens"] == 24 and rec["finish_reason"] == "length"
    assert rec["text"] and 0 <= rec["acceptance_rate"] <= 1 and rec["tokens_per_step"] > 1


def test_piped_stdin_is_appended_to_the_argument(tiny_paths):
    # The tiny synthetic pair: any vocabulary counts the prompt (this one a token per byte or so, so that even a
    # lost or added character shows).
    from dspark_cli.llama.model import Model

    pair = ["-m", str(tiny_paths[0]), "-d", str(tiny_paths[1])]
    vocab = Model(tiny_paths[0], vocab_only=True)
    # the text's tokens, and the BOS this vocabulary asks for (the demo's asks for none)
    expected = len(vocab.tokenize("Summarize:\n\nThe cat sat on the mat.", add_special=False)) + int(vocab.add_bos)
    r = dspark("run", *pair, "Summarize:", "--raw", "--json", "-n", "1", input=b"The cat sat on the mat.\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_prompt_tokens"] == expected
    dash = dspark("run", *pair, "-", "--raw", "--json", "-n", "1", input=b"Summarize:\n\nThe cat sat on the mat.")
    assert json.loads(dash.stdout)["n_prompt_tokens"] == expected
    vocab.close()


def test_sampled_run_with_seed_is_reproducible(demo_paths):
    a = dspark("run", "Tell me a joke.", "-n", "20", "--temp", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7", "--json")
    b = dspark("run", "Tell me a joke.", "-n", "20", "--temp", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7", "--json")
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, demo_paths):
    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.gguf"
    text.write_text("this is not a model\n")
    truncated = d / "truncated.gguf"
    with open(demo_paths[1], "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    return {"text": text, "truncated": truncated, "dir": d}


def test_bad_model_files(bad_files, tiny_paths, demo_paths):
    one_error_line(dspark("run", "hi", "-m", "/nonexistent/model.gguf"), 3, "no such model file", "/nonexistent/model.gguf")
    one_error_line(dspark("run", "hi", "-m", str(bad_files["text"])), 3, "not a GGUF")
    one_error_line(dspark("run", "hi", "-m", str(bad_files["dir"])), 3, "directory")
    one_error_line(dspark("run", "hi", "-m", str(bad_files["truncated"]), "--draft", "none"), 3, "truncated")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--temp", "-0.5"], "--temp"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
        (["--draft-max", "0"], "--draft-max"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--ctx-size", "4"], "--ctx-size"),
        (["--draft-p-min", "1.5"], "--draft-p-min"),
        (["--raw", "--system", "be brief"], "--system"),
    ],
)
def test_impossible_flags(args, fragment):
    one_error_line(dspark("run", "hi", *args), 2, fragment)


def test_empty_prompts():
    one_error_line(dspark("run", "   "), 5, "empty")
    one_error_line(dspark("run", input=b""), 5, "empty", "stdin")
    one_error_line(dspark("run", "-", input=b"\n\n"), 5, "empty")


def test_prompt_longer_than_the_context(tiny_paths):
    # "word " is a token or two on any vocabulary (five bytes on the tiny pair's): 400 of them overfill 128 (256).
    pair = ["-m", str(tiny_paths[0]), "-d", str(tiny_paths[1])]
    one_error_line(dspark("run", *pair, "word " * 400, "--ctx-size", "128"), 5, "context holds")


# An answer that never ends by itself: the demo pair counts on past 1000 (greedy, so always the same text),
# about one byte per token, through --max-tokens close to the context.
ENDLESS = ["Write the numbers from 1 to 1000, separated by commas.", "-c", "8192", "-n", "8000"]


def _small_pipe() -> tuple[int, int]:
    """A pipe that holds 4 KiB (Linux): a writer that fills it waits until the reader reads."""
    import fcntl

    r, w = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    return r, w


def test_ctrl_c_mid_answer_keeps_the_text_and_exits_130(demo_paths):
    # The Ctrl-C must land mid-answer however fast or slow the machine is: the answer is far longer than the
    # pipe, which the test stops reading once the answer streams, so dspark is still generating (or waiting to
    # write) when the signal comes, never done. And dspark gets SIGINT as a terminal's foreground job has it: a
    # test run in the background of a script has it ignored, which its children would inherit.
    import threading

    r, w = _small_pipe()
    p = subprocess.Popen(DSPARK + ["run", "--temp", "0", *ENDLESS], stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE,
                         env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(w)
    watchdog = threading.Timer(180, p.kill)  # a bound, should the signal be lost: the test then fails, not hangs
    watchdog.start()
    try:
        with os.fdopen(r, "rb") as out:
            got = out.read(40)  # the answer is streaming
            p.send_signal(signal.SIGINT)
            rest = out.read()
        err = p.stderr.read().decode()
        p.wait(timeout=60)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()
    assert p.returncode == 130, err
    assert len(got) == 40 and got.startswith(b"1, 2, 3")
    assert len(got + rest) < 8000  # stopped mid-answer, not at --max-tokens
    assert "interrupted after" in err and "Traceback" not in err and "Exception ignored" not in err


def test_closed_pipe_exits_quietly(demo_paths):
    p = subprocess.Popen(DSPARK + ["run", "--temp", "0", "Write a long essay about the history of bridges.", "-n", "2000"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    p.stdout.read(20)
    p.stdout.close()  # what `| head -c 20` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0
    assert "Traceback" not in err and "error" not in err.lower()
