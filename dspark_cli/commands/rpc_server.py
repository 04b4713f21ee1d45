"""`dspark rpc-server`: this machine's CPU or GPUs, served to other machines' `dspark --rpc` (and llama.cpp's
--rpc) through llama.cpp's RPC backend, from the libraries dspark already installs (dspark_cli/rpc.py)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..llama import rpc
from ..console import say
from ..errors import OutputError, RemoteError, UsageError
from ..llama.backend import MAX_THREADS
from ..llama.memory import fmt_bytes
from ..net import ipv4_listen_address, is_loopback


def _cache_dir() -> Path:
    """Where llama.cpp's rpc-server keeps tensors it was sent (--cache), so both share one cache."""
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"]) / "rpc"
    from ..places import home

    return Path(os.environ.get("XDG_CACHE_HOME") or home() / ".cache") / "llama.cpp" / "rpc"


def register(app: typer.Typer) -> None:
    @app.command("rpc-server")
    def rpc_server(
        host: Annotated[str, typer.Option("--host", "-H", help="IPv4 address to listen on (llama.cpp's RPC server has no IPv6). Anything but loopback needs --allow-network.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = rpc.DEFAULT_PORT,
        threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads for the CPU device (default: physical cores).", show_default=False)] = None,
        device: Annotated[Optional[str], typer.Option("--device", help="Devices to serve, comma-separated (e.g. CUDA0,CUDA1). Default: the GPUs, or the CPU when there is none.", show_default=False)] = None,
        cache: Annotated[bool, typer.Option("--cache", help="Keep large tensors clients send in a local cache (LLAMA_CACHE/rpc), so a reload skips sending them.")] = False,
        allow_network: Annotated[bool, typer.Option("--allow-network", help="Allow a --host other than loopback. The RPC protocol has no authentication: only on a network you trust.")] = False,
    ) -> None:
        """Serve this machine's devices to a dspark (`--rpc HOST:PORT`) or llama.cpp on another machine.

        One client at a time. Never expose it to an open network: anyone who reaches the port can run code here."""
        if not 1 <= port <= 65535:
            raise UsageError(f"--port must be between 1 and 65535, got {port}")
        if threads is not None and not 1 <= threads <= MAX_THREADS:
            raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
        if not host.strip():
            raise UsageError("--host is empty")
        address = ipv4_listen_address(host.strip())
        if address is None:  # llama.cpp's server binds an AF_INET socket to inet_addr(host): nothing else
            raise UsageError(f"--host {host}: llama.cpp's RPC server listens on an IPv4 address only (no IPv6, "
                             "no host names)", hint="127.0.0.1 serves this machine only; 0.0.0.0 every network "
                             "it is on (with --allow-network)")
        host = address
        names = [n.strip() for n in device.split(",")] if device is not None else None
        if names is not None and not all(names):
            raise UsageError(f"--device takes names separated by commas, got {device!r}")
        if not is_loopback(host) and not allow_network:
            raise UsageError(f"--host {host} would expose this machine to the network; add --allow-network "
                             "if that network is trusted")
        devs = rpc.pick_devices(names)  # a flag that names no device is refused whatever holds the port
        rpc.check_port_free(host, port)
        if not is_loopback(host):
            say(rpc.NETWORK_WARNING)
        cache_dir = None
        if cache:
            cache_dir = _cache_dir()
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create the cache folder {cache_dir}: {e.strerror or e}") from None
        from ..llama.backend import default_threads

        n_threads = threads or default_threads()
        served = ", ".join(f"{rpc.ggml.device_name(d)} ({rpc.ggml.device_description(d)}, "
                           f"{fmt_bytes(rpc.ggml.device_memory(d)[0])} free)" for d in devs)
        # llama.cpp's server prints its log on stdout; a server has no answer to print, so all of it goes to stderr
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), 1)
        # A background job of a script starts with SIGINT ignored (and Python keeps it so): then only SIGTERM
        # (or SIGHUP) stops the server, and the line says so rather than promise a Ctrl-C that does nothing.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            stops = "SIGTERM stops (SIGINT is ignored here, as in a background job)"
        else:
            stops = "Ctrl-C stops"
        say(f"serving {served} on {host}:{port} with {n_threads} threads; {stops}")

        def serve() -> None:
            # The stop signals are the main thread's to handle: blocked here, the kernel never delivers them to
            # this thread, whose accept() or recv() in llama.cpp would fail with EINTR (dropping the client, or
            # ending the server as if it could not listen) while the main thread is still to see them.
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
            rpc.start_server(rpc.Endpoint(host, port), devs, threads=n_threads,
                             cache_dir=str(cache_dir) if cache_dir else None)

        server = threading.Thread(target=serve, name="rpc-server", daemon=True)
        server.start()
        try:
            while server.is_alive():
                server.join(0.5)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: a server stopping is a clean exit
            say("stopped")
            sys.stderr.flush()
            os._exit(0)  # llama.cpp's server thread sits in accept() or a client's request: nothing to join
        raise RemoteError(f"the RPC server on {host}:{port} stopped: llama.cpp could not listen or serve there")
