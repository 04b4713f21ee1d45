#!/usr/bin/env python3
"""Speculative decoding against a target on `dspark rpc-server`: target alone vs dspark's default drafter, per
network delay, interleaved, on the same loaded models.

    python3 scripts/bench_rpc.py                      # demo pair, servers on loopback, delays 0, 1 and 5 ms
    python3 scripts/bench_rpc.py --real --rounds 3    # the Qwen2.5-Coder pair (scripts/fetch_real_pair.py)

For each delay one `dspark rpc-server` process holds the target; a delay above 0 puts a userspace relay in
front of it that holds every chunk for half the round trip in each direction, in this process, on loopback
ports of its own. The kernel's netem would be more faithful but needs a qdisc on a device (the shared
loopback, or a network namespace's with the sch_netem module, which this machine lacks); the relay touches no
device. Within a delay both contenders run on the same Pair (the draft stays local), warmed up, in an order
that rotates every round, on the same prompts and settings. Reports tokens/s, tokens per target step (what
a round trip buys), and the paired ratio per prompt."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dspark_cli.llama import rpc  # noqa: E402

PROMPTS = {
    "code": "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "prose": "Explain in a paragraph why the sky is blue.",
    "list": "List the planets of the solar system in order, one per line, with one fact each.",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "dspark_cli", "rpc-server", "--port", str(port), "--threads",
                          str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
            return p, port
        except rpc.RemoteError:
            if p.poll() is not None:
                raise SystemExit("rpc-server failed to start")
            time.sleep(0.2)
    raise SystemExit("rpc-server did not come up")


class DelayRelay:
    """127.0.0.1:port -> 127.0.0.1:upstream, each chunk delivered `one_way` seconds after it arrived, in order."""

    def __init__(self, upstream: int, one_way: float):
        self.upstream, self.one_way = upstream, one_way
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader, writer):
            queue: asyncio.Queue = asyncio.Queue()

            async def deliver():
                while True:
                    due, data = await queue.get()
                    if data is None:
                        break
                    wait = due - self.loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
                writer.close()

            sender = asyncio.ensure_future(deliver())
            while True:
                data = await reader.read(1 << 20)
                await queue.put((self.loop.time() + self.one_way, data or None))
                if not data:
                    break
            await sender

        async def handle(client_reader, client_writer):
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            server_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer),
                                 return_exceptions=True)

        async def main():
            await asyncio.start_server(handle, "127.0.0.1", self.port)
            ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="the Qwen2.5-Coder 0.5B -> 1.5B Q4_K_M pair")
    ap.add_argument("--target"), ap.add_argument("--draft")
    ap.add_argument("--delays", default="0,1,5", help="round-trip delays in ms (default 0,1,5)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-n", "--max-tokens", type=int, default=96)
    ap.add_argument("--server-threads", type=int, default=1,
                    help="threads of each rpc-server (default 1)")
    ap.add_argument("--client-threads", type=int,
                    help="threads of this process (the draft): default the cores the servers leave, so the two "
                         "do not compete for a core as they would not on two machines")
    args = ap.parse_args()

    import dspark_cli as dspark
    from dspark_cli.engine.sampling import SamplingParams

    target, draft = args.target, args.draft
    if args.real:
        sys.path.insert(0, str(ROOT / "scripts"))
        from fetch_real_pair import real_pair

        target, draft = map(str, real_pair())
    if target is None:
        from dspark_cli.models.demo import demo_pair

        target, draft = map(str, demo_pair())

    delays = [float(d) for d in args.delays.split(",")]
    from dspark_cli.llama.backend import default_threads

    client_threads = args.client_threads or max(1, default_threads() - args.server_threads)
    servers, pairs = [], {}
    try:
        for delay in delays:
            proc, port = start_server(args.server_threads)
            servers.append(proc)
            if delay > 0:
                port = DelayRelay(port, delay / 2000).port
            print(f"delay {delay:g} ms: loading the target onto its server ...", file=sys.stderr)
            pairs[delay] = dspark.load(target, draft, rpc=f"127.0.0.1:{port}", threads=client_threads, quiet=True)
        params = SamplingParams(temperature=0.0)
        contenders = ["target", "hybrid"]
        rows = {(d, c, p): [] for d in delays for c in contenders for p in PROMPTS}
        texts = {}

        def one(delay, method, name):
            pair = pairs[delay]
            tokens = pair.tokens(PROMPTS[name])
            stats, out = None, []
            for ev in pair.generate_tokens(tokens, params=params, max_tokens=args.max_tokens, method=method):
                stats = ev.stats
                out.append(ev.text)
            return stats, "".join(out)

        for delay in delays:  # warm-up: every contender once
            for c in contenders:
                one(delay, c, "prose")
        for r in range(args.rounds):
            for delay in delays:
                order = contenders[r % 2:] + contenders[:r % 2]  # rotate who goes first
                for name in PROMPTS:
                    for c in order:
                        stats, text = one(delay, c, name)
                        rows[(delay, c, name)].append(stats)
                        texts.setdefault(name, text)
                        assert text == texts[name], f"output differs: delay {delay}, {c}, {name}"
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        print(f"target {Path(target).name} on rpc-server ({args.server_threads} threads), draft "
              f"{Path(draft).name} here ({client_threads} threads), {args.max_tokens} tokens, greedy, "
              f"{args.rounds} rounds, output identical everywhere: True")
        print(f"{'delay':>6} {'prompt':<6} {'alone tok/s':>12} {'spec tok/s':>11} {'speedup':>8} "
              f"{'tok/step':>9} {'accept':>7}")
        for delay in delays:
            ratios = []
            for name in PROMPTS:
                alone, spec = rows[(delay, "target", name)], rows[(delay, "hybrid", name)]
                paired = [s.tokens_per_second / a.tokens_per_second for a, s in zip(alone, spec)]
                ratios += paired
                last = spec[-1]
                per_step = last.n_generated / max(1, last.n_target_steps)
                print(f"{delay:>5g}ms {name:<6} {statistics.median(a.tokens_per_second for a in alone):>12.1f} "
                      f"{statistics.median(s.tokens_per_second for s in spec):>11.1f} "
                      f"{statistics.median(paired):>7.2f}x {per_step:>9.2f} "
                      f"{last.acceptance_rate if last.n_drafted else float('nan'):>7.0%}")
            print(f"{delay:>5g}ms {'all':<6} {'':>12} {'':>11} {statistics.median(ratios):>7.2f}x")
    finally:
        for pair in pairs.values():
            pair.close()
        for proc in servers:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    main()
