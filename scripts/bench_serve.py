#!/usr/bin/env python3
"""`dspark serve` under concurrent streaming clients: speculative against the target alone, interleaved.

    python3 scripts/bench_serve.py                      # demo pair, 4 clients, 3 rounds, 128 tokens each
    python3 scripts/bench_serve.py --clients 8 --rounds 5 -- --target T.gguf --draft D.gguf

Two servers run side by side on loopback ports (the default drafter, and `--draft none`), both warmed up;
each round sends the same N streaming chat requests (the official `openai` client, one thread each, greedy)
to one server, then the other, in an order that alternates every round. Per request: time to first token,
tokens (from `usage`), tokens/s while streaming; per round: requests completed and total tokens/s. The server
answers one request at a time, so time to first token grows with a client's place in the queue: that is
what a user of a busy server sees, and speculation shortens it for everyone behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a refrigerator works, step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra: list[str]) -> tuple[subprocess.Popen, int]:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dspark_cli", "serve", "--port", str(port), "--max-queue", "64",
                             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"a server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except OSError:
            time.sleep(0.3)
    sys.exit("a server did not start")


def one_round(port: int, clients: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    results: list[dict] = []

    def ask(i: int) -> None:
        t0 = time.perf_counter()
        first = None
        tokens = 0
        stream = client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        results.append({"ttft": (first or end) - t0, "tokens": tokens,
                        "tok_s": tokens / (end - first) if first and end > first else 0.0, "seconds": end - t0})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"completed": sum(1 for r in results if r["tokens"] > 0), "wall": wall,
            "total_tok_s": sum(r["tokens"] for r in results) / wall,
            "median_ttft": statistics.median(r["ttft"] for r in results),
            "max_ttft": max(r["ttft"] for r in results),
            "median_request_tok_s": statistics.median(r["tok_s"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("serve_args", nargs="*", help="after --: options for both servers (--target, --draft, ...)")
    args = ap.parse_args()

    spec_args = list(args.serve_args)
    alone_args = [a for a in spec_args]
    if "--draft" in alone_args:
        i = alone_args.index("--draft")
        del alone_args[i:i + 2]
    servers = {"speculative": start(spec_args), "target alone": start(alone_args + ["--draft", "none"])}
    try:
        for name, (_, port) in servers.items():  # warm-up: weights paged in, threads spun up
            one_round(port, 1, 16)
        rows: dict[str, list[dict]] = {name: [] for name in servers}
        names = list(servers)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                rows[name].append(one_round(servers[name][1], args.clients, args.max_tokens))
                print(f"round {r + 1} {name}: {json.dumps({k: round(v, 3) for k, v in rows[name][-1].items()})}",
                      file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[name])

    summary = {name: {key: round(med(name, key), 3) for key in rows[name][0]} for name in rows}
    summary["speedup_total_tok_s"] = round(med("speculative", "total_tok_s") / med("target alone", "total_tok_s"), 3)
    summary["ttft_ratio"] = round(med("speculative", "median_ttft") / med("target alone", "median_ttft"), 3)
    summary["settings"] = {"clients": args.clients, "rounds": args.rounds, "max_tokens": args.max_tokens,
                           "serve_args": spec_args}
    print(json.dumps(summary, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"summary": summary, "rounds": rows}, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    main()
