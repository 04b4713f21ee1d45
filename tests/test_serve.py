"""`dspark serve` as a real process on a loopback port, driven by the official `openai` client (and raw HTTP
for what a client library would not send): completions, streaming, usage, seeds, stops, concurrency, dropped
clients, bad requests, API keys, and a clean Ctrl-C."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

DSPARK = [sys.executable, "-m", "dspark_cli"]
PROMPT = "Name three colours."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None):
        self.port = free_port()
        self.log = []
        self.key = (env or {}).get("DSPARK_API_KEY")  # what client() and long_stream_of() send, when set
        self.proc = subprocess.Popen(DSPARK + ["serve", "--port", str(self.port), "-t", "1", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})}, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited: " + "".join(self.log))
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start: " + "".join(self.log))

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        payload = r.read()
        c.close()
        return r.status, (json.loads(payload) if payload.strip().startswith(b"{") else payload), {k.lower(): v for k, v in r.getheaders()}

    def long_stream(self, max_tokens: int):
        """A streaming request for a long answer, read until its first chunk: (connection, response)."""
        return self.long_stream_of([{"role": "user", "content": "Write a very long essay about the history of bridges."}],
                                   max_tokens)

    def long_stream_of(self, messages, max_tokens: int, **fields):
        """A streaming chat request (greedy unless fields say otherwise), read until its first chunk."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": model_id(self), "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": messages, **fields}), headers={"Content-Type": "application/json",
                                                       **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        r = c.getresponse()
        assert r.status == 200
        r.readline()  # the first chunk arrived: it is generating
        return c, r

    def client(self, key=None):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key or self.key or "none",
                             max_retries=0, timeout=120)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def module_servers(demo_paths):
    """The servers the module's `server` fixture started (stopped at the end of the module)."""
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def server(module_servers):
    """The module's server (the default --parallel 4, room for 8 waiting), shared by the tests; a new one for a
    test that finds it stopped (the Ctrl-C test stops it: it comes last in this file)."""
    if not module_servers or module_servers[-1].proc.poll() is not None:
        module_servers.append(Server("--max-queue", "8"))
    return module_servers[-1]


@pytest.fixture(scope="module")
def keyed_one_at_a_time(demo_paths):
    """A server that generates one request at a time (with room for three waiting) and wants an API key (from
    the environment): the arrival-order test's and the API-key test's, neither of which depends on the other's
    setting."""
    s = Server("--parallel", "1", "--max-queue", "8", env={"DSPARK_API_KEY": "sekrit"})
    yield s
    s.stop()


def model_id(server) -> str:
    return server.client().models.list().data[0].id


def test_models_and_health(server):
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].id
    meta = models[0].model_extra["meta"]  # the proof at load, on dspark's build: every verify batch matched
    assert meta["exact"] == "proven (batches <= 16)" and meta["exactness"]["proven"] and meta["exactness"]["bound"] == 16
    status, body, _ = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_greedy_chat_equals_dspark_run(server):
    r = server.client().chat.completions.create(model=model_id(server), temperature=0, max_tokens=16,
                                                messages=[{"role": "user", "content": PROMPT}])
    run = subprocess.run(DSPARK + ["run", "--temp", "0", "-n", "16", "-t", "1", PROMPT], capture_output=True, text=True, timeout=300)
    assert r.choices[0].message.content == run.stdout.rstrip("\n")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == 16 and timings["draft_n"] >= timings["draft_n_accepted"] >= 0
    assert timings["exact"] == "proven (batches <= 16)"


def test_streaming_chat_with_usage(server):
    stream = server.client().chat.completions.create(model=model_id(server), temperature=0, max_tokens=16,
                                                     messages=[{"role": "user", "content": PROMPT}], stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = server.client().chat.completions.create(model=model_id(server), temperature=0, max_tokens=16,
                                                    messages=[{"role": "user", "content": PROMPT}])
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_completions_raw_prompt_stream_and_stop(server):
    c = server.client()
    full = c.completions.create(model=model_id(server), prompt="The capital of France is", temperature=0,
                                max_tokens=16)
    text = full.choices[0].text
    assert text.strip()
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:3]
    cut = c.completions.create(model=model_id(server), prompt="The capital of France is", temperature=0,
                               max_tokens=16, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model_id(server), prompt="The capital of France is", temperature=0, max_tokens=16, stream=True)
        if ch.choices)
    assert streamed == text


def test_seed_reproduces_a_sampled_answer(server):
    c = server.client()
    ask = dict(model=model_id(server), messages=[{"role": "user", "content": "Tell me a joke."}], temperature=0.9,
               top_p=0.95, max_tokens=16)
    a = c.chat.completions.create(seed=11, **ask).choices[0].message.content
    b = c.chat.completions.create(seed=11, **ask).choices[0].message.content
    assert a == b


def test_a_growing_conversation_reuses_the_cache(server):
    c = server.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = c.chat.completions.create(model=model_id(server), messages=messages, temperature=0, max_tokens=24)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And of Germany?"}]
    # Idle, the server re-processes the answer as a fresh run of the resent conversation would (exactness).
    wait_for(lambda: server.request("GET", "/health")[1]["settling"] == 0, "the idle server to settle the answer")
    second = c.chat.completions.create(model=model_id(server), messages=messages, temperature=0, max_tokens=24)
    t = second.model_extra["timings"]
    assert t["prompt_n"] < 20 < second.usage.prompt_tokens  # only the new turn was processed


def test_concurrent_streams_all_complete_alike(server):
    """Four at once on the default --parallel 4: batched together, each the answer it gets alone."""
    c = server.client()
    expected = c.chat.completions.create(model=model_id(server), temperature=0, max_tokens=16,
                                         messages=[{"role": "user", "content": PROMPT}]).choices[0].message.content
    results, finished = {}, []

    def one(i):
        results[i] = streamed_answer(c, server)
        finished.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.05)  # arrival order 0, 1, 2, 3
    for t in threads:
        t.join(timeout=300)
    assert results == {i: expected for i in range(4)}
    assert sorted(finished) == [0, 1, 2, 3]


def test_one_at_a_time_serves_in_arrival_order(keyed_one_at_a_time):
    s = keyed_one_at_a_time
    c = s.client()  # with the server's key
    results, finished = {}, []

    def one(i):
        results[i] = streamed_answer(c, s)
        finished.append(i)

    first = threading.Thread(target=one, args=(0,))
    first.start()
    wait_for(lambda: s.request("GET", "/health")[1]["generating"])  # 0 holds the models
    threads = [first]
    for i in (1, 2, 3):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        wait_for(lambda: s.request("GET", "/health")[1]["waiting"] >= i or len(finished) >= i)  # arrival order
    for t in threads:
        t.join(timeout=300)
    assert finished == [0, 1, 2, 3]
    assert len(set(results.values())) == 1


def streamed_answer(client, server) -> str:
    """PROMPT's greedy answer of 16 tokens, streamed, as one text."""
    stream = client.chat.completions.create(model=model_id(server), temperature=0, max_tokens=16, stream=True,
                                            messages=[{"role": "user", "content": PROMPT}])
    return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


def wait_for(condition, what: str = "a state") -> None:
    """Until condition() holds (a state, not a time; the bound only keeps a broken server from hanging the run)."""
    deadline = time.time() + 120
    while not condition():
        assert time.time() < deadline, f"waited two minutes for {what}"
        time.sleep(0.01)


def test_a_client_that_drops_mid_stream_frees_the_server(server):
    c, _ = server.long_stream(2000)
    c.close()  # the client goes away
    start = time.time()
    quick = server.client().chat.completions.create(model=model_id(server), temperature=0, max_tokens=4,
                                                    messages=[{"role": "user", "content": "Hi"}])
    assert quick.choices[0].message.content
    assert time.time() - start < 5  # not after 2000 tokens of an essay nobody reads


@pytest.mark.parametrize("body, status, fragment", [
    (None, 400, "not valid JSON"),
    ({"model": "x", "messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"model": "MODEL", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "'max_tokens' must be at least 1"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n'"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "'n'"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stream": True,
      "stream_options": {"include_usage": "no"}}, 400, "include_usage"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
      "stream_options": {"include_usage": True}}, 400, "only allowed with 'stream': true"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "text parts"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context"),
])
def test_bad_requests_are_openai_errors_and_the_server_goes_on(server, body, status, fragment):
    if body is not None:
        body = json.loads(json.dumps(body).replace("MODEL", model_id(server)))
    got, answer, _ = server.request("POST", "/v1/chat/completions", body, raw=b"{not json" if body is None else None)
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "code"} and fragment in answer["error"]["message"]
    assert server.request("GET", "/health")[0] == 200


def test_an_oversized_body_is_413(server):
    got, answer, _ = server.request("POST", "/v1/chat/completions", raw=b"{" + b" " * (9 << 20) + b"}")
    assert got == 413 and "over" in answer["error"]["message"]


def test_a_full_queue_is_429_with_retry_after(demo_paths):
    s = Server("--max-queue", "0", "--parallel", "1")
    try:
        c, _ = s.long_stream(300)  # the first request is generating
        got, answer, headers = s.request("POST", "/v1/chat/completions", {
            "model": model_id(s), "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert got == 429 and headers.get("retry-after") and answer["error"]["type"] == "rate_limit_error"
        c.close()
    finally:
        s.stop()


def test_api_key(keyed_one_at_a_time):
    s = keyed_one_at_a_time  # DSPARK_API_KEY=sekrit in its environment
    assert s.request("GET", "/health")[0] == 200  # always open
    got, answer, _ = s.request("GET", "/v1/models")
    assert got == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    got, answer, _ = s.request("GET", "/v1/models", headers={"Authorization": b"Bearer \xff"})  # not text
    assert got == 401 and answer["error"]["code"] == "invalid_api_key"
    assert s.client("sekrit").models.list().data


def test_ctrl_c_ends_the_stream_with_an_error_chunk_and_exits_cleanly(server):
    s = server  # after every other test's requests (it stops the module's server)
    _, r = s.long_stream(3000)
    s.proc.send_signal(signal.SIGINT)
    rest = r.read().decode()
    assert '"error"' in rest and "shutting down" in rest and rest.rstrip().endswith("data: [DONE]")
    assert s.proc.wait(timeout=30) == 0
    log = "".join(s.log)
    assert "Traceback" not in log and "POST /v1/chat/completions 200" in log


def test_bad_flags_fail_before_loading():
    r = subprocess.run(DSPARK + ["serve", "--port", "70000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port" in r.stderr and "loading" not in r.stderr
