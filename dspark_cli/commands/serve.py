"""`dspark serve`: an OpenAI-compatible HTTP server with speculative decoding (dspark_cli/server/)."""

from __future__ import annotations

import errno
import socket
from dataclasses import replace
from typing import Annotated, Optional

import typer

from ..api import open_pair
from ..console import say
from ..engine.loop import DEFAULT_DRAFT_MAX, check_limits
from ..errors import UsageError
from ..loader import ModelOptions
from ..net import is_loopback
from ..engine.sampling import SamplingParams
from . import _options as o

# Requests batched at once by default: on a CPU, 4 sequences of up to 4 rows fill the 16 rows that dspark's
# kernels keep bit-identical to one-token decoding (a plain batched step of 4 costs ~1.3 one-token steps).
DEFAULT_PARALLEL = 4


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @o.shared_options
    def serve(
        models: ModelOptions,
        sampling: SamplingParams,
        host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback exposes the models to the network (a warning says so).")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
        api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DSPARK_API_KEY", help="Require 'Authorization: Bearer KEY' on every endpoint but /health and /metrics (also DSPARK_API_KEY).", show_default=False)] = None,
        max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait while one generates; more get 429 with Retry-After.")] = 16,
        max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes (413 beyond).")] = 8 << 20,
        model_name: Annotated[Optional[str], typer.Option("--model-name", help="The model id clients send (default: the target's name).", show_default=False)] = None,
        draft_max: o.DraftMax = DEFAULT_DRAFT_MAX,
        draft_fixed: o.DraftFixed = False,
        max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per answer when a request does not say.")] = 2048,
        seed: o.Seed = None,
        read_timeout: Annotated[float, typer.Option("--read-timeout", help="Seconds a client may take to send a request's headers, or pause in its body (408), before its connection is closed; 0: no limit.")] = 30.0,
        parallel: Annotated[int, typer.Option("--parallel", "-np", help="Requests generated at once, batched together (each exactly what it would be alone, each with --ctx-size tokens of its own); 1: one at a time.")] = DEFAULT_PARALLEL,
    ) -> None:
        """Serve the pair over the OpenAI API (chat completions, completions, models), several requests at once.

        Point any OpenAI client at it: base_url http://HOST:PORT/v1. The Sampling flags are the defaults for
        requests that do not set temperature, top_p, top_k, min_p or seed themselves (greedy by default)."""
        import uvicorn

        from ..server.app import ServeOptions, create_app
        from ..server.protocol import with_head_deadline
        from ..server.worker import Worker

        if not 1 <= port <= 65535:
            raise UsageError(f"--port must be between 1 and 65535, got {port}")
        if max_queue < 0:
            raise UsageError(f"--max-queue must be 0 or more, got {max_queue}")
        if max_body < 1024:
            raise UsageError(f"--max-body must be at least 1024 bytes, got {max_body}")
        check_limits(max_tokens, draft_max)
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty")
        if not (0 <= read_timeout < float("inf")):
            raise UsageError(f"--read-timeout must be 0 (no limit) or a number of seconds, got {read_timeout}")
        if not host.strip():  # '' would listen on every IPv4 and IPv6 address
            raise UsageError("--host is empty: give an address (127.0.0.1, or 0.0.0.0 for every IPv4 one)")
        check_can_listen(host, port)  # before loading: a port in use is one line now, not after the models load
        if api_key is not None and not api_key.isascii():  # it works from curl (UTF-8 bytes), so not refused
            say("warning: --api-key has non-ASCII characters, which some clients (openai's Python package "
                "among them) cannot send in a header")
        if not is_loopback(host):
            say(f"warning: listening on {host}: anyone who can reach this address can use the models"
                + ("" if api_key else "; set --api-key"))

        with open_pair(replace(models, parallel=parallel)) as pair:
            name = model_name or (models.pair or pair.target_path.stem)
            name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a JSON string clients can send
            worker = Worker(max_queue, slots=pair.parallel)
            options = ServeOptions(model_id=name, api_key=api_key, max_body=max_body, max_tokens=max_tokens,
                                   draft_max=draft_max, fixed=draft_fixed,
                                   defaults=sampling if seed is not None else replace(sampling, seed=None),
                                   read_timeout=read_timeout or None)
            app = create_app(pair, options, worker)

            class Server(uvicorn.Server):
                def handle_exit(self, sig, frame):  # Ctrl-C, SIGTERM: end the answer being streamed, then exit
                    worker.stopping.set()
                    super().handle_exit(sig, frame)

            config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=10, lifespan="off",
                                    http=with_head_deadline(read_timeout) if read_timeout else "auto")
            at_once = f"{pair.parallel} requests at once" if pair.parallel > 1 else "one request at a time"
            at_once += f", {pair.target.n_ctx} tokens of context each"  # as llama.cpp rounded --ctx-size
            say(f"serving {name} on http://{host}:{port}/v1 ({pair.method}, {at_once}); Ctrl-C stops")
            try:
                Server(config).run()
            except KeyboardInterrupt:
                pass  # uvicorn re-raises the Ctrl-C/SIGTERM it handled: stopping a server is a clean exit
            finally:
                worker.close()
        say("stopped")


def check_can_listen(host: str, port: int) -> None:
    """A UsageError (exit 2) unless the server can listen on host:port: each address `host` names is bound
    and let go the way uvicorn binds it (SO_REUSEADDR, IPv6 sockets IPv6 only), so a port another process
    listens on, an address of another machine or a privileged port are refused before any model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host}: not an address of this machine ({getattr(e, 'strerror', None) or e})") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UsageError(f"--port {port}: {host}:{port} is already in use (another server listens "
                                     "there); pick another --port") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise UsageError(f"--host {host}: not an address of this machine") from None
                raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
