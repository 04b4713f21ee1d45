"""Targets across machines: real `dspark rpc-server` processes on loopback ports, real `dspark run/chat` clients.
Greedy output through two servers equals the target alone here; a server that is unreachable, not an RPC
server, silent, or killed mid-generation ends in one line naming it, in bounded time, with a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import pytest

from dspark_cli.llama import rpc
from dspark_cli.errors import RemoteError
from test_hostile_input import one_error
from test_serve import free_port
from child_output import read_first

DSPARK = [sys.executable, "-m", "dspark_cli"]
ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
PROMPT = "List three facts about the Moon."

pytestmark = pytest.mark.skipif(not rpc.supported(), reason="llama.cpp built without -DGGML_RPC=ON")


def default_sigint() -> None:
    """In a child before it runs: SIGINT as a foreground job has it. A test run in the background of a script
    (`pytest ... &`) inherits SIGINT ignored, and a Python child started from it ignores Ctrl-C, as such a
    background job should; a test of Ctrl-C must give its child the terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen(DSPARK + ["rpc-server", "--port", str(port), "--threads", "1", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, preexec_fn=default_sigint)
    endpoint = rpc.Endpoint("127.0.0.1", port)
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                rpc.probe(endpoint, timeout=2)
                return p, str(endpoint)
            except RemoteError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"rpc-server did not start: {end(p)[1].decode()}") from None
                time.sleep(0.2)
    except BaseException:
        end(p)
        raise


def end(p: subprocess.Popen) -> tuple[bytes, bytes]:
    """Kill a process a test started if it still runs (whatever the test did or failed to do), and collect what
    it wrote."""
    if p.poll() is None:
        p.kill()
    return p.communicate()


def stop(p: subprocess.Popen) -> tuple[bytes, bytes]:
    """Ctrl-C, as a user stops a server: it must be gone within 20 s (it is killed otherwise, and this fails)."""
    p.send_signal(signal.SIGINT)
    try:
        return p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        out, err = end(p)
        raise AssertionError(f"rpc-server did not stop within 20 s of SIGINT; its log: {err.decode()[-2000:]}") from None


@contextmanager
def running_server(*extra: str):
    """(process, endpoint) of a fresh rpc-server, killed on the way out whatever happened."""
    p, endpoint = start_server(*extra)
    try:
        yield p, endpoint
    finally:
        end(p)


@pytest.fixture(scope="module")
def servers():
    started: list[tuple[subprocess.Popen, str]] = []
    try:
        started += [start_server(), start_server()]
        yield ",".join(endpoint for _, endpoint in started)
        # Ctrl-C stops a server after clients came and went (test_keep_alive_reaches_llama_cpps_own_connection's
        # loaded through the first one, among others).
        for p, _ in started:
            out, _ = stop(p)
            assert out == b""  # the server's log goes to stderr: stdout carries nothing
            assert p.returncode == 0
    finally:
        for p, _ in started:
            end(p)


def dspark(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(DSPARK + list(args), capture_output=True, env=ENV, timeout=timeout)


def generate(target, draft, *extra: str, n: int = 24) -> tuple[str, dict]:
    r = dspark("run", "-m", str(target), "-d", str(draft), "--temp", "0", "-n", str(n), "--json", *extra, PROMPT)
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    return result["text"], result


# ---- the target across two servers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alone(demo_paths) -> str:
    """The target alone on this machine, greedy: what each remote placement below must answer."""
    text, _ = generate(demo_paths[0], "none")
    assert text.strip()
    return text


def test_greedy_across_two_servers_equals_the_target_alone_here(servers, demo_paths, alone):
    target, draft = demo_paths
    remote_spec, stats = generate(target, draft, "--rpc", servers)
    assert remote_spec == alone
    assert stats["drafted"] > 0  # the local draft really drafted for the remote target
    # The target alone there, its layers split 1:3 between the servers (the run above split them by free memory).
    remote_alone, _ = generate(target, "none", "--rpc", servers, "--tensor-split", "1,3")
    assert remote_alone == alone


def test_the_draft_can_go_remote_too(servers, demo_paths, alone):
    target, draft = demo_paths
    first, second = servers.split(",")
    text, _ = generate(target, draft, "--rpc", first, "--rpc-draft", second)
    assert text == alone


# ---- failures, each one line naming the server ---------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def load_failures(demo_paths, tmp_path_factory):
    """`dspark run` against four endpoints that are no RPC server, started together when the module starts: they
    spend their time waiting (two of them out the probe's 5 s), so they have ended by the time the tests below read
    them. {name: future of (result, endpoint, seconds from its start to its end)}. Nothing listens on the first;
    the second answers HTTP 400 to anything; the third accepts (the backlog) and never answers, as a busy server;
    the fourth is a real HTTP server, which reads the HELLO as the start of a request line and waits for its end:
    silence, like a busy server."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        silent = stack.enter_context(socket.create_server(("127.0.0.1", 0)))  # accepts, never answers

        def answer():
            conn, _ = listener.accept()
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        endpoints = {"unreachable": f"127.0.0.1:{free_port()}",
                     "something else": f"127.0.0.1:{listener.getsockname()[1]}",
                     "silent": f"127.0.0.1:{silent.getsockname()[1]}",
                     "http": stack.enter_context(http_server(tmp_path_factory.mktemp("http")))}
        pool = stack.enter_context(ThreadPoolExecutor(len(endpoints)))
        procs: list[subprocess.Popen] = []
        # on the way out, first: whatever still runs is killed (so the pool's threads end)
        stack.callback(lambda: [p.kill() for p in procs if p.poll() is None])

        def run(endpoint: str):
            started = time.monotonic()
            p = subprocess.Popen(DSPARK + ["run", "-m", str(demo_paths[0]), "-d", "none", "--rpc", endpoint, "-n",
                                           "4", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
            procs.append(p)
            out, err = p.communicate(timeout=120)
            return subprocess.CompletedProcess(p.args, p.returncode, out, err), endpoint, time.monotonic() - started

        yield {name: pool.submit(run, endpoint) for name, endpoint in endpoints.items()}


def test_an_unreachable_server_at_load_is_one_line(load_failures):
    r, endpoint, seconds = load_failures["unreachable"].result()
    one_error(r, 9, endpoint, "connection refused")
    assert seconds < 30
    assert r.stdout == b""


def test_something_else_on_the_port_is_not_taken_for_a_server(load_failures):
    r, endpoint, _ = load_failures["something else"].result()
    one_error(r, 9, endpoint, "not a llama.cpp RPC server")


def test_a_silent_server_times_out_instead_of_hanging(load_failures):
    r, endpoint, seconds = load_failures["silent"].result()
    one_error(r, 9, endpoint, "did not answer")
    assert seconds < 60


def test_an_http_server_on_the_port_is_named(load_failures):
    # dspark says what it found instead of "did not answer ... is another dspark using it?".
    r, endpoint, _ = load_failures["http"].result()
    line = one_error(r, 9, endpoint, "not a llama.cpp RPC server", "an HTTP server answered", "HTTP/1.")
    assert "did not answer" not in line and "another dspark" not in r.stderr.decode()
    assert r.stdout == b""


@contextmanager
def http_server(folder):
    """A real HTTP server (python -m http.server, serving folder) on a loopback port: its endpoint, once it
    accepts connections."""
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                          str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert p.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        end(p)


def test_a_server_killed_mid_generation_ends_the_run_in_one_line(demo_paths):
    target, draft = demo_paths
    with running_server() as (doomed, endpoint):
        p = subprocess.Popen(DSPARK + ["run", "-m", str(target), "-d", str(draft), "--rpc", endpoint, "--temp", "0",
                                       "-n", "2000", "Write a long story about a lighthouse keeper."],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        try:
            first = read_first(p.stdout, 40)  # the answer is streaming: the target is generating on the server
            assert first, p.stderr.read().decode()
            doomed.kill()
            killed_at = time.monotonic()
            rest, err = p.communicate(timeout=60)
            assert time.monotonic() - killed_at < 15
        finally:
            end(p)
    r = subprocess.CompletedProcess(p.args, p.returncode, first + rest, err)
    one_error(r, 9, "lost the RPC server", endpoint)
    assert len(first + rest) >= 40  # what was generated stays printed


def test_chat_keeps_the_answer_so_far_when_the_server_dies(demo_paths, tmp_path):
    target, draft = demo_paths
    transcript = tmp_path / "chat.jsonl"
    with running_server() as (doomed, endpoint):
        p = subprocess.Popen(DSPARK + ["chat", "-m", str(target), "-d", str(draft), "--rpc", endpoint, "--temp", "0",
                                       "-n", "2000", "--transcript", str(transcript)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        try:
            p.stdin.write(b"Write a long story about a lighthouse keeper.\n")
            p.stdin.flush()
            first = read_first(p.stdout, 40)
            assert first, p.stderr.read().decode()
            doomed.kill()
            rest, err = p.communicate(timeout=60)
        finally:
            end(p)
    one_error(subprocess.CompletedProcess(p.args, p.returncode, first + rest, err), 9, "lost the RPC server")
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert records[-2]["role"] == "user"
    answer = records[-1]
    assert answer["role"] == "assistant" and answer["finish_reason"] == "error" and "RPC server" in answer["error"]
    assert answer["content"] and (first + rest).decode("utf-8", "replace").startswith(answer["content"][:20])


# ---- flags and the server command -----------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--rpc", "nonsense"], "not HOST:PORT"),
    (["--rpc", "127.0.0.1:0"], "not HOST:PORT"),
    (["--rpc", "a:1,,b:2"], "HOST:PORT[,HOST:PORT...]"),
    (["--rpc", "a:1,a:1"], "twice"),
    (["--rpc", "a:1", "--tensor-split", "x,1"], "--tensor-split"),
    (["--rpc", "a:1", "--tensor-split", "0,0"], "--tensor-split"),
    (["--rpc", "a:1", "-ngl", "0"], "--n-gpu-layers 0"),
    (["-d", "none", "--rpc-draft", "a:1"], "no draft model"),
    # llama.cpp's client connects an AF_INET socket: an IPv6 address is refused up front, not after a probe
    (["--rpc", "[::1]:50052"], "IPv4 only"),
    (["--rpc", "::1:50052"], "IPv4 only"),
    (["--rpc", "127.0.0.1:50052", "--rpc-draft", "[fe80::1]:50052"], "IPv4 only"),
])
def test_impossible_rpc_flags_are_usage_errors(args, fragment):
    one_error(dspark("run", *args, "hi", timeout=60), 2, fragment)


def test_tensor_split_needs_as_many_devices(servers, demo_paths):
    r = dspark("run", "-m", str(demo_paths[0]), "-d", "none", "--rpc", servers.split(",")[0],
               "--tensor-split", "1,1", "hi")
    one_error(r, 2, "--tensor-split")


@pytest.mark.parametrize("args, code, fragment", [
    (["--host", "0.0.0.0"], 2, "--allow-network"),
    (["--port", "0"], 2, "--port"),
    (["--device", "NOPE"], 2, "no device NOPE"),
    (["--threads", "0"], 2, "--threads"),
    # llama.cpp's server binds an AF_INET socket to inet_addr(host): IPv6 and host names cannot be listened on
    (["--host", "::1"], 2, "IPv4 address only"),
    (["--host", "[::1]"], 2, "IPv4 address only"),
    (["--host", "::", "--allow-network"], 2, "IPv4 address only"),
    (["--host", "rpc.example.org", "--allow-network"], 2, "IPv4 address only"),
    (["--host", "192.0.2.1", "--allow-network"], 2, "not an address of this machine"),
])
def test_rpc_server_refuses_bad_flags(args, code, fragment):
    one_error(dspark("rpc-server", *args, timeout=60), code, fragment)


def test_rpc_server_on_a_taken_port_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        one_error(dspark("rpc-server", "--port", str(port), timeout=60), 9, f"127.0.0.1:{port}")


def test_rpc_server_warns_before_listening_on_the_network():
    with running_server("--host", "0.0.0.0", "--allow-network") as (p, _):  # reachable on loopback, where probed
        out, err = stop(p)
    assert out == b"" and p.returncode == 0
    assert "Never expose it to an open network" in err.decode()


def test_rpc_server_on_localhost_listens_on_127_0_0_1():
    """llama.cpp's server takes only an IPv4 address; `localhost` is this machine's 127.0.0.1 (start_server
    probes it there), and a client's `localhost` reaches it over IPv4 as llama.cpp's would."""
    with running_server("--host", "localhost") as (p, endpoint):
        assert rpc.probe(rpc.Endpoint("localhost", int(endpoint.rsplit(":", 1)[1])))[0] == rpc.PROTOCOL_MAJOR
        out, err = stop(p)
    assert p.returncode == 0 and f"on {endpoint} " in err.decode()


def test_rpc_server_stops_on_sigterm_when_sigint_is_ignored():
    """Started in the background of a script, a server ignores SIGINT (as every background job does there): it
    says so, and SIGTERM stops it cleanly."""
    port = free_port()
    p = subprocess.Popen(DSPARK + ["rpc-server", "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
                break
            except RemoteError:
                assert p.poll() is None and time.monotonic() < deadline, end(p)[1].decode()
                time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        end(p)
    assert p.returncode == 0 and out == b""
    assert "SIGTERM stops" in err.decode() and "Ctrl-C stops" not in err.decode()


def test_keep_alive_is_set_on_a_connection():
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as conn:
        rpc.set_keep_alive(conn)
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000


def test_serve_ends_the_stream_with_an_error_when_the_server_dies(demo_paths):
    from test_serve import Server

    with running_server() as (doomed, endpoint):
        s = Server("--rpc", endpoint)
        try:
            _, r = s.long_stream(3000)
            doomed.kill()
            rest = r.read().decode()
            code = s.proc.wait(timeout=30)
        finally:
            if s.proc.poll() is None:
                s.proc.kill()
            s.proc.wait()
    assert '"error"' in rest and "lost the RPC server" in rest  # the client learns why its answer stopped
    assert code == 9
    errors = [line for line in "".join(s.log).splitlines() if line.startswith("dspark: error:")]
    assert len(errors) == 1 and endpoint in errors[0] and "Traceback" not in "".join(s.log)


def test_keep_alive_reaches_llama_cpps_own_connection(demo_paths, servers):
    """The loader sets keepalive on the sockets llama.cpp opened to the servers: find them from outside. (The
    servers fixture then checks that Ctrl-C still stops the server after this client came and went.)"""
    endpoint = servers.split(",")[0]
    host, port = endpoint.split(":")
    code = ("import dspark_cli as d, socket, os\n"
            f"p = d.load({str(demo_paths[0])!r}, 'none', rpc={endpoint!r}, quiet=True)\n"
            "n = 0\n"
            "for fd in map(int, os.listdir('/proc/self/fd')):\n"
            "    try:\n"
            "        s = socket.socket(fileno=os.dup(fd))\n"
            "    except OSError:\n"
            "        continue\n"
            "    try:\n"
            f"        if s.type == socket.SOCK_STREAM and s.getpeername() == ({host!r}, {port}):\n"
            "            n += s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)\n"
            "    except OSError:\n"
            "        pass\n"
            "    s.close()\n"
            "p.close()\n"
            "print(n)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
