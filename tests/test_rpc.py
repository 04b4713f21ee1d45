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

import pytest

from dspark_cli import rpc
from dspark_cli.errors import RemoteError
from test_hostile_input import one_error
from test_serve import free_port

DSPARK = [sys.executable, "-m", "dspark_cli"]
ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
PROMPT = "List three facts about the Moon."

pytestmark = pytest.mark.skipif(not rpc.supported(), reason="llama.cpp built without -DGGML_RPC=ON")


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen(DSPARK + ["rpc-server", "--port", str(port), "--threads", "1", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    endpoint = rpc.Endpoint("127.0.0.1", port)
    deadline = time.monotonic() + 60
    while True:
        try:
            rpc.probe(endpoint, timeout=2)
            return p, str(endpoint)
        except RemoteError:
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise AssertionError(p.communicate()[1].decode())
            time.sleep(0.2)


def stop(p: subprocess.Popen) -> tuple[bytes, bytes]:
    p.send_signal(signal.SIGINT)
    try:
        return p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        raise


@pytest.fixture(scope="module")
def servers():
    started = [start_server(), start_server()]
    yield ",".join(endpoint for _, endpoint in started)
    for p, _ in started:
        assert stop(p)[0] == b""  # the server's log goes to stderr: stdout carries nothing
        assert p.returncode == 0


def dspark(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(DSPARK + list(args), capture_output=True, env=ENV, timeout=timeout)


def generate(target, draft, *extra: str, n: int = 48) -> tuple[str, dict]:
    r = dspark("run", "-m", str(target), "-d", str(draft), "--temp", "0", "-n", str(n), "--json", *extra, PROMPT)
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    return result["text"], result


# ---- the target across two servers -------------------------------------------------------------------------
def test_greedy_across_two_servers_equals_the_target_alone_here(servers, demo_paths):
    target, draft = demo_paths
    alone, _ = generate(target, "none")
    assert alone.strip()
    remote_alone, _ = generate(target, "none", "--rpc", servers)
    assert remote_alone == alone
    remote_spec, stats = generate(target, draft, "--rpc", servers)
    assert remote_spec == alone
    assert stats["drafted"] > 0  # the local draft really drafted for the remote target
    split, _ = generate(target, draft, "--rpc", servers, "--tensor-split", "1,3")
    assert split == alone


def test_the_draft_can_go_remote_too(servers, demo_paths):
    target, draft = demo_paths
    alone, _ = generate(target, "none", n=24)
    first, second = servers.split(",")
    text, _ = generate(target, draft, "--rpc", first, "--rpc-draft", second, n=24)
    assert text == alone


# ---- failures, each one line naming the server ---------------------------------------------------------------
def test_an_unreachable_server_at_load_is_one_line(demo_paths):
    port = free_port()
    started = time.monotonic()
    r = dspark("run", "-m", str(demo_paths[0]), "-d", "none", "--rpc", f"127.0.0.1:{port}", "-n", "4", "hi")
    one_error(r, 9, f"127.0.0.1:{port}", "connection refused")
    assert time.monotonic() - started < 30
    assert r.stdout == b""


def test_something_else_on_the_port_is_not_taken_for_a_server(demo_paths):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer():
        conn, _ = listener.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    r = dspark("run", "-m", str(demo_paths[0]), "-d", "none", "--rpc", f"127.0.0.1:{port}", "-n", "4", "hi")
    listener.close()
    one_error(r, 9, f"127.0.0.1:{port}", "not a llama.cpp RPC server")


def test_a_silent_server_times_out_instead_of_hanging(demo_paths):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers: a busy server
    port = listener.getsockname()[1]
    started = time.monotonic()
    r = dspark("run", "-m", str(demo_paths[0]), "-d", "none", "--rpc", f"127.0.0.1:{port}", "-n", "4", "hi")
    listener.close()
    one_error(r, 9, f"127.0.0.1:{port}", "did not answer")
    assert time.monotonic() - started < 60


def test_a_server_killed_mid_generation_ends_the_run_in_one_line(demo_paths):
    target, draft = demo_paths
    doomed, endpoint = start_server()
    try:
        p = subprocess.Popen(DSPARK + ["run", "-m", str(target), "-d", str(draft), "--rpc", endpoint, "--temp", "0",
                                       "-n", "2000", "Write a long story about a lighthouse keeper."],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        first = p.stdout.read(40)  # the answer is streaming: the target is generating on the server
        assert first, p.stderr.read().decode()
        doomed.kill()
        killed_at = time.monotonic()
        rest, err = p.communicate(timeout=60)
        assert time.monotonic() - killed_at < 15
    finally:
        doomed.kill()
        doomed.wait()
    r = subprocess.CompletedProcess(p.args, p.returncode, first + rest, err)
    one_error(r, 9, "lost the RPC server", endpoint)
    assert len(first + rest) >= 40  # what was generated stays printed


def test_chat_keeps_the_answer_so_far_when_the_server_dies(demo_paths, tmp_path):
    target, draft = demo_paths
    doomed, endpoint = start_server()
    transcript = tmp_path / "chat.jsonl"
    try:
        p = subprocess.Popen(DSPARK + ["chat", "-m", str(target), "-d", str(draft), "--rpc", endpoint, "--temp", "0",
                                       "-n", "2000", "--transcript", str(transcript)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        p.stdin.write(b"Write a long story about a lighthouse keeper.\n")
        p.stdin.flush()
        first = p.stdout.read(40)
        assert first, p.stderr.read().decode()
        doomed.kill()
        rest, err = p.communicate(timeout=60)
    finally:
        doomed.kill()
        doomed.wait()
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
])
def test_rpc_server_refuses_bad_flags(args, code, fragment):
    one_error(dspark("rpc-server", *args, timeout=60), code, fragment)


def test_rpc_server_on_a_taken_port_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        one_error(dspark("rpc-server", "--port", str(port), timeout=60), 9, f"127.0.0.1:{port}")


def test_rpc_server_warns_before_listening_on_the_network():
    p, _ = start_server("--host", "0.0.0.0", "--allow-network")  # reachable on loopback too, where it is probed
    out, err = stop(p)
    assert out == b"" and p.returncode == 0
    assert "Never expose it to an open network" in err.decode()


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

    doomed, endpoint = start_server()
    try:
        s = Server("--rpc", endpoint)
        _, r = s.long_stream(3000)
        doomed.kill()
        rest = r.read().decode()
        code = s.proc.wait(timeout=30)
    finally:
        doomed.kill()
        doomed.wait()
    assert '"error"' in rest and "lost the RPC server" in rest  # the client learns why its answer stopped
    assert code == 9
    errors = [line for line in "".join(s.log).splitlines() if line.startswith("dspark: error:")]
    assert len(errors) == 1 and endpoint in errors[0] and "Traceback" not in "".join(s.log)


def test_keep_alive_reaches_llama_cpps_own_connection(demo_paths):
    """The loader sets keepalive on the sockets llama.cpp opened to the servers: find them from outside."""
    doomed, endpoint = start_server()
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
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        stop(doomed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
