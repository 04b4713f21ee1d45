"""llama.cpp's RPC backend: serve this machine's devices to other machines (`dspark rpc-server`), and put a
model's layers on such servers (--rpc). llama-cpp-python dropped its rpc_servers parameter (0.3.10), so this
goes through ctypes to the ggml-rpc library dspark's build includes (-DGGML_RPC=ON).

The C client aborts the process when a server cannot be reached or stops answering. So dspark talks to each
server itself first (connect and the protocol's HELLO, with a timeout) and turns every failure it can see
coming into a RemoteError; what it cannot see coming (a server dying mid-generation) ends through the abort
hook in backend.py, which names the server that went away (rpc registers lost_server_message there).
"""

from __future__ import annotations

import ctypes
import errno
import re
import socket
import struct
import time
from dataclasses import dataclass

from . import backend, ggml
from ..errors import RemoteError, UsageError
from ..net import is_ipv6_literal, is_loopback

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS
PROTOCOL_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the vendored llama.cpp: servers must match it
_CMD_HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions
_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: the HELLO request is only this; the answer is 4 bytes + this
PROBE_TIMEOUT = 5.0  # seconds for connect + HELLO: a busy server (it serves one client at a time) says nothing
# After that silence, the end of an HTTP request line: a text protocol's server that was waiting for a line (an
# HTTP server reads the HELLO as the start of its request line) answers within NUDGE_WAIT, so dspark can say
# what is there instead of "did not answer". A busy RPC server reads it, if ever, after the probe's connection
# closed, as a command it does not know: it drops that connection.
_NUDGE = b" / HTTP/1.0\r\n\r\n"
NUDGE_WAIT = 1.0

NETWORK_WARNING = ("WARNING: the RPC server is experimental and not secure: anyone who can reach this port can "
                   "run code on this machine. Never expose it to an open network (llama.cpp's advice).")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(text: str, flag: str = "--rpc") -> list[Endpoint]:
    """HOST:PORT[,HOST:PORT...] as llama.cpp's --rpc takes it; UsageError (exit 2) for anything else."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise UsageError(f"{flag} takes HOST:PORT[,HOST:PORT...], got {text!r}")
    out: list[Endpoint] = []
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"{flag}: {item!r} is not HOST:PORT (a port from 1 to 65535)")
        if is_ipv6_literal(host):
            raise UsageError(f"{flag}: {item!r} is an IPv6 address; llama.cpp's RPC client connects over IPv4 only",
                             hint="give the server's IPv4 address or a host name with one (127.0.0.1 for this machine)")
        ep = Endpoint(host, int(port))
        if ep in out:
            raise UsageError(f"{flag} names {ep} twice")
        out.append(ep)
    if len(out) > MAX_SERVERS:
        raise UsageError(f"{flag} names {len(out)} servers; llama.cpp takes at most {MAX_SERVERS}")
    return out


def _read(sock: socket.socket, n: int, wait: float) -> tuple[bytes, bool]:
    """Up to n bytes within `wait` seconds, and whether the peer closed the connection (fewer bytes then)."""
    deadline = time.monotonic() + wait
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except (socket.timeout, TimeoutError):
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _what_answered(data: bytes) -> str:
    """Words for a first answer that is not llama.cpp's RPC protocol, quoting it when it is text."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")[:80]
    status = re.match(rb"HTTP/\d(?:\.\d)? +\d{3}(?: +[A-Za-z][A-Za-z -]*)?", line)  # the reason may quote the HELLO
    if status or data.lstrip()[:14].lower() in (b"<!doctype html", b"<html>"):
        return "an HTTP server answered" + (f" ({status.group().decode().strip()!r})" if status else "")
    if line and all(32 <= b < 127 for b in line):
        return f"something else answered ({line.decode('ascii')!r})"
    return f"something else answered, not llama.cpp's RPC protocol (its first bytes: {data[:12].hex(' ')})"


def probe(ep: Endpoint, timeout: float = PROBE_TIMEOUT) -> tuple[int, int, int]:
    """Connect and say HELLO as llama.cpp's client does (over IPv4, as it connects); the server's protocol
    version. RemoteError, naming the server, when it cannot be reached, does not answer in time, or is not a
    compatible RPC server (then what answered instead, e.g. an HTTP server)."""
    hint = f"start it there with: dspark rpc-server --port {ep.port}" + ("" if is_loopback(ep.host) else
                                                                          " --host <its address> --allow-network")
    wrong_port = "check the port: dspark rpc-server listens on 50052 by default"
    try:
        address = socket.gethostbyname(ep.host)  # IPv4 only, as llama.cpp's client resolves it
    except (socket.gaierror, socket.herror, UnicodeError) as e:
        raise RemoteError(f"cannot reach RPC server {ep}: unknown host, or one with no IPv4 address "
                          f"({getattr(e, 'strerror', None) or e}); llama.cpp's RPC client connects over IPv4 "
                          "only") from None
    try:
        with socket.create_connection((address, ep.port), timeout=timeout) as sock:
            sock.sendall(bytes([_CMD_HELLO]) + struct.pack("<Q", _CAPS_SIZE) + bytes(_CAPS_SIZE))
            head, closed = _read(sock, 8, timeout)
            if not head and not closed:  # silent: busy, or a text protocol waiting for a line
                try:
                    sock.sendall(_NUDGE)
                except OSError:
                    pass
                head, closed = _read(sock, 8, NUDGE_WAIT)
                if not head and not closed:
                    raise socket.timeout  # below: did not answer
            if not head:
                raise RemoteError(f"{ep} closed the connection without answering llama.cpp's RPC hello: not an "
                                  "RPC server, or one of another llama.cpp version",
                                  hint="run the same llama.cpp version on both machines; " + wrong_port)
            if len(head) == 8 and struct.unpack("<Q", head)[0] == 4 + _CAPS_SIZE:
                body, _ = _read(sock, 4 + _CAPS_SIZE, timeout)
                if len(body) == 4 + _CAPS_SIZE:
                    major, minor, patch = body[:3]
                    if major != PROTOCOL_MAJOR:
                        raise RemoteError(f"RPC server {ep} speaks protocol {major}.{minor}.{patch}; this dspark's "
                                          f"llama.cpp speaks {PROTOCOL_MAJOR}.x",
                                          hint="run the same llama.cpp version on both machines")
                    return major, minor, patch
                head += body
            elif b"\n" not in head and not closed:
                more, _ = _read(sock, 120, NUDGE_WAIT)  # the rest of its first line, to quote it
                head += more
            raise RemoteError(f"{ep} is not a llama.cpp RPC server: {_what_answered(head)}", hint=wrong_port)
    except (socket.timeout, TimeoutError):  # no connection (a full backlog, a firewall), or silence after it
        raise RemoteError(f"RPC server {ep} did not answer within {timeout:g} s",
                          hint="a server takes one client at a time: is another dspark or llama.cpp using it? "
                               "(or a firewall drops the connection)") from None
    except ConnectionRefusedError:
        raise RemoteError(f"cannot reach RPC server {ep}: connection refused", hint=hint) from None
    except OSError as e:
        raise RemoteError(f"cannot reach RPC server {ep}: {e.strerror or e}", hint=hint) from None


def dead_servers(endpoints: list[Endpoint], timeout: float = 1.0) -> list[tuple[Endpoint, str]]:
    """Which of these servers cannot be connected to now (for the message after a lost connection). Only a
    connect, no HELLO: a server still serving dspark would not answer a second client."""
    dead = []
    for ep in endpoints:
        try:
            socket.create_connection((ep.host, ep.port), timeout=timeout).close()
        except OSError as e:
            dead.append((ep, e.strerror or str(e) or type(e).__name__))
    return dead


# ---- client: a model's layers on servers -------------------------------------------------------------------
def supported() -> bool:
    fn = ggml.function("ggml", "ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    return bool(fn and fn(b"RPC"))


def _proc(name: str, restype, argtypes):
    reg_by_name = ggml.function("ggml", "ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    get_proc = ggml.function("ggml-base", "ggml_backend_reg_get_proc_address", ctypes.c_void_p,
                             [ctypes.c_void_p, ctypes.c_char_p])
    reg = reg_by_name(b"RPC") if reg_by_name else None
    address = get_proc(reg, name.encode()) if reg and get_proc else None
    if not address:
        raise RemoteError("this llama.cpp was built without the RPC backend",
                          hint="reinstall with: bash scripts/install.sh (it builds with -DGGML_RPC=ON)")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


# The servers in use and their devices (llama.cpp keeps one connection per server for the process); also what
# the message names when llama.cpp loses one (backend's abort callback, through explain_aborts below).
_connected: dict[Endpoint, list[int]] = {}


def server_devices(endpoints: list[Endpoint]) -> list[int]:
    """The devices these servers offer, as ggml_backend_dev_t pointers for llama_model_params.devices. Each
    server is probed first, so an unreachable one is a RemoteError rather than llama.cpp's abort."""
    backend.init()  # the abort hook must be in place before llama.cpp's client connects
    add_server = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    reg_dev_count = ggml.function("ggml-base", "ggml_backend_reg_dev_count", ctypes.c_size_t, [ctypes.c_void_p])
    reg_dev_get = ggml.function("ggml-base", "ggml_backend_reg_dev_get", ctypes.c_void_p,
                                [ctypes.c_void_p, ctypes.c_size_t])
    devs: list[int] = []
    for ep in endpoints:
        if ep not in _connected:
            probe(ep)
            _connected[ep] = []  # in use from here: llama.cpp may lose it while connecting (lost_server_message)
            reg = add_server(str(ep).encode())
            if not reg:
                del _connected[ep]
                raise RemoteError(f"RPC server {ep} offers no devices")
            _connected[ep] = [reg_dev_get(reg, i) for i in range(reg_dev_count(reg))]
        devs += _connected[ep]
    return devs


def remote_memory(endpoints: list[Endpoint]) -> tuple[int, int]:
    """(free, total) bytes over these servers' devices."""
    free = total = 0
    for dev in server_devices(endpoints):
        f, t = ggml.device_memory(dev)
        free, total = free + f, total + t
    return free, total


def lost_server_message() -> str | None:
    """After llama.cpp lost a connection: which server went away, in words; None when no server is in use."""
    watched = list(_connected)
    if not watched:
        return None
    deadline = time.monotonic() + 2.0  # a dying server's listening socket may outlive its connection briefly
    while True:
        dead = dead_servers(watched)
        if dead:
            return "; ".join(f"lost the RPC server {ep} ({why})" for ep, why in dead)
        if time.monotonic() > deadline:
            return f"lost the connection to an RPC server ({', '.join(map(str, watched))})"
        time.sleep(0.2)


def keep_alive(endpoints: list[Endpoint]) -> int:
    """TCP keepalive and a user timeout on llama.cpp's connections to these servers, so a machine that
    vanishes (cable, power, network) ends the run in seconds instead of a recv() that waits forever. The
    sockets are llama.cpp's; this only sets options on them. Returns how many were found (Linux only)."""
    import os

    wanted = {(socket.gethostbyname(ep.host), ep.port) for ep in endpoints}
    found = 0
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM and sock.getpeername() in wanted:
                set_keep_alive(sock)
                found += 1
        except OSError:
            pass
        finally:
            sock.close()
    return found


def set_keep_alive(sock: socket.socket, idle: int = 2, interval: int = 1, count: int = 3) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count),
                       ("TCP_USER_TIMEOUT", (idle + interval * count) * 1000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


# ---- server: this machine's devices for others --------------------------------------------------------------
def pick_devices(names: list[str] | None) -> list[int]:
    """The devices to serve: those named (UsageError listing what exists otherwise), or by default the GPUs,
    or the CPU when there is none (what llama.cpp's rpc-server does)."""
    backend.init()
    every = {ggml.device_name(d): d for d in ggml.devices()}
    if names:
        unknown = [n for n in names if n not in every]
        if unknown:
            raise UsageError(f"--device: no device {', '.join(unknown)} here; there is {', '.join(every)}")
        return [every[n] for n in names]
    gpus = [d for d in every.values() if ggml.device_type(d) not in (ggml.DEVICE_CPU, ggml.DEVICE_ACCEL)]
    return gpus or [d for d in every.values() if ggml.device_type(d) == ggml.DEVICE_CPU][:1]


def check_port_free(host: str, port: int) -> None:
    """Bind as llama.cpp's server will (AF_INET, SO_REUSEADDR; host an IPv4 address): UsageError when host is
    not an address of this machine, RemoteError when the port is taken or refused."""
    probe_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp's server socket
        probe_sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host} is not an address of this machine ({e.strerror})",
                             hint="127.0.0.1 serves this machine only; 0.0.0.0 every network it is on") from None
        raise RemoteError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                          hint="another rpc-server may be running there; pick another --port") from None
    finally:
        probe_sock.close()


def start_server(ep: Endpoint, devs: list[int], *, threads: int, cache_dir: str | None) -> None:
    """llama.cpp's ggml_backend_rpc_start_server: listens on ep and serves one client at a time, forever.
    It returns only when it could not listen."""
    start = _proc("ggml_backend_rpc_start_server", None,
                  [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p])
    array = (ctypes.c_void_p * len(devs))(*devs)
    start(str(ep).encode(), cache_dir.encode() if cache_dir else None, threads, len(devs), array)


def _explain_abort(message: str) -> str | None:
    """A llama.cpp abort about a connection: which server was lost (see backend.explain_aborts)."""
    return lost_server_message() if "RPC" in message or "connect" in message else None


backend.explain_aborts(_explain_abort)
