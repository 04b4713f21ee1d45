"""Hostile input through the real console script: each class of failure a user (or a script) can cause ends
in one clear line and a documented exit code, or a quiet exit for a closed pipe, never a traceback or a hang,
and nothing the user asked for is lost. One test per class, so that a new Typer, click or Rich release that
changes their own handling cannot undo it unnoticed."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from child_output import read_first

DSPARK = [sys.executable, "-m", "dspark_cli"]
ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}


def run(*args, input: bytes = b"", close=(), stdout=subprocess.PIPE, fsize: int | None = None, env=None,
        timeout=300) -> subprocess.CompletedProcess:
    """dspark with `args` (str or bytes), descriptors in `close` closed, file writes capped at `fsize` bytes."""

    def child_setup():
        for fd in close:
            os.close(fd)
        if fsize is not None:  # a "full disk" for this process only: writes past fsize fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    stdin = subprocess.PIPE if 0 not in close else None
    stderr = subprocess.PIPE if 2 not in close else None
    env = env or ENV
    if fsize is not None:
        # Nor may it write bytecode: under the cap a .pyc is cut short without an error (one write() call, its
        # count unchecked) and lands in the session's shared PYTHONPYCACHEPREFIX (conftest.py), where the next
        # dspark to import that module reads it as EOFError, which click reports as an interruption (exit 130).
        env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.Popen(DSPARK + list(args), stdin=stdin, stdout=stdout if 1 not in close else None, stderr=stderr,
                         env=env, preexec_fn=child_setup)
    out, err = p.communicate(None if 0 in close else input, timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out or b"", err or b"")


def no_traceback(r) -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return err


def tiny(paths) -> list[str]:
    """-m/-d for the tiny synthetic pair (conftest.tiny_paths): a loadable pair that loads and answers in
    milliseconds, for a test that needs *a* model, not the demo's words (its answers are bytes of no language)."""
    return ["-m", str(paths[0]), "-d", str(paths[1])]


def one_error(r, code: int, *fragments: str) -> str:
    err = no_traceback(r)
    assert r.returncode == code, (r.returncode, err)
    lines = [line for line in err.splitlines() if line.startswith("dspark: error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], err
    return lines[0]


# ------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, fragment", [
    (["run", "--bogus", "hi"], "--bogus"),  # click words it differently across versions
    (["run", "--draft-mx", "3", "hi"], "--draft-max"),  # click's suggestion comes along
    (["run", "--temp", "abc", "hi"], "--temp"),
    (["run", "hi", "-m"], "'-m' requires an argument"),
    (["run", "one", "two"], "unexpected extra argument"),
    (["nope"], "No such command 'nope'"),
    (["pull"], "Missing argument"),
    (["bench", "--draft-max"], "requires an argument"),
    (["chat", "--bogus"], "--bogus"),
    (["models", "--ctx-size", "many"], "--ctx-size"),
    (["doctor", "--json", "extra"], "unexpected extra argument"),
])
def test_usage_errors_of_every_command_are_one_line_and_exit_2(args, fragment):
    r = run(*args)
    one_error(r, 2, fragment)
    assert r.stdout == b""
    assert "loading" not in r.stderr.decode()


def test_dspark_alone_shows_the_help():
    r = run()
    no_traceback(r)
    assert r.returncode == 0 and b"Usage" in r.stdout and b"run" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--temp", "inf"], "finite"),
    (["--temp", "nan"], "finite"),
    (["--top-p", "nan"], "--top-p"),
    (["--draft-p-min", "nan"], "--draft-p-min"),
])
def test_non_finite_numbers(args, fragment):
    one_error(run("run", "hi", *args), 2, fragment)


# ------------------------------------------------------------------------------- closed and full streams


def test_closed_stdout_is_refused_before_any_work(tiny_paths):
    for args in (["run", "-m", str(tiny_paths[0]), "-d", "none", "hi"], ["models", "--json"], ["doctor", "--json"]):
        r = run(*args, close=(1,))
        line = one_error(r, 8, "standard output is closed")
        assert "loading" not in r.stderr.decode(), line


def test_closed_stderr_still_answers_on_stdout(tiny_paths):
    args = ["run", *tiny(tiny_paths), "--temp", "0", "Name three colours.", "-n", "12"]
    r = run(*args, close=(2,))
    assert r.returncode == 0 and r.stdout.strip()
    assert r.stdout == run(*args).stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_full_stdout_is_exit_8(tiny_paths, extra):
    with open("/dev/full", "wb") as full:
        r = run("run", *tiny(tiny_paths), "--temp", "0", "Name three colours.", "-n", "12", *extra, stdout=full)
    one_error(r, 8, "cannot write to standard output", "No space left")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_stdout_for_reports(tmp_path):
    with open("/dev/full", "wb") as full:
        for args in (["models", "--json"], ["doctor"]):
            one_error(run(*args, stdout=full), 8, "cannot write to standard output")


def test_closed_stdin(tiny_paths):
    one_error(run("chat", "-n", "4", close=(0,)), 2, "standard input is closed")
    one_error(run("run", "-", close=(0,)), 5, "empty", "closed")
    # the argument alone is the prompt
    r = run("run", *tiny(tiny_paths), "--temp", "0", "Name three colours.", "-n", "4", close=(0,))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def _stop_reading_after_one_line(args, input: bytes = b""):
    p = subprocess.Popen(DSPARK + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    p.stdin.write(input)
    p.stdin.close()
    first = p.stdout.readline()
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read().decode()
    return p.wait(timeout=300), first, err


# The answers' first line ends within a few tokens (greedy: the demo pair lists "1. Lions" first), far from their
# end: the pipe closes while the answer still streams, and the wait is that one line, not a long story's first.
@pytest.mark.parametrize("args, input", [
    (["doctor"], b""),
    (["models"], b""),
    (["chat", "--temp", "0", "-n", "300"], b"List ten animals, one per line.\nAnd ten more.\n"),
    (["run", "--temp", "0", "-n", "300", "List ten animals, one per line."], b""),
])
def test_closed_pipe_is_a_quiet_exit_0(demo_paths, args, input):
    code, first, err = _stop_reading_after_one_line(args, input)
    assert first
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err.lower()


def test_closed_pipe_on_bench(tiny_paths):
    code, first, err = _stop_reading_after_one_line(
        ["bench", "-m", str(tiny_paths[0]), "-d", str(tiny_paths[1]), "-n", "8", "-r", "1", "--no-warmup", "--raw"])
    assert first and code == 0, err
    assert "Traceback" not in err


EMOJI = "\N{GLOWING STAR}" * 4  # the demo pair answers a row of these with more of them (a short prompt: quick)


@pytest.fixture(scope="module")
def emoji_answer(demo_paths):
    """A greedy demo-pair answer with characters that latin-1 cannot hold (its text, as JSON gives it)."""
    r = run("run", "--temp", "0", EMOJI, "-n", "12", "--json")
    text = json.loads(r.stdout)["text"]
    assert any(ord(c) > 255 for c in text), text  # the premise of the encoding tests below
    return text


def test_an_encoding_that_cannot_show_the_answer(emoji_answer):
    env = {**ENV, "PYTHONIOENCODING": "latin-1"}
    plain = run("run", "--temp", "0", EMOJI, "-n", "12", env=env)
    err = no_traceback(plain)
    assert plain.returncode == 0 and "written as '?'" in err and err.count("encoding") == 1
    assert plain.stdout.decode("latin-1").rstrip("\n") == emoji_answer.encode("latin-1", "replace").decode("latin-1")
    as_json = run("run", "--temp", "0", EMOJI, "-n", "12", "--json", env=env)
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout.decode("ascii"))["text"] == emoji_answer  # \u escapes: nothing lost


def test_an_answer_cut_inside_a_character_drops_it(emoji_answer):
    for n in range(1, 5):
        text = json.loads(run("run", "--temp", "0", EMOJI, "-n", str(n), "--json").stdout)["text"]
        assert "\ufffd" not in text and emoji_answer.startswith(text), (n, text)


# ------------------------------------------------------------------------------------------ invalid UTF-8


def test_invalid_utf8_in_arguments_and_piped_chat(tiny_paths):
    # Greedy: a sampled answer may end before its 6 tokens (it did, on the demo pair: n_tokens 3).
    pair = [os.fsencode(a) for a in tiny(tiny_paths)] + [b"--temp", b"0"]
    r = run(b"run", *pair, b"Say \xff hi", b"-n", b"6", b"--json")
    assert r.returncode == 0, no_traceback(r)
    assert json.loads(r.stdout)["n_tokens"] == 6
    r = run(b"run", *pair, b"hi", b"-s", b"Be \xfe brief", b"--stop", b"\xff", b"-n", b"6")
    assert r.returncode == 0 and r.stdout.strip(), no_traceback(r)
    r = run("chat", *tiny(tiny_paths), "--temp", "0", "-n", "6", input=b"Say \xff hi\n")
    assert r.returncode == 0 and r.stdout.strip(), no_traceback(r)


# ------------------------------------------------------------------------------------------ special files


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "model.gguf"
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_not_waited_on(fifo, tiny_paths):
    one_error(run("run", "-m", str(fifo), "-d", "none", "hi", timeout=60), 3, "not a regular file")
    one_error(run("doctor", "-m", str(tiny_paths[0]), "-d", str(fifo), timeout=60), 3, "not a regular file")
    one_error(run("bench", "--json", str(fifo), timeout=60), 2, "--json", "not a regular file")


def test_an_impossible_header_is_judged_alike_by_run_and_doctor(tmp_path):
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1) + bytes(1000))
    a = one_error(run("run", "-m", str(path), "-d", "none", "hi"), 3, "corrupt", "tensors")
    b = one_error(run("doctor", "-m", str(path)), 3, "corrupt", "tensors")
    assert a == b


def test_save_writes_through_symlinks_and_refuses_special_files(tiny_paths, tmp_path, fifo):
    target = tmp_path / "kept.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    r = run("chat", *tiny(tiny_paths), "--temp", "0", "-n", "6",
            input=f"Hello!\n/save! {fifo}\n/save {link}\n/save {target}\n/save! {link}\n".encode())
    err = no_traceback(r)
    assert r.stdout.strip(), err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()  # nothing replaced
    assert f"cannot write {fifo}: is not a regular file" in err
    # /save never replaces a file that exists (it used to overwrite it silently); /save! does
    assert f"{link} exists: /save! {link} replaces it" in err and f"{target} exists" in err
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r_["role"] for r_ in records] == ["user", "assistant"]
    assert r.returncode == 8  # a piped chat exits with its first failure
    assert not list(tmp_path.glob(".*.part"))


def test_transcript_that_is_a_directory_is_a_bad_flag(tmp_path):
    one_error(run("chat", "--transcript", str(tmp_path)), 2, "--transcript", "directory")


# ------------------------------------------------------------------------------------------- full disks


def test_transcript_stops_on_a_full_disk_and_the_chat_goes_on(tiny_paths, tmp_path):
    transcript = tmp_path / "t.jsonl"
    r = run("chat", *tiny(tiny_paths), "--temp", "0", "-n", "6", "--transcript", str(transcript),
            input=b"Hello!\nWhat is 2+2?\n", fsize=400)
    err = no_traceback(r)
    assert len([a for a in r.stdout.decode().splitlines() if a.strip()]) >= 2  # both answers shown
    said = [line for line in err.splitlines() if "transcript" in line]
    assert len(said) == 1 and "stopped" in said[0]  # said once, when it happened
    assert r.returncode == 8
    lines = transcript.read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)  # whole records only, none cut in half


def test_bench_prints_the_table_before_a_results_file_fails(tiny_paths, tmp_path):
    out = tmp_path / "r.json"
    r = run("bench", "-m", str(tiny_paths[0]), "-d", str(tiny_paths[1]), "-n", "8", "-r", "1", "--no-warmup", "--raw",
            "--json", str(out), fsize=1000)
    line = one_error(r, 8, f"cannot write {out}")
    assert "only on screen" in line  # the fallback copy hit the same limit
    assert "vs the target alone" in r.stdout.decode()  # the table came first


@pytest.mark.skipif(os.geteuid() != 0, reason="/proc files look writable only to root")
def test_bench_results_file_that_cannot_be_written_is_saved_elsewhere(tiny_paths):
    r = run("bench", "-m", str(tiny_paths[0]), "-d", str(tiny_paths[1]), "-n", "8", "-r", "1", "--no-warmup", "--raw",
            "--json", "/proc/version")
    line = one_error(r, 8, "cannot write /proc/version", "saved to")
    copy = Path(line.split("saved to ", 1)[1].split(" instead", 1)[0])
    try:
        assert json.loads(copy.read_text())["settings"]["max_tokens"] == 8
    finally:
        copy.unlink()
    assert "vs the target alone" in r.stdout.decode()


# ------------------------------------------------------------------------------------ Ctrl-C during a load


def _interrupt_when(args, marker: str, delay: float, env=None):
    p = subprocess.Popen(DSPARK + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env or ENV)
    seen = b""
    while marker.encode() not in seen:
        line = p.stderr.readline()
        assert line, seen
        seen += line
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, (seen + err).decode()


def test_ctrl_c_while_the_models_load(demo_paths):
    # A large context makes the target's load take over a second (its KV cache), during which llama.cpp
    # calls back into Python with its log: the interrupt must not be swallowed there.
    code, out, err = _interrupt_when(["run", "-c", "32768", "-n", "8", "hi"], "loading target", 0.3)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err and "Exception ignored" not in err
    assert out == b""


def test_ctrl_c_while_the_demo_target_is_made(demo_paths, tmp_path):
    cache = tmp_path / "demo"
    cache.mkdir()
    (cache / demo_paths[1].name).write_bytes(demo_paths[1].read_bytes())  # the draft is here: no download
    env = {**ENV, "DSPARK_CACHE": str(tmp_path)}
    code, out, err = _interrupt_when(["run", "-n", "8", "hi"], "making the demo target", 0.2, env=env)
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [demo_paths[1].name]


# ------------------------------------------------------------------------------------------- smaller ones


def test_whitespace_only_stdin():
    one_error(run("run", input=b"  \n\t\n"), 5, "only whitespace")


def test_more_threads_than_the_machine_warns(tiny_paths):
    r = run("run", "-m", str(tiny_paths[0]), "-d", "none", "-n", "2", "--raw", "-t", str((os.cpu_count() or 1) * 50), "the")
    err = no_traceback(r)
    assert r.returncode == 0 and "hardware threads" in err


def test_chat_messages_and_system_prompts_too_long_for_the_context(tiny_paths):
    # "word " is a token or two on any vocabulary (five bytes on the tiny pair's): 300 of them fill 256.
    chat = ["chat", *tiny(tiny_paths), "--temp", "0", "-n", "4", "-c", "256"]
    r = run(*chat, input=("word " * 400 + "\n").encode())
    line = one_error(r, 5, "this message needs", "context holds 256")
    assert "system prompt" not in line
    long_system = "word " * 300
    r = run(*chat, input=f"/system {long_system}\nHello!\n".encode())
    one_error(r, 5, "the system prompt needs")
    assert r.stdout.strip()  # the system prompt was refused, the message after it answered
    one_error(run(*chat, "-s", long_system), 5, "the system prompt needs")


# ---------------------------------------------------- found by probing the CLI with a helper (second round)


def test_a_context_smaller_than_a_batch_does_not_abort(tiny_paths):
    # llama.cpp caps its batch at the context asked for (and rounds the context up to 256): a long prompt must be
    # fed in batches it takes.
    from dspark_cli.llama.model import Model

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    vocab = Model(tiny_paths[0], vocab_only=True)
    try:
        # over the batch of 128, with room for the template and the answer in 256 ("hi" in its template: 54 tokens)
        assert 128 < len(vocab.tokenize(long_prompt, add_special=False)) < 256 - 4 - 48
    finally:
        vocab.close()
    for args in (["-c", "16", "hi"], ["-c", "128", long_prompt]):
        r = run("run", *tiny(tiny_paths), "--temp", "0", "-n", "4", *args)
        assert r.returncode == 0 and r.stdout.strip(), no_traceback(r)


def test_impossible_thread_counts_and_context_sizes():
    one_error(run("run", "hi", "-t", "100000"), 2, "--threads", "512")
    one_error(run("run", "hi", "-c", str(2**32 + 16)), 2, "--ctx-size")


def test_endless_stdin_is_refused_not_read_into_memory():
    p = subprocess.Popen(DSPARK + ["run", "-n", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    chunk = b"y\n" * (1 << 20)
    try:
        for _ in range(40):  # 80 MiB, more than dspark reads
            p.stdin.write(chunk)
        p.stdin.close()
    except (BrokenPipeError, ValueError):
        pass  # dspark stopped reading: that is the point
    out, err = p.stdout.read(), p.stderr.read()
    p.wait(timeout=120)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    one_error(r, 5, "more than 64 MiB")


def test_doctor_and_run_both_refuse_a_truncated_model(demo_paths, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(demo_paths[1], "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    a = one_error(run("doctor", "-m", str(cut), "-d", "none"), 3, "truncated")
    b = one_error(run("run", "-m", str(cut), "-d", "none", "hi"), 3, "truncated")
    assert a == b


def test_empty_names_are_bad_flags(tmp_path):
    one_error(run("chat", "--transcript", ""), 2, "--transcript", "empty")
    one_error(run("bench", "--json", ""), 2, "--json", "empty")
    one_error(run("run", "--pair", "", "hi"), 2, "--pair", "empty")
    one_error(run("bench", "--json", str(tmp_path / "r"), "--csv", str(tmp_path / "r")), 2, "same file")


def test_piped_chat_usage_errors_decide_the_exit(tiny_paths):
    r = run("chat", *tiny(tiny_paths), "--temp", "0", "-n", "4", input=b"hi\n/nosuch\n/save\n")
    err = no_traceback(r)
    assert r.returncode == 2 and "unknown command /nosuch" in err and "usage: /save FILE" in err
    assert r.stdout.strip()  # the message before them was answered


@pytest.mark.parametrize("ref", ["a/b:", ":x.gguf", "org/repo:../../x.gguf"])
def test_malformed_model_references_are_usage_errors(ref):
    one_error(run("pull", ref), 2, ref)


def test_a_nonsense_terminal_width_still_shows_the_help():
    r = run("-h", env={**ENV, "COLUMNS": "0"})
    assert r.returncode == 0 and b"run" in r.stdout and b"Usage" in r.stdout


def test_an_empty_home_is_not_the_root_directory(monkeypatch):
    from dspark_cli.models import demo
    from dspark_cli.places import home

    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("DSPARK_CACHE", raising=False)
    assert home() != Path("/") or os.geteuid() == 0 and Path("/root").exists() is False
    assert demo.cache_dir().parent.parent.parent == home()
    assert str(demo.cache_dir()).startswith(str(home()))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_keep_what_was_generated(demo_paths, tmp_path, sig, code):
    transcript = tmp_path / "t.jsonl"
    p = subprocess.Popen(DSPARK + ["chat", "-n", "500", "--transcript", str(transcript)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    p.stdin.write(b"Write a long essay about the history of bridges.\nAnd another one.\n")
    p.stdin.flush()
    got = read_first(p.stdout, 30)  # the answer is streaming
    p.send_signal(sig)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err.decode()
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    answer = records[-1]
    assert answer["role"] == "assistant" and answer["finish_reason"] == "interrupted"
    assert (got + rest).decode().startswith(answer["content"][:20])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="finds the loaded library in /proc/self/maps")
def test_an_abort_inside_llama_cpp_is_one_line_and_exit_1(tiny_paths):
    """If llama.cpp ever asserts (or, with RPC, loses a server), it aborts the process: dspark's abort callback
    says why in one line and exits 1 instead of dumping core or a backtrace onto stdout."""
    code = ("import ctypes, glob, os, sys\n"
            "import llama_cpp\n"
            "from dspark_cli.llama import process\n"
            "process.configure()\n"  # what the dspark command does first (a library host keeps llama.cpp's abort)
            "from dspark_cli.llama.model import Model\n"
            f"Model({str(tiny_paths[0])!r}, vocab_only=True)\n"
            "print('text already printed', flush=True)\n"
            "maps = open('/proc/self/maps').read().split()\n"
            "lib = ctypes.CDLL(next(p for p in maps if 'libggml-base' in p))\n"
            "lib.ggml_abort(b'ggml.c', 1, b'GGML_ASSERT(%s) failed', b'something')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == "text already printed\n"
    lines = [line for line in r.stderr.splitlines() if line.startswith("dspark: error:")]
    assert lines == ["dspark: error: llama.cpp stopped: GGML_ASSERT(something) failed"]
    # As a library (no process.configure()), dspark leaves llama.cpp's own abort to its host process.
    r = subprocess.run([sys.executable, "-c", code.replace("process.configure()\n", "")], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert r.returncode != 1 and "dspark: error:" not in r.stderr, (r.returncode, r.stderr)
