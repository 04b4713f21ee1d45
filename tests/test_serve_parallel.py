"""`dspark serve --parallel 4` (the default) as a real process, driven by the official `openai` client: requests
batched together are each exactly what `dspark run` answers alone (greedy and seeded sampling), a client that
drops mid-stream frees its slot while the others finish unharmed, a conversation resent with one more turn
processes only its new tokens while another request generates, /health and /metrics say what runs, and the
library batches concurrent callers the same way (load(parallel=N))."""

from __future__ import annotations

import json
import re
import subprocess
import threading

import pytest

from test_serve import DSPARK, Server, model_id, wait_for

openai = pytest.importorskip("openai")

QUESTIONS = [
    "Name three colours.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
]
# The demo target, greedy, counts on past a thousand: an answer that never ends by itself.
COUNTING = "Count from 1 to 2000, separated by commas."


@pytest.fixture(scope="module")
def server(demo_paths):
    s = Server("--max-queue", "8")  # the default --parallel 4
    yield s
    s.stop()


_ran_alone: dict[tuple[str, ...], str] = {}


def run_alone(prompt: str, *args: str) -> str:
    """`dspark run`'s answer (once per prompt and flags in this module: the same command answers the same)."""
    key = (prompt, *args)
    if key not in _ran_alone:
        out = subprocess.run(DSPARK + ["run", "--json", "-t", "1", "--temp", "0", *args, prompt], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        _ran_alone[key] = json.loads(out.stdout)["text"]
    return _ran_alone[key]


def run_flags(sampling: dict) -> list[str]:
    """`dspark run`'s flags for a request's sampling fields, with the server's defaults for what a request leaves
    out (top-k and top-p off), which run's own differ from."""
    return ["--temp", str(sampling["temperature"]), "--top-k", "0", "--top-p", "1"] + (
        ["--seed", str(sampling["seed"])] if "seed" in sampling else [])


# Tokens each of the QUESTIONS is answered with when they are batched (the same in the tests below, so that each
# `dspark run` answer is computed once).
N = 24


def health(s: Server) -> dict:
    return s.request("GET", "/health")[1]


def prometheus(s: Server) -> dict[str, float]:
    """/metrics' values by name."""
    text = s.request("GET", "/metrics")[1].decode()
    return {name: float(v) for name, v in (line.split() for line in text.splitlines() if line and line[0] != "#")}


def ask_all(s: Server, questions: list[str], **options) -> dict[int, object]:
    """The questions at once, each from its own thread through the openai client: {index: response}."""
    client = s.client()
    got: dict[int, object] = {}

    def one(i: int) -> None:
        got[i] = client.chat.completions.create(model=model_id(s), messages=[{"role": "user", "content": questions[i]}],
                                                **options)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return got


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 7}])
def test_requests_batched_together_are_each_what_run_gives_alone(server, sampling):
    """While a long answer streams, three more arrive: all four share target passes (timings.batch_max), and each
    text is `dspark run`'s for the same prompt and settings, the long one's too, as far as it got."""
    conn, stream = server.long_stream_of([{"role": "user", "content": COUNTING}], 1000, **sampling)
    try:
        got = ask_all(server, QUESTIONS, max_tokens=N, **sampling)
        received = read_some(stream)
    finally:
        conn.close()
    flags = run_flags(sampling)
    for i, question in enumerate(QUESTIONS):
        assert got[i].choices[0].message.content == run_alone(question, "-n", str(N), *flags), question
        assert got[i].model_extra["timings"]["batch_max"] >= 2  # it shared passes with the long answer at least
    assert run_alone(COUNTING, "-n", str(N), *flags).startswith(received)  # a dozen chunks, within N tokens


def read_some(stream) -> str:
    """What the long stream has sent so far (its text), read until a few chunks are in (or it ended)."""
    text = []
    while len(text) < 12:
        line = stream.readline().decode()
        if not line or line.startswith("data: [DONE]"):
            break
        if line.strip():
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("choices"):
                text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def test_a_client_dropped_mid_stream_frees_its_slot_and_three_go_on(server):
    since = len(server.log)
    conns = [server.long_stream_of([{"role": "user", "content": COUNTING}], 1000)]
    try:
        wait_for(lambda: health(server)["active"] == 1, "the long answer to hold a slot")
        results: dict[int, object] = {}

        def others():
            results.update(ask_all(server, QUESTIONS, max_tokens=N, temperature=0))

        t = threading.Thread(target=others)
        t.start()
        wait_for(lambda: health(server)["active"] == 4, "all four generating at once")
        conns[0][0].close()  # the long answer's client goes away mid-stream
        wait_for(lambda: health(server)["active"] <= 3, "its slot to be freed")
        t.join(timeout=600)
    finally:
        for c, _ in conns:
            c.close()
    for i, question in enumerate(QUESTIONS):
        assert results[i].choices[0].message.content == run_alone(question, "-n", str(N),
                                                                  *run_flags({"temperature": 0})), question
    posts = lambda: [line for line in server.log[since:] if " POST " in line]  # noqa: E731
    wait_for(lambda: len(posts()) >= 4, "the four requests' log lines")
    assert not any(" 1000 tokens" in line for line in posts()), posts()  # the dropped one stopped early
    wait_for(lambda: health(server)["active"] == 0, "every slot free")


def test_a_resent_conversation_processes_only_its_new_tokens_while_another_generates(server):
    client = server.client()
    first = [{"role": "user", "content": "Name three colours."}]
    r1 = client.chat.completions.create(model=model_id(server), messages=first, max_tokens=24, temperature=0)
    wait_for(lambda: health(server)["settling"] == 0, "the idle server to settle the answer for reuse")
    conn, _ = server.long_stream_of([{"role": "user", "content": COUNTING}], 1000)  # another request generates
    try:
        second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                          {"role": "user", "content": "And three more?"}]
        r2 = client.chat.completions.create(model=model_id(server), messages=second, max_tokens=24, temperature=0)
    finally:
        conn.close()
    timings = r2.model_extra["timings"]
    assert timings["prompt_n"] <= 18, timings  # only the new turn (or the 17 tokens of a fast batch), not the
    assert r2.usage.prompt_tokens > 30  # whole conversation


SYSTEM = ("You answer for a hardware shop. Be brief and friendly, give prices in euros, and say when an item is "
          "out of stock rather than guessing.")


def test_a_system_prompt_another_slot_holds_is_not_processed_again(server):
    """While one request with a system prompt generates, another with the same system prompt arrives: it copies
    that prefix from the first one's slot, processes only its own question (timings.prompt_n, usage's
    cached_tokens), and answers as `dspark run --system` alone does."""
    client = server.client()
    question = "Do you sell hammers?"
    before = prometheus(server)
    conn, _ = server.long_stream_of([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": COUNTING}], 1000)
    try:
        r = client.chat.completions.create(model=model_id(server), max_tokens=N, temperature=0, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    finally:
        conn.close()
    timings, usage = r.model_extra["timings"], r.usage
    assert timings["prompt_n"] <= usage.prompt_tokens - 30, (usage, timings)  # its question, not the system prompt
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - timings["prompt_n"]
    after = prometheus(server)  # /metrics counts both requests' prompts, and at least this one's copied tokens
    prompted = after["dspark_prompt_tokens_total"] - before["dspark_prompt_tokens_total"]
    cached = after["dspark_prompt_tokens_cached_total"] - before["dspark_prompt_tokens_cached_total"]
    assert prompted > 2 * usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens <= cached < prompted
    assert r.choices[0].message.content == run_alone(question, "-n", str(N), "--system", SYSTEM)


def test_health_and_metrics_report_what_runs(server):
    conn, _ = server.long_stream_of([{"role": "user", "content": COUNTING}], 1000)
    try:
        wait_for(lambda: health(server)["active"] == 1, "a generation")
        h = health(server)
        assert h["slots"] == 4 and h["waiting"] == 0 and h["generating"] is True
        assert len(h["requests"]) == 1 and h["requests"][0]["tokens"] >= 1
        status, body, headers = server.request("GET", "/metrics")
        text = body.decode()
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert "dspark_requests_active 1" in text and "dspark_slots 4" in text
        values = prometheus(server)
        assert values["dspark_tokens_total"] >= 1 and values["dspark_requests_total"] >= 1
        assert values["dspark_prompt_tokens_total"] >= values["dspark_prompt_tokens_cached_total"] >= 0
    finally:
        conn.close()


def test_a_request_that_fills_its_context_ends_alone(demo_paths):
    """With 256 tokens a request, one that runs into its context (a raw count that goes on, from a prompt that
    already counts to 50: 190 of the 256 tokens) ends there (finish_reason "length") while the one beside it goes
    on to its own end, the answer `dspark run` gives alone with the same context."""
    s = Server("--ctx-size", "256")
    try:
        client = s.client()
        counted = {}

        def count():
            stream = client.completions.create(model=model_id(s), prompt=", ".join(map(str, range(1, 51))) + ",",
                                               max_tokens=1000, temperature=0, stream=True)
            counted["finish"] = [c.choices[0].finish_reason for c in stream if c.choices][-1]

        t = threading.Thread(target=count)
        t.start()
        wait_for(lambda: health(s)["active"] == 1 or "finish" in counted, "the count to start")
        other = ask_all(s, QUESTIONS[1:2], max_tokens=32, temperature=0)[0]
        t.join(timeout=600)
    finally:
        s.stop()
    assert counted["finish"] == "length"  # the context, in OpenAI's words
    assert other.choices[0].message.content == run_alone(QUESTIONS[1], "-n", "32", "--ctx-size", "256")


def test_parallel_larger_than_memory_allows_refuses_to_start():
    out = subprocess.run(DSPARK + ["serve", "--parallel", "256", "--ctx-size", "131072", "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (2, 7), out.stderr
    if out.returncode == 7:
        assert "KV cache" in out.stderr and "Traceback" not in out.stderr
        fits = re.search(r"--parallel (\d+) fits", out.stderr)  # the most that fit, not the number asked for
        assert fits is None and "fewer parallel sequences" in out.stderr or 1 <= int(fits.group(1)) < 256, out.stderr


def test_bad_parallel_is_a_usage_error():
    out = subprocess.run(DSPARK + ["serve", "--parallel", "0", "--port", "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_the_library_batches_concurrent_callers(demo_paths):
    """load(parallel=2): two complete() calls from two threads run at once, each the lone answer."""
    import dspark_cli as dspark

    questions = QUESTIONS[:2]
    with dspark.load(quiet=True) as pair:
        alone = [pair.complete(q, max_tokens=16).text for q in questions]
    with dspark.load(parallel=2, quiet=True) as pair:
        got: dict[int, object] = {}
        threads = [threading.Thread(target=lambda i=i: got.update({i: pair.complete(questions[i], max_tokens=16)}))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert [got[i].text for i in range(2)] == alone
        # Two generations started before either is read share their passes.
        gens = [pair.generate(q, max_tokens=16) for q in questions]
        texts = ["".join(ev.text for ev in g) for g in gens]
        assert texts == alone
        assert pair.generate(questions[0], max_tokens=2) is not None  # a third is fine too: it waits its turn


def test_closing_a_batching_pair_ends_its_generations_with_the_pair_is_closed(demo_paths):
    import dspark_cli as dspark

    pair = dspark.load(parallel=2, quiet=True)
    generation = pair.generate(COUNTING, max_tokens=500)
    next(generation)
    pair.close()
    with pytest.raises(dspark.UsageError, match="the pair is closed"):
        for _ in generation:
            pass
    with pytest.raises(dspark.UsageError, match="the pair is closed"):
        pair.complete("Hi", max_tokens=2)
